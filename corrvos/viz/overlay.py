"""Mask overlays: objects tinted in their DAVIS palette colour, outlined with a solid contour."""
from __future__ import annotations

import cv2
import numpy as np

from corrvos.io.masks import PALETTE


def object_contours(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """``HxW`` label map of each object's inner border ``width`` pixels thick (0 elsewhere)."""
    labels = np.asarray(labels, dtype=np.uint8)
    edges = np.zeros_like(labels)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    for k in np.unique(labels):
        if k == 0:
            continue
        inside = (labels == k).astype(np.uint8)
        # BORDER_CONSTANT 0 makes objects touching the image edge get a contour there too.
        eroded = cv2.erode(inside, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        edges[(inside > 0) & (eroded == 0)] = k
    return edges


def overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5, contour_width: int = 2) -> np.ndarray:
    """Blend each object's palette colour into an RGB uint8 frame and draw its contour; returns a new frame."""
    frame = np.asarray(frame)
    labels = np.asarray(labels)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 frame, got shape {frame.shape} and dtype {frame.dtype}")
    if labels.shape != frame.shape[:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match the frame's {frame.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    labels = labels.astype(np.uint8, copy=False)
    out = frame.astype(np.float32)
    colours = PALETTE[labels].astype(np.float32)
    fg = labels > 0
    out[fg] = (1.0 - alpha) * out[fg] + alpha * colours[fg]
    out = np.rint(out).astype(np.uint8)
    if contour_width > 0:
        edges = object_contours(labels, contour_width)
        out[edges > 0] = PALETTE[edges[edges > 0]]
    return out
