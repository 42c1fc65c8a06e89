"""corrvos.io: frames from videos/folders/zips, masks, palette PNGs, the H.264 writer and DAVIS layout."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from corrvos.errors import DatasetError, InputError
from corrvos.io import (
    PALETTE,
    VideoFrames,
    VideoWriter,
    annotation_paths,
    check_mask,
    davis_palette,
    davis_sequences,
    frame_paths,
    iter_video,
    load_frames,
    read_annotation,
    read_frame_folder,
    read_mask,
    read_shared_sequence,
    read_video,
    read_zip_of_frames,
    video_fps,
    write_mask,
    write_video,
)
from corrvos.io import video as video_mod

HAVE_DECORD = video_mod._have_decord()
BACKENDS = [pytest.param("decord", marks=pytest.mark.skipif(not HAVE_DECORD, reason="decord is not installed")), "cv2"]


def _frames(n=5, h=48, w=64, seed=0):
    """Smooth frames with a moving square: compress well, so decoded values stay close to the originals."""
    rng = np.random.default_rng(seed)
    base = np.zeros((h, w, 3), np.uint8)
    base[:] = rng.integers(40, 200, size=3, dtype=np.uint8)
    out = []
    for t in range(n):
        f = base.copy()
        f[8:24, 4 + 6 * t:20 + 6 * t] = (250, 30, 30)
        out.append(f)
    return out


def _save_png(path, arr, mode=None):
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------- palette / masks

def test_davis_palette_known_entries():
    pal = davis_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    # The standard DAVIS/VOC colours, as seen in every DAVIS annotation file.
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                5: (128, 0, 128), 6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0),
                255: (224, 224, 192)}
    for i, rgb in expected.items():
        assert tuple(pal[i]) == rgb, i
    assert len({tuple(c) for c in pal}) == 256  # the bit interleaving is one-to-one


def test_write_mask_is_palette_png_and_round_trips(tmp_path):
    labels = np.zeros((30, 41), np.uint8)
    labels[2:10, 3:9] = 1
    labels[15:, 20:] = 2
    labels[0, 40] = 7
    path = write_mask(tmp_path / "m.png", labels)
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
        assert np.array_equal(np.asarray(img), labels)
    assert np.array_equal(read_mask(path), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temp file left behind


def test_read_mask_grayscale_davis2016_and_label_maps(tmp_path):
    binary = np.zeros((20, 30), np.uint8)
    binary[5:15, 5:25] = 255
    got = read_mask(_save_png(tmp_path / "bin.png", binary))
    assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 1} and got.sum() == 200
    assert np.array_equal(read_annotation(tmp_path / "bin.png"), got)

    soft = binary.copy()
    soft[5, 5:25] = 100  # anti-aliased edge: below the 127 threshold
    assert read_mask(_save_png(tmp_path / "soft.png", soft)).sum() == 180

    small = np.zeros((20, 30), np.uint8)
    small[:5] = 1
    small[-5:] = 3
    assert np.array_equal(read_mask(_save_png(tmp_path / "small.png", small)), small)


def test_read_mask_rgb_palette_colours_first(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[0:3, 0:3] = (10, 200, 30)      # not a palette colour
    rgb[4:6, 0:3] = PALETTE[2]         # palette 2 (green)
    rgb[7:9, 0:3] = PALETTE[1]         # palette 1 (red)
    rgb[7:9, 6:9] = (5, 5, 250)        # not a palette colour, lexicographically before (10, 200, 30)
    labels = read_mask(_save_png(tmp_path / "rgb.png", rgb))
    assert labels[8, 1] == 1 and labels[5, 1] == 2      # palette colours keep their order
    assert labels[8, 7] == 3 and labels[1, 1] == 4      # then the others
    assert labels[9, 11] == 0 and labels.max() == 4


def test_read_mask_rgba_transparent_is_background_and_gray_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = PALETTE[1]
    rgba[:4, :, 3] = 255  # only the top half is painted
    labels = read_mask(_save_png(tmp_path / "rgba.png", rgba))
    assert labels[:4].min() == 1 and labels[4:].max() == 0

    gray_rgb = np.zeros((8, 8, 3), np.uint8)
    gray_rgb[2:6, 2:6] = 255  # a 0/255 mask saved as RGB
    assert read_mask(_save_png(tmp_path / "g.png", gray_rgb)).sum() == 16


def test_read_mask_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_mask(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="could not read the mask"):
        read_mask(tmp_path / "text.png")
    noisy = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="distinct colours"):
        read_mask(_save_png(tmp_path / "noisy.png", noisy))


def test_check_mask_messages():
    frame_shape = (240, 427, 3)
    with pytest.raises(InputError, match=r"the mask is 480x854 .* the frames are 240x427"):
        check_mask(np.ones((480, 854), np.uint8), frame_shape)
    with pytest.raises(InputError, match="the first-frame mask has no object pixels"):
        check_mask(np.zeros((240, 427), np.uint8), frame_shape)
    with pytest.raises(InputError, match="single-channel"):
        check_mask(np.ones((240, 427, 3), np.uint8), frame_shape)
    ok = np.zeros((240, 427), np.uint8)
    ok[3, 4] = 2
    assert check_mask(ok, frame_shape) is not None
    for err_mask in (np.ones((480, 854), np.uint8), np.zeros((240, 427), np.uint8)):
        with pytest.raises(InputError) as info:
            check_mask(err_mask, frame_shape)
        assert "\n" not in str(info.value) and str(info.value).endswith(".")


# ------------------------------------------------------------------------------------------- frame folders / zips

def test_read_frame_folder_natural_order_and_stems(tmp_path):
    frames = _frames(3)
    for name, f in zip(["frame10.png", "frame2.jpg", "frame1.png"], frames):
        Image.fromarray(f).save(tmp_path / name, quality=98)
    (tmp_path / "notes.txt").write_text("ignored")
    got, names = read_frame_folder(tmp_path)
    assert names == ["frame1", "frame2", "frame10"]
    assert np.array_equal(got[0], frames[2]) and np.array_equal(got[2], frames[0])  # PNGs are exact
    assert got[1].shape == (48, 64, 3) and got[1].dtype == np.uint8


def test_read_frame_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_frame_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="contains no .jpg or .png"):
        read_frame_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_frames(1)[0]).save(mixed / "0.png")
    Image.fromarray(_frames(1, h=32)[0]).save(mixed / "1.png")
    with pytest.raises(InputError, match=r"frame 1.png is 32x64 .* first frame is 48x64"):
        read_frame_folder(mixed)
    dup = tmp_path / "dup"
    dup.mkdir()
    Image.fromarray(_frames(1)[0]).save(dup / "a.png")
    Image.fromarray(_frames(1)[0]).save(dup / "a.jpg")
    with pytest.raises(InputError, match="several images named 'a'"):
        read_frame_folder(dup)


def test_read_zip_of_frames(tmp_path):
    frames = _frames(3)
    path = tmp_path / "clip.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, f in enumerate(frames):
            png = tmp_path / f"{i}.png"
            Image.fromarray(f).save(png)
            zf.write(png, f"clip/img_{[9, 10, 100][i]}.png")
        zf.writestr("__MACOSX/clip/._img_9.png", b"resource fork")
        zf.writestr("clip/readme.txt", "hi")
    got, names = read_zip_of_frames(path)
    assert names == ["img_9", "img_10", "img_100"]
    assert all(np.array_equal(a, b) for a, b in zip(got, frames))

    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        read_zip_of_frames(tmp_path / "bad.zip")


# ------------------------------------------------------------------------------------------- videos

@pytest.fixture(scope="module")
def small_video(tmp_path_factory):
    frames = _frames(6)
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    write_video(path, frames, fps=12)
    return path, frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_video_reads_back(small_video, backend):
    path, frames = small_video
    video = VideoFrames(path, backend=backend)
    assert len(video) == 6 and video.size == (48, 64) and video.fps == pytest.approx(12)
    got = list(video)
    assert all(g.shape == (48, 64, 3) and g.dtype == np.uint8 for g in got)
    # H.264 is lossy: close, and the moving square is where it was written.
    for g, f in zip(got, frames):
        assert np.abs(g.astype(int) - f).mean() < 4
    assert np.abs(got[3][16, 30].astype(int) - (250, 30, 30)).max() < 20       # inside the square at t=3
    assert np.abs(got[0][16, 30].astype(int) - frames[0][16, 30]).max() < 20   # background at t=0
    assert np.array_equal(video[-1], got[-1])
    with pytest.raises(IndexError):
        video[6]


@pytest.mark.parametrize("backend", BACKENDS)
def test_phone_video_rotation_is_applied(tmp_path, backend):
    # Phones store portrait video as landscape frames plus a display matrix: the frames must come out upright,
    # as every player shows them (and as the user draws the mask on them).
    import subprocess

    import imageio_ffmpeg

    # 96x64 frames: decord returns garbage for rotated videos only a few dozen pixels wide (48x64 gives
    # 4-channel frames), a size no phone records.
    path = write_video(tmp_path / "landscape.mp4", _frames(4, h=64, w=96), fps=12)
    rotated = tmp_path / "portrait.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90",
                    "-i", str(path), "-c", "copy", str(rotated)], check=True)
    video = VideoFrames(rotated, backend=backend)
    assert video.size == (96, 64)
    plain = VideoFrames(path, backend=backend)
    for t in (0, 3):
        # A display rotation of 90 degrees (counter-clockwise) is numpy's rot90 with k=1.
        assert np.array_equal(video[t], np.rot90(plain[t]))


def test_read_video_iter_video_fps_agree(small_video):
    path, _ = small_video
    eager = read_video(path)
    assert len(eager) == 6
    assert all(np.array_equal(a, b) for a, b in zip(eager, iter_video(path)))
    assert video_fps(path) == pytest.approx(12)


def test_writer_pads_odd_sizes_and_is_atomic(tmp_path):
    frames = [f[:47, :63] for f in _frames(3)]
    out = write_video(tmp_path / "odd.mp4", frames, fps=10)
    assert VideoFrames(out).size == (48, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]

    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / "broken.mp4", fps=10) as writer:
            writer.write(frames[0])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4"]  # neither final nor temp file


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_videos_raise_one_sentence(tmp_path, backend, capfd):
    with pytest.raises(InputError, match="does not exist"):
        VideoFrames(tmp_path / "missing.mp4", backend=backend)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        VideoFrames(tmp_path / "empty.mp4", backend=backend)
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    with pytest.raises(InputError, match="could not read .* as a video") as info:
        VideoFrames(tmp_path / "text.mp4", backend=backend)
    assert "\n" not in str(info.value)
    assert "ERROR" not in capfd.readouterr().err  # native decoder log lines are silenced


def test_zero_frame_video(tmp_path, monkeypatch):
    decord = pytest.importorskip("decord")

    class NoFrames:
        def __init__(self, *a, **k):
            pass

        def __len__(self):
            return 0

        def get_avg_fps(self):
            return 25.0

    # A container with a video stream but no frames is hard to produce with ffmpeg; fake the reader.
    monkeypatch.setattr(decord, "VideoReader", NoFrames)
    (tmp_path / "zero.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="contains no frames"):
        read_video(tmp_path / "zero.mp4")


def test_load_frames_dispatch(tmp_path, small_video):
    path, _ = small_video
    for lazy in (False, True):
        clip = load_frames(path, lazy=lazy)
        assert len(clip) == 6 and clip.names == [f"{t:05d}" for t in range(6)] and clip.fps == pytest.approx(12)
        assert clip.size == (48, 64)
    assert isinstance(load_frames(path, lazy=True).frames, VideoFrames)
    assert isinstance(load_frames(path).frames, list)

    folder = tmp_path / "f"
    folder.mkdir()
    for i, f in enumerate(_frames(2)):
        Image.fromarray(f).save(folder / f"x{i}.png")
    clip = load_frames(folder, lazy=True, fps=5)
    assert clip.names == ["x0", "x1"] and clip.fps == 5 and clip.size == (48, 64)
    assert np.array_equal(clip.frames[1], load_frames(folder).frames[1])

    with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    clip = load_frames(tmp_path / "f.zip")
    assert clip.names == ["x0", "x1"] and clip.fps == video_mod.DEFAULT_FPS

    with pytest.raises(InputError, match="does not exist"):
        load_frames(tmp_path / "nothing.mp4")


# ------------------------------------------------------------------------------------------- DAVIS layout

def test_davis_layout_helpers(tmp_path):
    root = tmp_path / "DAVIS"
    with pytest.raises(DatasetError, match="split list"):
        davis_sequences(root, "val", 2017)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("b\na\n\n")
    assert davis_sequences(root, "val", 2017) == ["a", "b"]
    with pytest.raises(DatasetError, match="frame folder .*JPEGImages.*is missing"):
        frame_paths(root, "a")
    jdir = root / "JPEGImages" / "480p" / "a"
    adir = root / "Annotations" / "480p" / "a"
    jdir.mkdir(parents=True)
    adir.mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no"):
        frame_paths(root, "a")
    for i in (10, 2, 1):
        Image.fromarray(_frames(1)[0]).save(jdir / f"{i:05d}.jpg")
    labels = np.zeros((48, 64), np.uint8)
    labels[:10] = 2
    labels[-3:] = 255  # void
    write_mask(adir / "00000.png", labels)
    assert [p.name for p in frame_paths(root, "a")] == ["00001.jpg", "00002.jpg", "00010.jpg"]
    ann = read_annotation(annotation_paths(root, "a")[0])
    assert ann[:10].min() == 2 and ann[-3:].max() == 0


def test_shared_davis2016(davis2016_root):
    val = davis_sequences(davis2016_root, "val", 2016)
    assert len(val) == 20 and "blackswan" in val
    seq = read_shared_sequence(davis2016_root, "blackswan", max_frames=3)
    assert len(seq.frames) == len(seq.masks) == 3 and seq.names == ["00000", "00001", "00002"]
    assert seq.frames[0].shape == (480, 854, 3) and seq.masks[0].shape == (480, 854)
    assert set(np.unique(seq.masks[0])) == {0, 1}
    raw = np.asarray(Image.open(davis2016_root / "Annotations" / "480p" / "blackswan" / "00000.png"))
    assert np.array_equal(seq.masks[0], (raw > 127).astype(np.uint8))
    with pytest.raises(DatasetError, match="is missing"):
        read_shared_sequence(davis2016_root, "no-such-sequence")


def test_decord_import_keeps_cv2_png_reading(tmp_path):
    # decord's bundled zlib/libpng broke cv2.imread of PNGs when decord was loaded first; the reader must
    # load OpenCV before it. A fresh interpreter, because the import order is process-wide.
    import subprocess
    import sys

    pytest.importorskip("decord")
    png = tmp_path / "x.png"
    cv2_mod = pytest.importorskip("cv2")
    cv2_mod.imwrite(str(png), np.full((8, 8, 3), 200, np.uint8))
    code = (
        "import sys\n"
        "from corrvos.io.video import _have_decord\n"
        "assert _have_decord()\n"
        "import cv2\n"
        f"sys.exit(0 if cv2.imread({str(png)!r}) is not None else 3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
