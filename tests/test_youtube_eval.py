"""`python -m corrvos.eval.youtube` on a synthetic YouTube-VOS layout: late objects, all frames vs scored ones, the zip."""
import zipfile

import numpy as np
import pytest
from PIL import Image

import corrvos
from corrvos.eval.youtube import main, open_youtube
from corrvos.io.masks import read_mask, write_mask

N = 15  # frames per video in valid_all_frames; valid keeps every 5th


def _frame(t: int) -> np.ndarray:
    f = np.full((64, 96, 3), (60, 90, 60), np.uint8)
    f[8:28, 8 + 2 * t:28 + 2 * t] = (230, 40, 40)
    f[36:60, 60:84] = (40, 40, 230)
    return f


@pytest.fixture(scope="module")
def youtube(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("ytvos")
    for video in ("vid_a", "vid_b"):
        for split, stride in (("valid", 5), ("valid_all_frames", 1)):
            d = root / split / "JPEGImages" / video
            d.mkdir(parents=True)
            for t in range(0, N, stride):
                Image.fromarray(_frame(t)).save(d / f"{t:05d}.jpg", quality=95)
        (root / "valid" / "Annotations" / video).mkdir(parents=True)
    # vid_a: object 1 from frame 0, object 2 first annotated at frame 5 (its PNG holds only object 2).
    first = np.zeros((64, 96), np.uint8)
    first[8:28, 8:28] = 1
    write_mask(root / "valid" / "Annotations" / "vid_a" / "00000.png", first)
    late = np.zeros((64, 96), np.uint8)
    late[36:60, 60:84] = 2
    write_mask(root / "valid" / "Annotations" / "vid_a" / "00005.png", late)
    # vid_b: nothing before frame 5, where object 3 appears.
    b = np.zeros((64, 96), np.uint8)
    b[36:60, 60:84] = 3
    write_mask(root / "valid" / "Annotations" / "vid_b" / "00005.png", b)
    torch.manual_seed(0)
    ckpt = root / "stcn-s.safetensors"
    corrvos.save_model(corrvos.build_model("stcn-s"), ckpt)
    return root, ckpt, first, late, b


def _by_hand(ckpt, frames, given):
    """Reference: a Tracker stepped over ``frames`` with the new objects of ``given`` {t: mask}."""
    tracker = corrvos.Tracker(corrvos.load_model(ckpt, device="cpu"), device="cpu", size=None)
    out = {}
    for t, f in enumerate(frames):
        if tracker.num_objects == 0 and t not in given:
            out[t] = np.zeros(f.shape[:2], np.uint8)
            continue
        prob = tracker.step(f, given.get(t), last=t == len(frames) - 1)
        out[t] = tracker.labels_from(prob)
    return out


def test_all_frames_run_scored_frames_written(youtube, tmp_path, capsys):
    root, ckpt, first, late, b = youtube
    out = tmp_path / "out"
    assert main(["--root", str(root), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--size", "0",
                 "--no-progress"]) == 0
    assert "2 videos: 6 masks written" in capsys.readouterr().out
    for video in ("vid_a", "vid_b"):
        assert sorted(p.name for p in (out / "Annotations" / video).iterdir()) == ["00000.png", "00005.png", "00010.png"]
    # Decoded JPEGs, as the runner reads them.
    frames = [np.array(Image.open(root / "valid_all_frames" / "JPEGImages" / "vid_a" / f"{t:05d}.jpg").convert("RGB"))
              for t in range(N)]
    expected = _by_hand(ckpt, frames, {0: first, 5: late})
    for t in (0, 5, 10):
        assert np.array_equal(read_mask(out / "Annotations" / "vid_a" / f"{t:05d}.png"), expected[t])
    got5 = read_mask(out / "Annotations" / "vid_a" / "00005.png")
    assert (got5[late == 2] == 2).all()  # the late object's given mask is its mask there
    assert not (read_mask(out / "Annotations" / "vid_a" / "00000.png") == 2).any()
    assert not read_mask(out / "Annotations" / "vid_b" / "00000.png").any()  # before its first annotation: empty
    assert (read_mask(out / "Annotations" / "vid_b" / "00005.png")[b == 3] == 3).all()
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"Annotations/{v}/{t:05d}.png" for v in ("vid_a", "vid_b") for t in (0, 5, 10))


def test_scored_frames_only_runs_fewer_frames(youtube, tmp_path, capsys):
    root, ckpt, *_ = youtube
    assert main(["--root", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--size", "0", "--no-progress", "--scored-frames-only", "--videos", "vid_b"]) == 0
    # vid_b on the scored frames: frame 00000 is empty (no model call), 00005 and 00010 go through the model.
    assert "1 videos: 3 masks written" in capsys.readouterr().out
    assert [v.run for v in open_youtube(root, all_frames=False)] == [["00000", "00005", "00010"]] * 2
    assert len(open_youtube(root)[0].run) == N  # valid_all_frames is used when present


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "test"], "test/JPEGImages is missing"),
        (["--videos", "nope"], "the valid split has no video 'nope'"),
        (["--num-prototypes", "8"], "--num-prototypes configures XMem's memory"),
    ],
)
def test_bad_input_is_one_line(youtube, tmp_path, extra, message, capsys):
    root, ckpt, *_ = youtube
    assert main(["--root", str(root), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_all_frames_flag_needs_the_dense_folder(youtube, tmp_path):
    root, *_ = youtube
    sparse_only = tmp_path / "yt"
    (sparse_only / "valid").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations"):
        (sparse_only / "valid" / sub).symlink_to(root / "valid" / sub)
    from corrvos.errors import DatasetError

    with pytest.raises(DatasetError, match="--all-frames needs"):
        open_youtube(sparse_only, all_frames=True)
    assert [len(v.run) for v in open_youtube(sparse_only)] == [3, 3]
