"""Tiny synthetic datasets on disk for the training-data tests (YouTube-VOS / DAVIS folder layouts)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)


def save_palette(path: Path, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    im.save(path)


def object_frames(n: int, h: int, w: int, seed: int = 0, objects: int = 2):
    """Frames where object k is a bright filled rectangle moving slowly; labels 1..objects."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for t in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
        lab = np.zeros((h, w), np.uint8)
        for k in range(objects):
            y0 = h // 5 + k * h // 3
            x0 = w // 6 + (t * 2 + k * w // 3) % (w // 2)
            y1, x1 = y0 + h // 4, x0 + w // 4
            img[y0:y1, x0:x1] = 255
            lab[y0:y1, x0:x1] = k + 1
        frames.append(img)
        labels.append(lab)
    return frames, labels


def make_layout(root: Path, names=("a", "b"), n: int = 10, h: int = 72, w: int = 112, objects: int = 2,
                davis: bool = False) -> Path:
    """YouTube-VOS (``JPEGImages/<seq>``) or DAVIS (``JPEGImages/480p/<seq>``) layout with palette masks.

    Frames are written as PNG so that their pixels are exact (JPEG would blur the object edges).
    """
    sub = Path("480p") if davis else Path()
    for i, name in enumerate(names):
        jdir, adir = root / "JPEGImages" / sub / name, root / "Annotations" / sub / name
        jdir.mkdir(parents=True)
        adir.mkdir(parents=True)
        frames, labels = object_frames(n, h, w, seed=i, objects=objects)
        for t, (f, lab) in enumerate(zip(frames, labels)):
            cv2.imwrite(str(jdir / f"{t:05d}.png"), f[:, :, ::-1])
            save_palette(adir / f"{t:05d}.png", lab)
    return root
