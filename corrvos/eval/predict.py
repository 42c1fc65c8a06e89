"""Run a model over a DAVIS split with the Tracker, write palette PNGs, and time it as upstream does.

FPS is amortised: total model time / total frames, where model time covers ``Tracker.step`` plus
the argmax and the copy of the labels to the CPU (``Tracker.labels_from``), and excludes decoding
frames and writing PNGs (``torch.cuda.synchronize`` around the timed part on a GPU). Every frame of a sequence gets a PNG,
including the first (which the evaluation does not score).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corrvos.errors import DatasetError
from corrvos.eval.davis_eval import DavisSplit

# Called after each processed frame, outside the timed region: (sequence, t, tracker, frame labels out).
FrameHook = Callable[[str, int, object, np.ndarray], None]


@dataclass
class RunStats:
    sequences: int = 0
    frames: int = 0
    model_seconds: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.model_seconds if self.model_seconds > 0 else float("nan")


def _frame_names(frames, n: int) -> list[str]:
    # Frame folders keep their own names (DAVIS JPEG stems = annotation stems); videos are 00000, 00001, ...
    names = getattr(frames, "names", None)
    return list(names) if names is not None else [f"{t:05d}" for t in range(n)]


def predict_split(
    split: DavisSplit,
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    size: int | None = 480,
    progress: bool = True,
    on_frame: FrameHook | None = None,
    tracker_class: type | None = None,
    **tracker_kwargs,
) -> RunStats:
    """Segment every sequence of ``split`` from its first GT mask; PNGs go to ``out_dir/<seq>/<frame>.png``.

    ``tracker_class`` (default :class:`~corrvos.Tracker`) is built per sequence with the model, device, size and
    ``tracker_kwargs``; e.g. :class:`~corrvos.eval.label_propagation.LabelPropagator`.
    """
    from tqdm import tqdm

    from corrvos import Tracker
    from corrvos.io.masks import write_mask

    tracker_class = tracker_class or Tracker

    out_dir = Path(out_dir)
    stats = RunStats()
    total = sum(len(split.annotation_paths(seq)) for seq in split.sequences)
    bar = tqdm(total=total, desc="segmenting", unit="frame", disable=not progress)
    try:
        for seq in split.sequences:
            frames = split.frames(seq)
            first = split.first_mask(seq)
            names = _frame_names(frames, len(frames))
            seq_dir = out_dir / seq
            seq_dir.mkdir(parents=True, exist_ok=True)
            # The match cache only serves the per-frame hook (correspondence metrics need frame t's read).
            tracker_kwargs.setdefault("match_cache_frames", 1 if on_frame is not None else 0)
            tracker = tracker_class(model, device=device, size=size, **tracker_kwargs)
            on_gpu = tracker_device_is_cuda(tracker, device)
            bar.set_postfix_str(seq)
            for t in range(len(frames)):
                image = frames[t]  # decoding is I/O: outside the timed region
                if t == 0 and first.shape != image.shape[:2]:
                    raise DatasetError(
                        f"the first annotation of {seq!r} is {first.shape[0]}x{first.shape[1]} but its frames are "
                        f"{image.shape[0]}x{image.shape[1]}; the DAVIS folder mixes resolutions."
                    )
                labels_np, seconds = timed_step(tracker, image, first if t == 0 else None, last=t == len(frames) - 1,
                                                on_gpu=on_gpu)
                stats.model_seconds += seconds
                write_mask(seq_dir / f"{names[t]}.png", labels_np)
                if on_frame is not None:
                    on_frame(seq, t, tracker, labels_np)
                stats.frames += 1
                bar.update(1)
            stats.sequences += 1
    finally:
        bar.close()
    return stats


def timed_step(tracker, image: np.ndarray, mask: np.ndarray | None, objects: list[int] | None = None, *,
               last: bool, on_gpu: bool) -> tuple[np.ndarray, float]:
    """``Tracker.step`` and the labels on the CPU, timed as upstream times a frame: (labels, seconds)."""
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        prob = tracker.step(image, mask, objects, last=last)
        # labels_from maps channels back to the mask's object ids (also non-contiguous ones).
        labels = tracker.labels_from(prob)
    if on_gpu:
        torch.cuda.synchronize()
    return labels, time.perf_counter() - start


def tracker_device_is_cuda(tracker: object, requested: str | torch.device | None) -> bool:
    """Whether timing needs ``torch.cuda.synchronize`` (the tracker's device, else the requested one)."""
    dev = getattr(tracker, "device", requested)
    if dev is None:
        return False
    return torch.device(dev).type == "cuda"
