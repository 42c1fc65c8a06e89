"""Segment the objects of a first-frame mask (or of masks given at several frames) through a whole video.

    python -m corrvos.infer --checkpoint checkpoints/stcn-s.safetensors --video clip.mp4 --mask first.png --out out/

writes one DAVIS palette PNG per input frame (named after the input frames, or 00000.png, ... for a
video) and ``overlay.mp4``, an H.264 video of the masks drawn on the frames.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from corrvos.errors import CheckpointError, CorrvosError, InputError
from corrvos.tracker_options import add_size_argument, add_tracker_arguments, processing_size, run_device, tracker_options

OVERLAY_NAME = "overlay.mp4"
SOFT_DIR = "soft_masks"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m corrvos.infer",
        description=(
            "Propagate a first-frame object mask through a video with an STCN/XMem checkpoint. Writes one "
            "palette PNG per input frame (same count and names) and overlay.mp4 (H.264) to --out."
        ),
        epilog="Errors are printed as one line starting with 'error:' and exit with status 2.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="model weights: a corrvos .safetensors checkpoint or an upstream STCN/XMem .pth")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", type=Path, help="input video file (mp4, webm, mov, avi, ...)")
    src.add_argument("--frames", type=Path,
                     help="input frames: a folder of .jpg/.png images or a .zip of them, in natural name order")
    p.add_argument("--mask", required=True, type=Path,
                   help="first-frame mask at the frames' size: palette PNG (DAVIS), 0/255 grayscale, or RGB "
                        "with one colour per object; or a folder of such PNGs named after the frames they annotate "
                        "(YouTube-VOS style: each adds new objects, or overwrites the ones it marks, from its frame on; "
                        "tracking starts at the first one; see --backward for the frames before it)")
    p.add_argument("--backward", action="store_true",
                   help="also segment the frames before the first annotated frame, propagating backward from it "
                        "(otherwise they are written empty)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the model runs (default: cuda when available, else cpu)")
    add_size_argument(p)
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate of overlay.mp4 (default: the video's, or 24 for frame folders and zips)")
    p.add_argument("--no-video", action="store_true",
                   help="write only the masks, not overlay.mp4 (which needs the imageio-ffmpeg package)")
    p.add_argument("--soft-masks", action="store_true",
                   help=f"also write each object's probability (0-255) as a greyscale PNG per frame to "
                        f"OUT/{SOFT_DIR}/obj<id>/ (soft mattes for compositing; XMem's --save_scores, as images)")
    add_tracker_arguments(p)
    return p


class _RecentFrames(Sequence):
    """Lazy frames that keep the last few decoded ones, so drawing frame t after tracking it decodes nothing twice."""

    def __init__(self, frames: Sequence[np.ndarray], keep: int = 4):
        self._frames = frames
        self._keep = keep
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        if t < 0:
            t += len(self)
        if t not in self._cache:
            self._cache[t] = self._frames[t]
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return self._cache[t]


def _validate_args(args: argparse.Namespace) -> None:
    tracker_options(args)  # value errors before anything is read; the architecture is checked once loaded
    if args.fps is not None and args.fps <= 0:
        raise InputError(f"--fps must be positive, not {args.fps}.")
    if not args.checkpoint.is_file():
        raise CheckpointError(f"the checkpoint {args.checkpoint} does not exist; give the path of a .safetensors or .pth file.")
    if not args.no_video and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise CorrvosError(
            "writing overlay.mp4 needs the imageio-ffmpeg package, which is not installed; "
            "run `pip install imageio-ffmpeg` or pass --no-video."
        )
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"the output path {args.out} exists and is not a folder; choose a folder for --out.")


def run(args: argparse.Namespace) -> Path:
    """Do the work of the CLI; returns the output folder. Raises CorrvosError on bad input."""
    _validate_args(args)
    from corrvos.io.masks import compact_labels, read_given_masks, write_mask, write_matte
    from corrvos.io.video import VideoWriter, load_frames
    from corrvos.viz.overlay import overlay

    # Cheap checks first: a wrong mask is reported before the model is loaded or the video decoded.
    clip = load_frames(args.video if args.video is not None else args.frames, lazy=True, fps=args.fps)
    given = read_given_masks(args.mask, clip.names, clip.size)
    order = sorted(given)
    compact, back = compact_labels([given[t] for t in order])
    start = order[0]

    from tqdm import tqdm

    import corrvos
    from corrvos.inference.video_session import VideoSession

    device = run_device(args)
    model = corrvos.load_model(args.checkpoint, device=device)
    tracker = corrvos.Tracker(
        model, device=device, size=processing_size(args.size, model.preferred_size),
        match_cache_frames=0,  # the CLI never asks for matches: keep no per-frame caches for them
        **tracker_options(args, model.config.arch),
    )

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"could not create the output folder {args.out} ({err.strerror}); choose a writable folder.") from err
    frames = _RecentFrames(clip.frames)
    object_ids = sorted({int(v) for m in given.values() for v in np.unique(m) if v})
    if args.soft_masks:
        for oid in object_ids:
            (args.out / SOFT_DIR / f"obj{oid}").mkdir(parents=True, exist_ok=True)
    written = 0
    video_out = contextlib.nullcontext() if args.no_video else VideoWriter(args.out / OVERLAY_NAME, fps=clip.fps)

    def write(t: int, labels: np.ndarray, soft: dict[int, np.ndarray], writer) -> None:
        """Frame t's outputs; ``soft`` maps the input's object ids to mattes (an id left out is written empty)."""
        nonlocal written
        write_mask(args.out / f"{clip.names[t]}.png", labels)
        if args.soft_masks:
            for oid in object_ids:
                write_matte(args.out / SOFT_DIR / f"obj{oid}" / f"{clip.names[t]}.png", soft.get(oid, empty))
        if writer is not None:
            writer.write(overlay(frames[t], labels))
        written += 1

    def outputs(prob) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The tracker's probabilities -> labels and soft masks under the input's own object ids."""
        labels = back[np.asarray(tracker.labels_from(prob), dtype=np.uint8)]
        soft = {int(back[k]): m for k, m in tracker.soft_masks(prob).items()} if args.soft_masks else {}
        return labels, soft

    # Masks at later frames add objects or correct them; objects they leave out keep being tracked there.
    session = VideoSession(frames, given=dict(zip(order, compact)), anno_t=start, complete_masks=False,
                           keep_labels=False)
    trackers = {"model": lambda: tracker}
    # Before the first annotated frame no object is known yet (YouTube-VOS protocol): empty masks, unless
    # --backward tracks them from that frame's mask in reverse (run first: the overlay is written in order).
    empty = np.zeros(clip.size, np.uint8)
    before: dict[int, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
    if args.backward and start > 0:
        for step in tqdm(session.propagate(trackers, start, directions=(-1,)), total=start, desc="segmenting backward",
                         unit="frame"):
            before[step.t] = outputs(step.prob)
    with video_out as writer:
        for t in range(start):
            write(t, *before.get(t, (empty, {})), writer)
        for step in tqdm(session.propagate(trackers, start, directions=(1,)), total=len(frames) - start,
                         desc="segmenting", unit="frame"):
            write(step.t, *outputs(step.prob), writer)
    if written != len(frames):
        raise InputError(f"only {written} of {len(frames)} frames were segmented; the input may be truncated, re-encode it.")
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the overlay video was not written.", file=sys.stderr)
        return 130
    print(f"wrote the masks to {out}" + ("" if args.no_video else f" and the overlay to {out / OVERLAY_NAME}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
