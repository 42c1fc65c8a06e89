"""Turn your own video and its masks into a training folder (DAVIS layout) for fine-tuning.

    python -m corrvos.training.prepare --video clip.mp4 --masks masks/ --out mydata

writes ``mydata/JPEGImages/480p/clip/<frame>.jpg`` and ``mydata/Annotations/480p/clip/<frame>.png`` for every
frame that has a mask, and lists ``clip`` in ``mydata/ImageSets/2017/train.txt`` (``--split val`` for a held-out
sequence: ``train.py --eval-data`` and ``python -m corrvos.eval --davis mydata`` score those). ``masks/`` holds
one PNG per annotated frame, named after its frame (00000.png, ... for a video): the output of
``python -m corrvos.infer`` or the app's export, checked and corrected. Run it once per video with the same
``--out``; then ``python corrvos/train.py --stage main --data mydata --load CKPT ...``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from corrvos.errors import CorrvosError, InputError
from corrvos.io.masks import read_given_masks, write_mask
from corrvos.io.video import load_frames
from corrvos.training.framestore import shrink_to_short_side
from corrvos.training.samples import ClipConfig

SUBSET = "480p"  # the DAVIS layout's resolution folder, whatever the frames' real size
SPLITS = ("train", "val")
MAIN_STAGE_FRAMES = {arch: ClipConfig.preset(arch).num_frames for arch in ("stcn", "xmem")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m corrvos.training.prepare",
        description="Write a video and its masks as one sequence of a DAVIS-layout training folder (for train.py --data).",
    )
    p.add_argument("--video", required=True, type=Path, help="video file, folder of frames or zip of frames")
    p.add_argument("--masks", required=True, type=Path,
                   help="folder with one PNG per annotated frame, named after its frame (palette, 0/255 or RGB); "
                        "all-background masks are kept (the object is out of view there)")
    p.add_argument("--out", required=True, type=Path, help="training folder; several videos may share it")
    p.add_argument("--name", default=None, help="sequence name (default: the video's file or folder name)")
    p.add_argument("--size", type=int, default=480,
                   help="shrink frames whose shorter side is larger to this many pixels, as DAVIS' 480p "
                        "(training crops are taken from these frames; 0 keeps the input size; default 480)")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="list the sequence for training (default) or as held-out data for evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace a sequence of the same name in --out")
    return p


def list_in_split(out: Path, name: str, split: str) -> None:
    """Add ``name`` to ``OUT/ImageSets/2017/<split>.txt`` (the DAVIS-2017 list train.py and the evaluation read)."""
    folder = out / "ImageSets" / "2017"
    folder.mkdir(parents=True, exist_ok=True)
    for other in SPLITS:
        listing = folder / f"{other}.txt"
        names = listing.read_text().split() if listing.is_file() else []
        if other != split and name in names:
            names.remove(name)  # a sequence is in one split only: moved by --overwrite with another --split
        elif other == split and name not in names:
            names.append(name)
        else:
            continue
        tmp = listing.with_name(f".{listing.name}.tmp")
        tmp.write_text("".join(f"{n}\n" for n in names))
        tmp.replace(listing)


def unlisted_sequences(out: Path) -> list[str]:
    """Sequence folders of ``out`` that no split list names (e.g. copied in by hand before prepare made the lists)."""
    listed = {n for split in SPLITS for f in [out / "ImageSets" / "2017" / f"{split}.txt"] if f.is_file()
              for n in f.read_text().split()}
    frames = out / "JPEGImages" / SUBSET
    return sorted(d.name for d in frames.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in listed)


def prepare(video: Path, masks: Path, out: Path, name: str | None = None, size: int = 480,
            overwrite: bool = False, progress: bool = True, split: str = "train") -> Path:
    """Write one sequence; returns its frame folder. Raises InputError (one sentence) on bad input."""
    if size < 0:
        raise InputError(f"--size must be 0 (input size) or a number of pixels, not {size}.")
    if split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}.")
    clip = load_frames(video, lazy=True)
    if not masks.is_dir():
        raise InputError(f"--masks {masks} is not a folder; give a folder of PNG masks named after their frames.")
    given = read_given_masks(masks, clip.names, clip.size, allow_empty=True)
    if not any(m.any() for m in given.values()):
        raise InputError(f"every mask in {masks} is empty; a training sequence needs at least one object.")
    name = name or (video.name if video.is_dir() else video.stem)
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise InputError(f"the sequence name {name!r} cannot be a folder name; pass --name.")
    frame_dir, mask_dir = out / "JPEGImages" / SUBSET / name, out / "Annotations" / SUBSET / name
    if (frame_dir.exists() or mask_dir.exists()) and not overwrite:
        raise InputError(f"{out} already holds a sequence named {name!r}; pass another --name, or --overwrite.")
    # Written next to the final folders and renamed at the end: a failed run leaves no half sequence behind.
    tmp_frames, tmp_masks = frame_dir.with_name(f".{name}.partial"), mask_dir.with_name(f".{name}.partial")
    for d in (tmp_frames, tmp_masks):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    try:
        for t in tqdm(sorted(given), desc=f"writing {name}", unit="frame", disable=not progress):
            image, labels = shrink_to_short_side(np.asarray(clip.frames[t]), given[t], size or None)
            stem = clip.names[t]
            if not cv2.imwrite(str(tmp_frames / f"{stem}.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise InputError(f"could not write {tmp_frames / stem}.jpg; check that {out} is writable.")
            write_mask(tmp_masks / f"{stem}.png", labels)
        for tmp, final in ((tmp_frames, frame_dir), (tmp_masks, mask_dir)):
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    finally:
        for d in (tmp_frames, tmp_masks):
            shutil.rmtree(d, ignore_errors=True)
    list_in_split(out, name, split)
    return frame_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        frame_dir = prepare(args.video, args.masks, args.out, args.name, args.size, args.overwrite, split=args.split)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = len(list(frame_dir.glob("*.jpg")))
    use = (f"train with: python corrvos/train.py --stage main --data {args.out} ..." if args.split == "train" else
           f"score with: train.py --eval-data {args.out}, or python -m corrvos.eval --davis {args.out} --split val ...")
    print(f"wrote {n} frames and masks of {frame_dir.name!r} to {args.out} ({args.split} split; {use})")
    unlisted = unlisted_sequences(args.out)
    if unlisted:
        print(f"note: {', '.join(unlisted[:5])} in {args.out} are in no ImageSets/2017 list, so train.py and the "
              "evaluation skip them; run prepare for them (or add their names to train.txt)")
    if args.split == "train" and n < MAIN_STAGE_FRAMES["xmem"]:
        # The main stage samples clips of annotated frames; the static stage makes clips from single frames.
        print(f"note: the main stage uses a sequence only with {MAIN_STAGE_FRAMES['stcn']} (STCN) or "
              f"{MAIN_STAGE_FRAMES['xmem']} (XMem) annotated frames; with fewer, train with --stage static")
    return 0


if __name__ == "__main__":
    sys.exit(main())
