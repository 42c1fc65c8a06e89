"""Split every sequence of a DAVIS split in time, for measuring fine-tuning (docs/training.md, "Fine-tuning on
your own videos"): frames 0..k-1 with their masks become training sequence <seq>, frames k..n-1 the held-out
sequence <seq>_rest (scored from the mask of frame k), both written by `python -m corrvos.training.prepare`.

    python scripts/davis_finetune_split.py --davis DAVIS2016 --out ftdata [--fraction 0.3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrvos.io.davis import davis_sequences  # noqa: E402
from corrvos.training.prepare import prepare  # noqa: E402


def link_all(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for p in paths:
        os.symlink(p.resolve(), folder / p.name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--davis", required=True, type=Path, help="DAVIS folder (JPEGImages/480p, Annotations/480p, ImageSets)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fraction", type=float, default=0.3, help="share of each video's frames used for training")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in davis_sequences(args.davis, args.split):
            frames = sorted((args.davis / "JPEGImages" / "480p" / name).glob("*.jpg"))
            masks = sorted((args.davis / "Annotations" / "480p" / name).glob("*.png"))
            if [f.stem for f in frames] != [m.stem for m in masks]:
                sys.exit(f"error: {name} does not have one mask per frame; this split needs fully annotated videos.")
            k = max(3, round(args.fraction * len(frames)))
            for part, seq, split in ((slice(0, k), name, "train"), (slice(k, None), f"{name}_rest", "val")):
                fdir = link_all(frames[part], Path(tmp) / seq / "frames")
                mdir = link_all(masks[part], Path(tmp) / seq / "masks")
                prepare(fdir, mdir, args.out, name=seq, split=split, overwrite=True, progress=False)
            print(f"{name}: {k} training frames, {len(frames) - k} held out")


if __name__ == "__main__":
    main()
