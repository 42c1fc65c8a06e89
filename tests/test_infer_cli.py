"""`python -m corrvos.infer` end to end (subprocess), and its one-line errors for each bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import corrvos
from corrvos.infer import main
from corrvos.io import VideoFrames, read_mask, read_shared_sequence, write_mask, write_video

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=120):
    proc = subprocess.run(
        [sys.executable, "-m", "corrvos.infer", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    return proc


def _assert_one_line_error(returncode, stderr, pattern):
    assert returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "stcn-s-random.safetensors"
    corrvos.save_model(corrvos.build_model("stcn-s"), path)
    return path


@pytest.fixture(scope="module")
def synthetic_clip(tmp_path_factory):
    """A 5-frame 64x96 video with two objects marked in a palette first-frame mask."""
    d = tmp_path_factory.mktemp("clip")
    frames = []
    for t in range(5):
        f = np.full((64, 96, 3), (60, 90, 60), np.uint8)
        f[10:30, 10 + 4 * t:30 + 4 * t] = (230, 40, 40)
        f[40:60, 60:80] = (40, 40, 230)
        frames.append(f)
    write_video(d / "clip.mp4", frames, fps=8)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:30] = 1
    mask[40:60, 60:80] = 2
    write_mask(d / "mask.png", mask)
    return d / "clip.mp4", d / "mask.png"


def test_help_documents_every_option():
    proc = _cli("--help", timeout=30)
    assert proc.returncode == 0
    for opt in ("--checkpoint", "--video", "--frames", "--mask", "--backward", "--out", "--device", "--size", "--mem-every",
                "--top-k", "--fps", "--no-video", "--soft-masks"):
        assert opt in proc.stdout


def test_cli_on_davis2016_val_sequence(tmp_path, davis2016_root, tiny_checkpoint):
    seq = read_shared_sequence(davis2016_root, "blackswan", max_frames=6)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for name, frame in zip(seq.names, seq.frames):
        Image.fromarray(frame).save(frames_dir / f"{name}.jpg", quality=95)
    mask_path = davis2016_root / "Annotations" / "480p" / "blackswan" / "00000.png"  # original 0/255 file
    out = tmp_path / "out"
    proc = _cli("--checkpoint", tiny_checkpoint, "--frames", frames_dir, "--mask", mask_path, "--out", out,
                "--device", "cpu", "--size", "480", timeout=300)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == seq.names  # one mask per input frame, same names
    for p in pngs:
        with Image.open(p) as img:
            assert img.mode == "P" and img.size == (854, 480)
        assert set(np.unique(read_mask(p))) <= {0, 1}
    assert np.array_equal(read_mask(pngs[0]), seq.masks[0])  # the given first-frame mask comes back unchanged
    video = VideoFrames(out / "overlay.mp4")
    assert len(video) == 6 and video.size == (480, 854)
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".png",)) == ["overlay.mp4"]  # no temp files


def test_cli_on_video_two_objects_keeps_label_ids(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    # In-process (main(argv)) to spare a second torch import; the DAVIS test above covers the subprocess.
    video, mask = synthetic_clip
    out = tmp_path / "out"
    code = main(["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--mask", str(mask), "--out", str(out),
                 "--device", "cpu", "--size", "-1", "--mem-every", "2", "--top-k", "10"])
    assert code == 0, capfd.readouterr().err
    assert [p.name for p in sorted(out.glob("*.png"))] == [f"{t:05d}.png" for t in range(5)]
    assert np.array_equal(read_mask(out / "00000.png"), read_mask(mask))
    assert len(VideoFrames(out / "overlay.mp4")) == 5


def test_cli_renumbers_sparse_ids_and_maps_them_back(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    video, mask = synthetic_clip
    sparse = read_mask(mask) * 3  # ids {3, 6}: the tracker sees 1..2, the output must say 3 and 6 again
    write_mask(tmp_path / "sparse.png", sparse)
    code = main(["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--mask", str(tmp_path / "sparse.png"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--size", "-1", "--no-video"])
    assert code == 0, capfd.readouterr().err
    assert not (tmp_path / "out" / "overlay.mp4").exists()
    assert np.array_equal(read_mask(tmp_path / "out" / "00000.png"), sparse)
    for t in range(1, 5):
        assert set(np.unique(read_mask(tmp_path / "out" / f"{t:05d}.png"))) <= {0, 3, 6}


def test_cli_unreadable_video(tmp_path, synthetic_clip, tiny_checkpoint):
    _, mask = synthetic_clip
    bad = tmp_path / "broken.mp4"
    bad.write_text("definitely not a video\n" * 50)
    proc = _cli("--checkpoint", tiny_checkpoint, "--video", bad, "--mask", mask, "--out", tmp_path / "o")
    _assert_one_line_error(proc.returncode, proc.stderr, "as a video")
    assert not (tmp_path / "o").exists()


def test_cli_mask_of_wrong_size(tmp_path, synthetic_clip, tiny_checkpoint):
    video, _ = synthetic_clip
    big = np.zeros((128, 192), np.uint8)
    big[5:50, 5:50] = 1
    write_mask(tmp_path / "big.png", big)
    proc = _cli("--checkpoint", tiny_checkpoint, "--video", video, "--mask", tmp_path / "big.png", "--out", tmp_path / "o")
    _assert_one_line_error(proc.returncode, proc.stderr, "the mask is 128x192 (height x width) but the frames are 64x96")


def test_cli_empty_mask(tmp_path, synthetic_clip, tiny_checkpoint):
    video, _ = synthetic_clip
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(tmp_path / "empty.png")
    proc = _cli("--checkpoint", tiny_checkpoint, "--video", video, "--mask", tmp_path / "empty.png", "--out", tmp_path / "o")
    _assert_one_line_error(proc.returncode, proc.stderr, "has no object pixels")


def test_cli_missing_checkpoint(tmp_path, synthetic_clip):
    video, mask = synthetic_clip
    proc = _cli("--checkpoint", tmp_path / "nope.safetensors", "--video", video, "--mask", mask, "--out", tmp_path / "o")
    _assert_one_line_error(proc.returncode, proc.stderr, "does not exist")


def test_cli_corrupt_checkpoint(tmp_path, synthetic_clip, capfd):
    video, mask = synthetic_clip
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    code = main(["--checkpoint", str(junk), "--video", str(video), "--mask", str(mask), "--out", str(tmp_path / "o")])
    _assert_one_line_error(code, capfd.readouterr().err, "junk.pth")


def _late_object_masks(folder: Path, first_mask: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Frame 1: only object 1 of the clip's mask (as id 4); frame 3: a new object (id 9) in the lower-left
    corner, YouTube-VOS style. Returns the mask folder and the two masks."""
    first = read_mask(first_mask)
    folder.mkdir()
    m1 = np.where(first == 1, 4, 0).astype(np.uint8)
    m3 = np.zeros_like(first)
    m3[45:60, 5:25] = 9
    write_mask(folder / "00001.png", m1)
    write_mask(folder / "00003.png", m3)
    return folder, m1, m3


