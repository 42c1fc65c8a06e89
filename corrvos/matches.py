"""Where did a pixel's memory read go? The app's click panel as image files, for one or more checkpoints.

    python -m corrvos.matches --checkpoint base.safetensors corr.safetensors --video clip.mp4 --mask first.png \\
        --frame 30 --point 420,260 --out matches/

Each checkpoint segments the video from the mask up to frame ``--frame``; then, for each ``--point`` (x, y in
the frame's pixels), it writes

* ``t<T>_x<X>_y<Y>.png``: the query frame beside each model's best matches, one row per checkpoint;
* ``t<T>_x<X>_y<Y>_<checkpoint>_memory.png``: the read's weight on every memory frame, as heatmaps;
* ``matches.json``: entropy, weight per memory frame, share of weight inside each object's mask, top matches
  (objects numbered 1..K in the order of their mask ids),

and prints each model's readout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from corrvos.errors import CheckpointError, CorrvosError, InputError
from corrvos.tracker_options import (
    add_size_argument, add_tracker_arguments, for_architecture, processing_size, run_device, tracker_options,
)

PANEL_COLUMNS = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m corrvos.matches",
        description="Heatmaps and top matches of one pixel's memory read, for one or more checkpoints, as PNGs + JSON.",
        epilog="Errors are printed as one line starting with 'error:' and exit with status 2.",
    )
    p.add_argument("--checkpoint", required=True, nargs="+", type=Path,
                   help="one or more checkpoints (corrvos .safetensors or upstream .pth), compared row by row")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", type=Path, help="input video file")
    src.add_argument("--frames", type=Path, help="input frames: a folder of .jpg/.png images or a .zip of them")
    p.add_argument("--mask", required=True, type=Path,
                   help="mask of the first frame, or a folder of masks named after their frames (as python -m corrvos.infer)")
    p.add_argument("--frame", required=True, type=int, help="the query frame (0-based), after the first annotated frame")
    p.add_argument("--point", required=True, nargs="+", metavar="X,Y",
                   help="query pixels in the frame's pixel coordinates, e.g. 420,260")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the models run (default: cuda when available, else cpu)")
    add_size_argument(p, "each checkpoint's training scale")
    add_tracker_arguments(p)
    return p


def parse_points(texts: list[str], size: tuple[int, int]) -> list[tuple[int, int]]:
    """``["420,260", ...]`` -> [(x, y), ...], each inside a frame of ``size`` = (height, width)."""
    h, w = size
    points = []
    for text in texts:
        try:
            x, y = (int(v) for v in text.split(","))
        except ValueError:
            raise InputError(f"--point {text!r} is not of the form X,Y (two integers, e.g. 420,260).") from None
        if not (0 <= x < w and 0 <= y < h):
            raise InputError(f"--point {text} lies outside the {w}x{h} frame; give x in 0..{w - 1} and y in 0..{h - 1}.")
        points.append((x, y))
    return points


def tile(images: list[np.ndarray], columns: int = PANEL_COLUMNS, gap: int = 4) -> np.ndarray:
    """Lay RGB images out in rows of ``columns`` (black gaps, rows padded to the widest)."""
    from corrvos.viz.affinity_view import stack_rows

    rows = []
    for i in range(0, len(images), columns):
        row = images[i:i + columns]
        height = max(im.shape[0] for im in row)
        padded = [np.pad(im, ((0, height - im.shape[0]), (0, gap), (0, 0))) for im in row]
        rows.append(np.concatenate(padded, axis=1)[:, :-gap])
    return stack_rows(rows, gap)


def _check_args(args: argparse.Namespace) -> None:
    if args.frame < 0:
        raise InputError(f"--frame must be 0 or more, not {args.frame}.")
    stems = [c.stem for c in args.checkpoint]
    for c in args.checkpoint:
        if not c.is_file():
            raise CheckpointError(f"the checkpoint {c} does not exist; give the path of a .safetensors or .pth file.")
        if stems.count(c.stem) > 1:
            raise InputError(f"two checkpoints are named {c.stem}; their output files would clash, so rename one.")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"the output path {args.out} exists and is not a folder; choose a folder for --out.")
    tracker_options(args)


def run(args: argparse.Namespace) -> list[dict]:
    """Do the work of the CLI; returns what matches.json holds. Raises CorrvosError on bad input."""
    _check_args(args)
    from corrvos.io.masks import compact_labels, read_given_masks
    from corrvos.io.video import load_frames

    clip = load_frames(args.video if args.video is not None else args.frames, lazy=True)
    n = len(clip.frames)
    if args.frame >= n:
        raise InputError(f"--frame {args.frame} is past the end of the video, whose frames are 0..{n - 1}.")
    points = parse_points(args.point, clip.size)
    given = read_given_masks(args.mask, clip.names, clip.size)
    start = min(given)
    if args.frame <= start or args.frame in given:
        raise InputError(
            f"frame {args.frame} reads no memory (the masks are given at frames {sorted(given)}); "
            f"choose a later frame that was not annotated."
        )
    order = sorted(t for t in given if t < args.frame)
    compact, _ = compact_labels([given[t] for t in order])
    num_objects = int(max(m.max() for m in compact))
    later = {t - start: m for t, m in zip(order[1:], compact[1:])}

    import torch
    from tqdm import tqdm

    import corrvos
    from corrvos.viz.affinity_view import render_affinity, stack_rows

    device = run_device(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"could not create the output folder {args.out} ({err.strerror}); choose a writable folder.") from err

    frame_of = list(range(start, args.frame + 1))
    models = {ckpt: corrvos.load_model(ckpt, device=device) for ckpt in args.checkpoint}
    archs = {model.config.arch for model in models.values()}
    # An option for the other architecture is a mistake, not something to drop quietly, unless both are given.
    options = tracker_options(args, next(iter(archs)) if len(archs) == 1 else None)
    views = {}  # checkpoint -> one AffinityView per point
    for ckpt, model in models.items():
        size = processing_size(args.size, model.preferred_size)
        # Only the query frame's read is inspected: keep the cache for the last frame alone.
        tracker = corrvos.Tracker(model, device=device, size=size, match_cache_frames=1,
                                  **for_architecture(options, model.config.arch))
        labels: list[np.ndarray | None] = [None] * n
        for t, m in zip(order, compact):
            labels[t] = m
        with torch.inference_mode():
            steps = tracker.propagate((clip.frames[t] for t in frame_of), compact[0], later)
            for step, lab in tqdm(steps, total=len(frame_of), desc=f"{ckpt.stem}: frames {start}..{args.frame}", unit="frame"):
                labels[frame_of[step]] = lab
        views[ckpt] = [
            render_affinity(tracker, len(frame_of) - 1, x, y, frames=clip.frames, frame_of=frame_of, labels=labels,
                            num_objects=num_objects, name=ckpt.stem)
            for x, y in points
        ]

    report = []
    for i, (x, y) in enumerate(points):
        base = f"t{args.frame:05d}_x{x}_y{y}"
        _write_png(args.out / f"{base}.png", stack_rows([views[c][i].strip for c in args.checkpoint]))
        entry = {"frame": args.frame, "x": x, "y": y, "models": []}
        for ckpt in args.checkpoint:
            view = views[ckpt][i]
            _write_png(args.out / f"{base}_{ckpt.stem}_memory.png", tile([panel for panel, _ in view.panels]))
            s = view.summary
            entry["models"].append({
                "checkpoint": str(ckpt),
                "entropy": round(s.entropy, 6),
                "effective_matches": round(s.effective_matches, 4),
                "weight_per_memory_frame": {str(t): round(w, 6) for t, w in zip(view.memory_frames, s.frame_weight)},
                "object_share": {("background" if k == 0 else f"obj{k}"): round(v, 6) for k, v in s.object_share.items()},
                "top_matches": [{"frame": f, "x": round(mx, 1), "y": round(my, 1), "weight": round(w, 6)}
                                for f, mx, my, w in view.top],
            })
            print(view.text.replace("**", ""))
        report.append(entry)
    tmp = args.out / ".matches.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out / "matches.json")
    return report


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the match images and matches.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
