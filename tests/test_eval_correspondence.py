"""Correspondence metrics on hand-made affinities/keys, and `python -m corrvos.eval --checkpoint` end to end."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from corrvos.eval.__main__ import main
from corrvos.eval.correspondence import cycle_consistency, labels_to_grid, mask_precision_at_k
from corrvos.io.masks import write_mask


def test_mask_precision_at_k_by_hand():
    # 4 memory positions labelled [1, 0, 1, 0]; query 0 has label 1, query 1 label 0.
    affinity = torch.tensor([[0.5, 0.1], [0.3, 0.6], [0.2, 0.1], [0.0, 0.2]])
    mem = torch.tensor([1, 0, 1, 0])
    query = torch.tensor([1, 0])
    # k=2: query 0 keeps 0.5 (label 1, hit) and 0.3 (label 0, miss) -> 0.5/0.8 = 0.625;
    #      query 1 keeps 0.6 and 0.2, both label 0 -> 1.
    assert mask_precision_at_k(affinity, mem, query, k=2).tolist() == pytest.approx([0.625, 1.0])
    # k=4 (all): query 0 -> (0.5 + 0.2)/1.0 = 0.7; query 1 -> (0.6 + 0.2)/1.0 = 0.8.
    assert mask_precision_at_k(affinity, mem, query, k=4).tolist() == pytest.approx([0.7, 0.8])
    # A query whose top-k weights are all zero has no defined precision.
    assert math.isnan(mask_precision_at_k(torch.zeros(4, 1), mem, torch.tensor([0]), k=2)[0].item())


def test_cycle_consistency_by_hand():
    # 3x3 query grid with one-hot keys (the STCN similarity 2k.q - |k|^2 peaks exactly at the equal key).
    q = torch.eye(9)
    # Memory = the query frame's keys in another order: every cycle closes exactly.
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    assert cycle_consistency(q, q[:, perm], (3, 3)).all()
    # Memory = only the key of query position 0: every query's best match is that element, whose best
    # query match is position 0; the cycle closes within one cell for (0,0), (0,1), (1,0), (1,1): 4 of 9.
    ok = cycle_consistency(q, q[:, :1], (3, 3))
    assert ok.view(3, 3).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert cycle_consistency(q, q[:, :1], (3, 3), radius=2).all()


def test_labels_to_grid_majority():
    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[0:12, 0:16] = 2    # 12/16 rows of cell (0,0) -> majority label 2
    labels[0:4, 16:32] = 1    # 4/16 rows of cell (0,1) -> background wins
    assert labels_to_grid(labels).tolist() == [[2, 0], [0, 0]]


def _tiny_davis2017(root, n_frames=5, size=64):
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("toy\n")
    jdir, adir = root / "JPEGImages" / "480p" / "toy", root / "Annotations" / "480p" / "toy"
    jdir.mkdir(parents=True)
    adir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(n_frames):
        labels = np.zeros((size, size), np.uint8)
        labels[8 + t:28 + t, 8:28] = 1
        labels[40:56, 30 + t:50 + t] = 2
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        img[labels == 1] = (220, 40, 40)
        img[labels == 2] = (40, 40, 220)
        Image.fromarray(img).save(jdir / f"{t:05d}.jpg", quality=95)
        write_mask(adir / f"{t:05d}.png", labels)


def test_checkpoint_run_with_correspondence(tmp_path, capsys):
    from corrvos import build_model, save_model

    torch.manual_seed(0)
    ckpt = tmp_path / "stcn-s.safetensors"
    save_model(build_model("stcn-s"), ckpt)
    davis = tmp_path / "davis"
    _tiny_davis2017(davis)
    out = tmp_path / "out"
    rc = main(["--davis", str(davis), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
               "--size", "0", "--correspondence", "--k", "5", "--workers", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in (out / "toy").glob("*.png")) == [f"{t:05d}.png" for t in range(5)]
    first = np.array(Image.open(out / "toy" / "00000.png"))
    assert first.max() == 2  # frame 0 is the given mask, object ids preserved
    assert "FPS (amortised, I/O excluded)" in text and "toy_1" in text and "toy_2" in text
    assert "Correspondence quality" in text and "Cycle-Consistency" in text
    lines = (out / "per-sequence_results.csv").read_text().splitlines()
    assert lines[0] == "Sequence,J-Mean,F-Mean" and [ln.split(",")[0] for ln in lines[1:]] == ["toy_1", "toy_2"]
    overall = next(ln for ln in text.splitlines() if ln.startswith("overall")).split()[1:]
    assert all(0.0 <= float(v) <= 1.0 for v in overall)
