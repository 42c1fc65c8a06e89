"""YouTube-VOS inference: masks for a CodaLab submission (the benchmark is scored on the server).

    python -m corrvos.eval.youtube --root YouTubeVOS --split valid --checkpoint model.safetensors --out yt/

Layout (the official release): ``ROOT/<split>/JPEGImages/<video>/*.jpg`` (every 5th frame, the ones scored),
``ROOT/<split>/Annotations/<video>/*.png`` (one PNG per frame where objects first appear, holding those
objects), optionally ``ROOT/<split>_all_frames/JPEGImages/<video>/*.jpg`` (every frame).

As upstream (STCN / XMem ``eval_youtube``): objects join the tracker at the frame of their first mask (a
mask's ids that are already tracked are ignored there), frames before the first annotation are empty, and
with ``--all-frames`` the tracker runs on every frame while only the scored frames are written. Output:
``OUT/Annotations/<video>/<frame>.png`` (palette PNGs with the annotation's object ids) and
``OUT/submission.zip`` (an ``Annotations/`` folder, what CodaLab takes).
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from corrvos.errors import CheckpointError, CorrvosError, DatasetError
from corrvos.tracker_options import add_size_argument, add_tracker_arguments, processing_size, run_device, tracker_options

if TYPE_CHECKING:  # predict imports torch; the command line checks its arguments first
    from corrvos.eval.predict import RunStats


@dataclass(frozen=True)
class YouTubeVideo:
    name: str
    frames_dir: Path          # the frames the tracker runs on
    scored: list[str]         # frame stems written (the split's JPEGImages)
    run: list[str]            # frame stems processed, in order (== scored without --all-frames)
    annotations: dict[str, Path]  # frame stem -> PNG of the objects first seen there


def open_youtube(root: str | os.PathLike, split: str = "valid", all_frames: bool | None = None,
                 videos: list[str] | None = None) -> list[YouTubeVideo]:
    """The videos of a YouTube-VOS split. ``all_frames``: None uses ``<split>_all_frames`` when present."""
    root = Path(root)
    images = root / split / "JPEGImages"
    annotations = root / split / "Annotations"
    for folder in (images, annotations):
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing; --root must hold the YouTube-VOS '{split}' folder "
                               f"({split}/JPEGImages and {split}/Annotations).")
    dense = root / f"{split}_all_frames" / "JPEGImages"
    if all_frames is None:
        all_frames = dense.is_dir()
    elif all_frames and not dense.is_dir():
        raise DatasetError(f"--all-frames needs {dense}, which is missing; drop --all-frames to run on the scored frames only.")
    names = sorted(p.name for p in images.iterdir() if p.is_dir())
    if videos is not None:
        unknown = sorted(set(videos) - set(names))
        if unknown:
            raise DatasetError(f"the {split} split has no video {unknown[0]!r}; check --videos.")
        names = [n for n in names if n in set(videos)]
    out = []
    for name in names:
        scored = sorted(p.stem for p in (images / name).glob("*.jpg"))
        frames_dir = (dense if all_frames else images) / name
        run = sorted(p.stem for p in frames_dir.glob("*.jpg")) if all_frames else scored
        pngs = {p.stem: p for p in sorted((annotations / name).glob("*.png"))}
        if not scored or not pngs:
            raise DatasetError(f"video {name} of {root / split} has no frames or no annotation PNG; the folder is incomplete.")
        missing = sorted(set(pngs) - set(run)) or sorted(set(scored) - set(run))
        if missing:
            raise DatasetError(f"frame {missing[0]} of video {name} is annotated or scored but not among the frames in "
                               f"{frames_dir}; the folders do not match.")
        out.append(YouTubeVideo(name, frames_dir, scored, run, pngs))
    if not out:
        raise DatasetError(f"{images} holds no video folders.")
    return out


def predict_youtube(videos: list[YouTubeVideo], model, out: str | os.PathLike, device=None, size: int | None = 480,
                    progress: bool = True, **tracker_kwargs) -> RunStats:
    """Segment every video; writes ``out/Annotations/<video>/<frame>.png`` for each scored frame. The stats count
    the frames that went through the model (frames before a video's first annotation do not)."""
    from tqdm import tqdm

    from corrvos import Tracker
    from corrvos.eval.predict import RunStats, timed_step, tracker_device_is_cuda
    from corrvos.io.masks import read_mask, write_mask
    from corrvos.io.video import ImageFolderFrames

    out = Path(out) / "Annotations"
    stats = RunStats()
    tracker_kwargs.setdefault("match_cache_frames", 0)
    bar = tqdm(total=sum(len(v.run) for v in videos), desc="segmenting", unit="frame", disable=not progress)
    try:
        for video in videos:
            frames = ImageFolderFrames(video.frames_dir)
            index = {stem: t for t, stem in enumerate(frames.names)}
            scored = set(video.scored)
            folder = out / video.name
            folder.mkdir(parents=True, exist_ok=True)
            tracker = Tracker(model, device=device, size=size, **tracker_kwargs)
            on_gpu = tracker_device_is_cuda(tracker, device)
            bar.set_postfix_str(video.name)
            for t, stem in enumerate(video.run):
                image = frames[index[stem]]  # decoding is I/O: outside the timed region
                mask = new_ids = None
                if stem in video.annotations:
                    mask = read_mask(video.annotations[stem])
                    if mask.shape != image.shape[:2]:
                        raise DatasetError(f"the annotation {stem}.png of video {video.name} is {mask.shape[1]}x{mask.shape[0]} "
                                           f"but its frames are {image.shape[1]}x{image.shape[0]}.")
                    new_ids = [int(i) for i in np.unique(mask) if i != 0 and int(i) not in tracker.object_ids]
                    # Only the objects first seen here join; ids already tracked keep their prediction.
                    mask = np.where(np.isin(mask, new_ids), mask, 0).astype(np.uint8)
                    if not new_ids:
                        mask = None
                if mask is None and tracker.num_objects == 0:
                    labels = np.zeros(image.shape[:2], np.uint8)  # no object has appeared yet
                else:
                    labels, seconds = timed_step(tracker, image, mask, new_ids, last=t == len(video.run) - 1,
                                                 on_gpu=on_gpu)
                    stats.model_seconds += seconds
                    stats.frames += 1
                if stem in scored:
                    write_mask(folder / f"{stem}.png", labels)
                bar.update(1)
            stats.sequences += 1
    finally:
        bar.close()
    return stats


def zip_submission(out: str | os.PathLike) -> Path:
    """``out/submission.zip`` with the ``Annotations/`` folder, written atomically."""
    out = Path(out)
    target = out / "submission.zip"
    tmp = out / ".submission.zip.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for png in sorted((out / "Annotations").rglob("*.png")):
            zf.write(png, png.relative_to(out).as_posix())
    tmp.replace(target)
    return target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m corrvos.eval.youtube",
        description="Segment a YouTube-VOS split with a checkpoint and zip the masks for CodaLab.",
        epilog="Errors are printed as one line starting with 'error:' and exit with status 2.",
    )
    p.add_argument("--root", required=True, type=Path, help="YouTube-VOS folder (holding valid/, and valid_all_frames/ if any)")
    p.add_argument("--split", default="valid", help="split folder (default: valid)")
    p.add_argument("--checkpoint", required=True, type=Path, help="corrvos .safetensors or upstream STCN/XMem .pth")
    p.add_argument("--out", required=True, type=Path, help="output folder: Annotations/ and submission.zip")
    dense = p.add_mutually_exclusive_group()
    dense.add_argument("--all-frames", dest="all_frames", action="store_true", default=None,
                       help="run on every frame (<split>_all_frames), write the scored ones (default when present)")
    dense.add_argument("--scored-frames-only", dest="all_frames", action="store_false",
                       help="run on the scored (every 5th) frames only")
    p.add_argument("--videos", default=None, help="comma-separated subset of the videos")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_size_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_tracker_arguments(p)
    return p


def run(args: argparse.Namespace) -> tuple[list[YouTubeVideo], RunStats]:
    if not args.checkpoint.is_file():
        raise CheckpointError(f"the checkpoint {args.checkpoint} does not exist; give the path of a .safetensors or .pth file.")
    tracker_options(args)
    wanted = [v.strip() for v in args.videos.split(",") if v.strip()] if args.videos else None
    videos = open_youtube(args.root, args.split, args.all_frames, wanted)

    from corrvos import load_model

    device = run_device(args)
    model = load_model(args.checkpoint, device=device)
    options = tracker_options(args, model.config.arch)
    size = processing_size(args.size, model.preferred_size)
    stats = predict_youtube(videos, model, args.out, device=device, size=size, progress=not args.no_progress, **options)
    zip_submission(args.out)
    return videos, stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        videos, stats = run(args)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{stats.sequences} videos: {sum(len(v.scored) for v in videos)} masks written to {args.out / 'Annotations'} and "
          f"{args.out / 'submission.zip'}; {stats.frames} frames through the model at {stats.fps:.2f} FPS "
          "(amortised, I/O excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
