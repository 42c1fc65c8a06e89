"""How sharp a checkpoint's memory read is: key norms and the top-1 softmax weight of frame 10 -> frame 0.

    .venv/bin/python scripts/key_norms.py --davis ../shared/data/davis2016 W1.safetensors W2.safetensors ...

For each checkpoint and each of a few DAVIS-2016 val sequences, frames 0 and 10 are resized to 192x352, their
keys encoded, and frame 10's pixels read from frame 0 with the one similarity function (no top-k). Prints the
mean key norm, the mean largest softmax weight (1.0 = every pixel copies exactly one memory pixel) and the
similarity range. Written to diagnose CPU run 4 (docs/training.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from corrvos import load_model  # noqa: E402
from corrvos.eval.davis_eval import open_davis  # noqa: E402
from corrvos.imageops import normalize, to_float_image  # noqa: E402
from corrvos.models.similarity import similarity  # noqa: E402


def frame_pairs(davis: Path, sequences: list[str]) -> torch.Tensor:
    split = open_davis(davis, "val", None, sequences)
    images = [cv2.resize(np.asarray(split.frames(seq)[t]), (352, 192)) for seq in split.sequences for t in (0, 10)]
    return normalize(torch.stack([to_float_image(im) for im in images]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--davis", type=Path, required=True)
    ap.add_argument("--sequences", default="blackswan,dog")
    args = ap.parse_args()
    x = frame_pairs(args.davis, args.sequences.split(","))
    for path in args.checkpoints:
        model = load_model(path)
        with torch.no_grad():
            key = model.encode_key(x, need_shrinkage=False, need_selection=False).key
            top1, lo, hi = [], [], []
            for i in range(0, key.shape[0], 2):
                sim = similarity(key[i:i + 1].flatten(2), key[i + 1:i + 2].flatten(2))  # (1, memory, query)
                top1.append(torch.softmax(sim, dim=1).max(dim=1).values.mean().item())
                lo.append(sim.min().item())
                hi.append(sim.max().item())
            norm = key.norm(dim=1).mean().item()
        print(f"{path}: mean |key| {norm:.2f}, mean top-1 read weight {np.mean(top1):.3f}, "
              f"similarity {min(lo):.0f} .. {max(hi):.0f}")


if __name__ == "__main__":
    main()
