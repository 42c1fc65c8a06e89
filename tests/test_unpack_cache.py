"""The compact-copy cache is safe when several processes unpack into it at once (DDP ranks, two trainings)."""
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corrvos.io.video import write_video
from corrvos.training.layouts import find_sequences, unpack_compact

NAMES = ["alpha", "beta", "gamma", "delta"]
FRAMES = 6


def _make_compact(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "videos").mkdir(parents=True)
    for name in NAMES:
        frames = [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(FRAMES)]
        write_video(root / "videos" / f"{name}.mp4", frames, fps=10)
        adir = root / "Annotations" / "480p" / name
        adir.mkdir(parents=True)
        for t in range(FRAMES):
            mask = np.zeros((32, 48), np.uint8)
            mask[4 + t:20 + t, 8:30] = 255
            Image.fromarray(mask).save(adir / f"{t:05d}.png")


def _unpack(root: str, out: str, barrier, errors) -> None:
    barrier.wait()  # start together so both decode the same sequence at the same moment
    try:
        unpack_compact(root, out, NAMES)
    except Exception as err:  # noqa: BLE001  (reported to the parent, which fails the test)
        errors.put(f"{type(err).__name__}: {err}")


def test_two_processes_unpack_the_same_cache(tmp_path):
    root, out = tmp_path / "compact", tmp_path / "cache"
    _make_compact(root)
    ctx = mp.get_context("spawn")
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_unpack, args=(str(root), str(out), barrier, errors)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    reported = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert reported == []
    seqs = find_sequences(out, "train", NAMES)
    assert [s.name for s in seqs] == NAMES
    assert all(len(s.frames) == FRAMES and len(s.masks) == FRAMES for s in seqs)
    # No temporary folder is left behind, and a later call finds everything complete.
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert leftovers == []
    before = {p: p.stat().st_mtime_ns for p in (out / "JPEGImages" / "480p").rglob("*.jpg")}
    unpack_compact(root, out, NAMES)
    assert {p: p.stat().st_mtime_ns for p in (out / "JPEGImages" / "480p").rglob("*.jpg")} == before


def test_an_interrupted_unpack_is_redone(tmp_path):
    root, out = tmp_path / "compact", tmp_path / "cache"
    _make_compact(root)
    # A run killed between its two renames leaves frames without masks, and a stray temporary folder.
    (out / "JPEGImages" / "480p" / "alpha").mkdir(parents=True)
    (out / "JPEGImages" / "480p" / ".beta.x.tmp").mkdir(parents=True)
    unpack_compact(root, out, NAMES)
    seqs = find_sequences(out, "train")
    assert [s.name for s in seqs] == sorted(NAMES)
    assert all(len(s.frames) == FRAMES for s in seqs)


def test_missing_video_is_one_sentence(tmp_path):
    from corrvos.errors import DatasetError

    root = tmp_path / "compact"
    _make_compact(root)
    (root / "videos" / "beta.mp4").unlink()
    with pytest.raises(DatasetError, match="no video or masks for sequence 'beta'"):
        unpack_compact(root, tmp_path / "cache", NAMES)