def test_cli_mask_folder_adds_objects_later_and_starts_at_the_first_annotation(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    video, mask = synthetic_clip
    masks, m1, m3 = _late_object_masks(tmp_path / "masks", mask)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--mask", str(masks), "--out", str(out),
                 "--device", "cpu", "--size", "-1", "--no-video"])
    assert code == 0, capfd.readouterr().err
    labels = [read_mask(out / f"{t:05d}.png") for t in range(5)]
    assert not labels[0].any()  # before the first annotated frame: empty
    assert np.array_equal(labels[1], m1)
    assert set(np.unique(labels[2])) <= {0, 4}  # object 9 does not exist before frame 3
    # From frame 3 on object 9 is tracked; the mask of frame 3 speaks for 9 only, so 4 keeps its prediction.
    assert np.array_equal(labels[3] == 9, m3 == 9)
    assert set(np.unique(labels[4])) <= {0, 4, 9}


def test_cli_mask_folder_errors(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    video, mask = synthetic_clip
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--out", str(tmp_path / "o"), "--no-video"]
    _assert_one_line_error(main([*args, "--mask", str(empty)]), capfd.readouterr().err, "holds no PNG files")
    stray = tmp_path / "stray"
    stray.mkdir()
    write_mask(stray / "first.png", read_mask(mask))
    _assert_one_line_error(main([*args, "--mask", str(stray)]), capfd.readouterr().err, "first.png in")
    blank = tmp_path / "blank"
    blank.mkdir()
    write_mask(blank / "00000.png", read_mask(mask))
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(blank / "00002.png")
    code = main([*args, "--mask", str(blank)])
    _assert_one_line_error(code, capfd.readouterr().err, "00002.png in blank has no object pixels")
    small = tmp_path / "small"
    small.mkdir()
    write_mask(small / "00000.png", np.ones((10, 12), np.uint8))
    _assert_one_line_error(main([*args, "--mask", str(small)]), capfd.readouterr().err, "00000.png: the mask is 10x12")


def test_cli_backward_tracks_the_frames_before_the_first_annotation(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    video, mask = synthetic_clip
    masks = tmp_path / "masks"
    masks.mkdir()
    m2 = read_mask(mask)
    write_mask(masks / "00002.png", m2)
    out = tmp_path / "out"
    code = main(["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--mask", str(masks), "--out", str(out),
                 "--device", "cpu", "--size", "-1", "--backward"])
    assert code == 0, capfd.readouterr().err
    labels = [read_mask(out / f"{t:05d}.png") for t in range(5)]
    assert np.array_equal(labels[2], m2)
    # Frames 1 and 0 are what a tracker gives on the reversed clip 2, 1, 0 from that mask.
    tracker = corrvos.Tracker(corrvos.load_model(tiny_checkpoint, device="cpu"), device="cpu", size=None,
                              match_cache_frames=0)
    frames = VideoFrames(video)
    expected = dict(tracker.propagate([frames[2], frames[1], frames[0]], m2))
    assert np.array_equal(labels[1], expected[1]) and np.array_equal(labels[0], expected[2])
    assert len(VideoFrames(out / "overlay.mp4")) == 5


def test_cli_soft_masks_per_object_under_the_input_ids(tmp_path, synthetic_clip, tiny_checkpoint, capfd):
    video, mask = synthetic_clip
    masks, m1, m3 = _late_object_masks(tmp_path / "masks", mask)  # object 4 from frame 1, object 9 from frame 3
    out = tmp_path / "out"
    code = main(["--checkpoint", str(tiny_checkpoint), "--video", str(video), "--mask", str(masks), "--out", str(out),
                 "--device", "cpu", "--size", "-1", "--no-video", "--backward", "--soft-masks"])
    assert code == 0, capfd.readouterr().err
    soft_dir = out / "soft_masks"
    assert sorted(p.name for p in soft_dir.iterdir()) == ["obj4", "obj9"]
    labels, soft = [], []
    for t in range(5):
        labels.append(read_mask(out / f"{t:05d}.png"))
        frame_soft = {}
        for oid in (4, 9):
            with Image.open(soft_dir / f"obj{oid}" / f"{t:05d}.png") as img:
                assert img.mode == "L" and img.size == (96, 64)
                frame_soft[oid] = np.asarray(img).astype(int)
        soft.append(frame_soft)
    # Given frames carry the user's masks exactly; an object not yet tracked is empty.
    assert np.array_equal(soft[1][4], (m1 == 4) * 255) and not soft[1][9].any()
    assert np.array_equal(soft[3][9], (m3 == 9) * 255)
    assert soft[0][4].any() and not soft[0][9].any()  # frame 0 comes from the backward pass
    # Predicted frames: the written label is the most probable object (up to the 1/255 rounding).
    for t in (0, 2, 4):
        for oid in (4, 9):
            # The strongest competitor: another object or the background (what the objects leave of 255).
            other = np.maximum.reduce([s for k, s in soft[t].items() if k != oid] + [255 - sum(soft[t].values())])
            inside = labels[t] == oid
            assert (soft[t][oid][inside] >= other[inside] - 2).all()  # 2: each PNG rounds to 1/255
            assert (soft[t][oid][~inside] <= other[~inside] + 2).all()
