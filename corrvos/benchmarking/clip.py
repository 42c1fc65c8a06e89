"""Benchmark clips: frames prepared up front (on the device) so that timing excludes decoding and copies.

The synthetic clip is ``K`` coloured ellipses moving over a panning textured background. Every motion
is periodic in ``period`` frames, so a long run can cycle a small pool of frames without a jump.
Object ``k`` stays in its own vertical stripe of the frame, so every object is visible in every frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from corrvos.errors import InputError


@dataclass
class BenchClip:
    """``frames`` (T, 3, H, W) uint8 on the device, cycled by :meth:`frame`; ``first_mask`` (H, W) uint8."""

    frames: Tensor
    first_mask: Tensor
    source: str

    def frame(self, t: int) -> Tensor:
        return self.frames[t % self.frames.shape[0]]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[3])

    @property
    def megabytes(self) -> float:
        return self.frames.numel() * self.frames.element_size() / 2**20


def synthetic_size(resolution: int) -> tuple[int, int]:
    """(H, W) for a short side of ``resolution``: 16:9, width rounded up to /16 (480 -> 480x864)."""
    return resolution, int(math.ceil(resolution * 16 / 9 / 16)) * 16


def _blob_layout(objects: int, height: int, width: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    stripe = width / objects
    layout = []
    for k in range(objects):
        layout.append(
            dict(
                x0=(k + 0.5) * stripe,
                y0=height * 0.5,
                ax=0.2 * stripe,  # horizontal travel stays inside the object's stripe
                ay=0.25 * height,
                rx=max(2.0, min(0.25 * stripe, 0.2 * height) * rng.uniform(0.7, 1.0)),
                ry=max(2.0, 0.18 * height * rng.uniform(0.7, 1.0)),
                fx=int(rng.integers(1, 3)),  # whole cycles per period: seamless when the pool repeats
                fy=int(rng.integers(1, 3)),
                phase=float(rng.uniform(0, 2 * math.pi)),
                colour=rng.uniform(40, 255, 3),
            )
        )
    return layout


def synthetic_clip(
    resolution: int, objects: int, frames: int, device: torch.device, period: int | None = None, seed: int = 0
) -> BenchClip:
    """A deterministic moving-blobs clip of ``frames`` frames (motion period ``period``, default ``frames``)."""
    if objects < 1 or objects > 255:
        raise InputError(f"--objects must be between 1 and 255, not {objects}.")
    height, width = synthetic_size(resolution)
    period = period or frames
    layout = _blob_layout(objects, height, width, seed)
    yy = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1)
    xx = torch.arange(width, device=device, dtype=torch.float32).view(1, -1)
    out = torch.empty(frames, 3, height, width, dtype=torch.uint8, device=device)
    first_mask = torch.zeros(height, width, dtype=torch.uint8, device=device)
    for t in range(frames):
        phase = t % period  # exact periodicity (no float drift), so a pool of ``period`` frames cycles cleanly
        angle = 2 * math.pi * phase / period
        # Smooth texture panning by one full wavelength per period: keys differ between places.
        shift = width * phase / period
        img = torch.stack(
            [
                110 + 60 * torch.sin((xx + shift) * (2 * math.pi * c / width) + yy * (0.05 + 0.02 * c))
                for c in (3, 5, 7)
            ]
        )
        labels = torch.zeros(height, width, dtype=torch.uint8, device=device)
        for k, b in enumerate(layout):
            cx = b["x0"] + b["ax"] * math.sin(b["fx"] * angle + b["phase"])
            cy = b["y0"] + b["ay"] * math.sin(b["fy"] * angle + 2 * b["phase"])
            inside = ((xx - cx) / b["rx"]) ** 2 + ((yy - cy) / b["ry"]) ** 2 <= 1
            colour = torch.tensor(b["colour"], device=device, dtype=torch.float32).view(3, 1, 1)
            img = torch.where(inside, colour, img)
            labels[inside] = k + 1
        out[t] = img.clamp(0, 255).round().to(torch.uint8)
        if t == 0:
            first_mask = labels
    present = int(torch.unique(first_mask).numel()) - 1
    if present < objects:
        raise InputError(
            f"{objects} objects do not fit in a {width}x{height} synthetic frame; lower --objects or raise --resolution."
        )
    return BenchClip(out, first_mask, f"synthetic moving blobs {width}x{height}")


def video_clip(path: Path, resolution: int, objects: int, frames: int, device: torch.device, seed: int = 0) -> BenchClip:
    """The first ``frames`` frames of a video (cycled if shorter), resized so the short side is ``resolution``.

    The first-frame mask is synthetic (``objects`` ellipses): the bench measures speed, not accuracy.
    """
    import cv2

    from corrvos.io import load_frames

    loaded = load_frames(path, lazy=True)
    count = min(frames, len(loaded.frames))
    if count == 0:
        raise InputError(f"The video {path} has no frames; give a video with at least one frame.")
    first = loaded.frames[0]
    h, w = first.shape[:2]
    # Same rounding as the Tracker's resize (torchvision Resize(int)): the long side is truncated.
    if h <= w:
        size = (resolution, int(resolution * w / h))
    else:
        size = (int(resolution * h / w), resolution)
    out = torch.empty(count, 3, size[0], size[1], dtype=torch.uint8, device=device)
    for t in range(count):
        img = loaded.frames[t]
        if img.shape[:2] != size:
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        out[t] = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(device)
    blobs = synthetic_clip(resolution, objects, 1, device, seed=seed)
    mask = torch.nn.functional.interpolate(
        blobs.first_mask[None, None].float(), size=size, mode="nearest"
    )[0, 0].to(torch.uint8)
    if int(torch.unique(mask).numel()) - 1 < objects:
        raise InputError(f"{objects} objects do not fit in the {size[1]}x{size[0]} frames; lower --objects.")
    return BenchClip(out, mask, f"{path.name} {size[1]}x{size[0]} ({count} distinct frames)")
