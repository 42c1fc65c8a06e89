"""Selective Search proposal cache: box filter, file format, resume, CLI (on 3-4 tiny frames only)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corrvos.errors import DatasetError
from corrvos.training.proposals import (AREA_RANGE, compute_proposals, filter_boxes, load_proposals, save_proposals,
                                        selective_search)
from training_data_helpers import make_layout

ROOT = Path(__file__).resolve().parents[1]


def test_filter_rules():
    w, h = 200, 100  # image area 20000
    rects = np.array([
        [0, 0, 100, 50],    # area 0.25, aspect 2 -> kept
        [10, 10, 20, 20],   # area 0.02 -> too small
        [0, 0, 190, 90],    # area 0.855 -> too large
        [0, 0, 150, 40],    # area 0.3, aspect 3.75 -> too elongated
        [0, 0, 40, 90],     # area 0.18, aspect 0.44 -> kept
        [0, 0, 28, 90],     # aspect 0.31 < 1/3 -> dropped
        [5, 5, 60, 30],     # area 0.09 exactly (0.3^2), aspect 2 -> kept
    ])
    boxes = filter_boxes(rects, w, h)
    assert len(boxes) == 3
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (areas >= AREA_RANGE[0] - 1e-9).all() and (areas <= AREA_RANGE[1]).all()
    assert np.allclose(sorted(map(tuple, boxes)), sorted([(0, 0, 0.5, 0.5), (0, 0, 0.2, 0.9), (0.025, 0.05, 0.325, 0.35)]))
    assert filter_boxes(np.zeros((0, 4)), w, h).shape == (0, 4)


def test_save_load_roundtrip(tmp_path):
    boxes = {"s/00001": np.array([[0.1, 0.2, 0.5, 0.9]]), "s/00000": np.zeros((0, 4)),
             "t/00003": np.array([[0, 0, 1, 1], [0.25, 0.25, 0.75, 0.75]])}
    save_proposals(tmp_path / "p.npz", boxes, {"size": 240})
    cache = load_proposals(tmp_path / "p.npz")
    assert cache.keys == ["s/00000", "s/00001", "t/00003"] and cache.counts().tolist() == [0, 1, 2]
    assert np.allclose(cache.get("t/00003"), boxes["t/00003"], atol=1e-4)
    assert cache.get("missing").shape == (0, 4) and "s/00001" in cache
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DatasetError):
        load_proposals(tmp_path / "nope.npz")


def test_selective_search_on_a_frame():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 30, (90, 120, 3), dtype=np.uint8)
    img[10:70, 20:80] = (220, 40, 40)
    boxes, raw = selective_search(img)
    assert raw >= len(boxes) > 0
    assert (boxes >= 0).all() and (boxes <= 1).all()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (areas >= 0.09 - 1e-6).all() and (areas <= 0.64 + 1e-6).all()
    # The red square (0.5 x 0.67 of the frame) is among the proposals.
    target = np.array([20 / 120, 10 / 90, 80 / 120, 70 / 90])
    assert np.abs(boxes - target).max(1).min() < 0.05


def test_resume_skips_done_frames(tmp_path):
    root = make_layout(tmp_path / "yt", names=("a",), n=4)
    out = tmp_path / "p.npz"
    first = compute_proposals(root, out, workers=1, limit=2, progress=False)
    assert first["processed"] == 2 and first["skipped"] == 0 and not first["complete"]
    partial = load_proposals(out)
    assert len(partial) == 2 and partial.meta["complete"] is False
    done = {k: partial.get(k) for k in partial.keys}
    second = compute_proposals(root, out, workers=1, progress=False)
    assert second["skipped"] == 2 and second["processed"] == 2 and second["complete"]
    assert set(second["kept"]) == {"a/00000", "a/00001", "a/00002", "a/00003"} - set(done)
    final = load_proposals(out)
    assert final.keys == ["a/00000", "a/00001", "a/00002", "a/00003"] and final.meta["complete"] is True
    for k, v in done.items():
        assert np.array_equal(final.get(k), v)
    with pytest.raises(DatasetError):
        compute_proposals(root, out, workers=1, size=120, progress=False)


def test_cli_three_frames_two_workers(tmp_path):
    root = make_layout(tmp_path / "yt", names=("a",), n=3)
    out = tmp_path / "cache" / "p.npz"
    cmd = [sys.executable, "-m", "corrvos.training.proposals", "--root", str(root), "--out", str(out), "--workers", "2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "3 frames processed" in res.stdout and "boxes kept per frame" in res.stdout
    assert len(load_proposals(out)) == 3
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "0 frames processed, 3 already done" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "corrvos.training.proposals", "--root", str(tmp_path / "none"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_compact_copy_two_frames(davis2016_root, tmp_path):
    out = tmp_path / "p.npz"
    stats = compute_proposals(davis2016_root, out, workers=1, size=120, sequences=["dog-agility"], limit=2,
                              progress=False)
    assert stats["total"] == 25 and stats["processed"] == 2
    cache = load_proposals(out)
    assert cache.keys == ["dog-agility/00000", "dog-agility/00001"]
    assert cache.counts().min() > 0
