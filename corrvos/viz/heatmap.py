"""Affinity heatmaps, numbered match markers, match-line strips and the readouts beside them.

Everything here is numpy/cv2 on arrays the tracker already produced (``Tracker.matches``): the
weights shown are the ones the memory read used, this module only maps them from the stride-16
feature grid back to image pixels and draws them. No gradio, no torch.

Geometry: a feature grid of shape ``(h, w)`` covers the *padded* processing image
``(h * stride, w * stride)``; removing ``pad = (left, right, top, bottom)`` (processing pixels,
:func:`corrvos.imageops.pad_divide_by` order) gives the processing image, which is a plain resize of
the input image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

Pad = tuple[int, int, int, int]  # (left, right, top, bottom)

# Marker colours (RGB): the query is white with a black ring so it shows on any frame.
_QUERY_RGB = (255, 255, 255)
_RING_RGB = (0, 0, 0)


def grid_to_image(
    grid: np.ndarray,
    image_hw: tuple[int, int],
    pad: Pad = (0, 0, 0, 0),
    stride: int = 16,
    nearest: bool = False,
) -> np.ndarray:
    """Map a feature-grid array ``(h, w)`` onto image pixels ``image_hw``.

    ``nearest=True`` keeps cell values blocky (used for cell ids); otherwise bilinear, which is what a
    person expects from a heatmap.
    """
    h, w = grid.shape
    left, right, top, bottom = pad
    full_h, full_w = h * stride, w * stride
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = grid.astype(np.float32) if not nearest else grid
    if nearest and src.dtype not in (np.float32, np.int32, np.uint8, np.uint16, np.int16):
        src = src.astype(np.int32)
    up = cv2.resize(src, (full_w, full_h), interpolation=interp)
    up = up[top : full_h - bottom, left : full_w - right]
    return cv2.resize(up, (image_hw[1], image_hw[0]), interpolation=interp)


def heatmap_rgb(weights: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """``(H, W)`` non-negative weights -> inferno RGB uint8, 0 black and ``vmax`` (default: max) bright."""
    top = float(weights.max()) if vmax is None else float(vmax)
    norm = np.clip(weights / top, 0.0, 1.0) if top > 0 else np.zeros_like(weights, dtype=np.float32)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return bgr[:, :, ::-1].copy()


def blend_heatmap(frame: np.ndarray, weights: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """The frame dimmed, with the heatmap laid over it where the weight is non-zero.

    The per-pixel opacity follows sqrt(weight / vmax), so a top-k read (mostly zeros) still shows the
    frame around the few cells that received weight.
    """
    top = float(weights.max()) if vmax is None else float(vmax)
    norm = np.clip(weights / top, 0.0, 1.0) if top > 0 else np.zeros(weights.shape, np.float32)
    alpha = (0.85 * np.sqrt(norm))[..., None]
    base = frame.astype(np.float32) * 0.55
    out = base * (1 - alpha) + heatmap_rgb(weights, vmax).astype(np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, rgb=(255, 255, 255)) -> None:
    thick = max(1, int(round(scale * 2)))
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, rgb, thick, cv2.LINE_AA)


def _scale_for(img: np.ndarray) -> float:
    # Markers and labels sized relative to the image so 64 px test frames and 1080p frames both read.
    return max(0.3, min(img.shape[:2]) / 480.0)


def draw_query_marker(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """Draw a crosshair at the clicked pixel (in place; returns ``img``)."""
    s = _scale_for(img)
    r = max(3, int(8 * s))
    c = (int(round(x)), int(round(y)))
    cv2.circle(img, c, r + 2, _RING_RGB, max(1, int(3 * s)), cv2.LINE_AA)
    cv2.circle(img, c, r, _QUERY_RGB, max(1, int(2 * s)), cv2.LINE_AA)
    cv2.line(img, (c[0] - 2 * r, c[1]), (c[0] + 2 * r, c[1]), _QUERY_RGB, 1, cv2.LINE_AA)
    cv2.line(img, (c[0], c[1] - 2 * r), (c[0], c[1] + 2 * r), _QUERY_RGB, 1, cv2.LINE_AA)
    return img


def weight_colour(weight: float, vmax: float) -> tuple[int, int, int]:
    """RGB of the turbo colormap at ``weight / vmax`` (for lines and marker rims)."""
    v = 0.0 if vmax <= 0 else min(1.0, max(0.0, weight / vmax))
    bgr = cv2.applyColorMap(np.array([[int(v * 255)]], np.uint8), cv2.COLORMAP_TURBO)[0, 0]
    return int(bgr[2]), int(bgr[1]), int(bgr[0])


def draw_numbered_markers(
    img: np.ndarray,
    points: Sequence[tuple[float, float, float, int]],
    vmax: float | None = None,
) -> np.ndarray:
    """Circles at ``(x, y, weight, number)``, radius growing with the weight, each labelled by its number."""
    if not points:
        return img
    top = vmax if vmax is not None else max(p[2] for p in points)
    s = _scale_for(img)
    for x, y, wgt, num in points:
        frac = 0.0 if top <= 0 else min(1.0, wgt / top)
        r = max(3, int((5 + 9 * math.sqrt(frac)) * s))
        c = (int(round(x)), int(round(y)))
        cv2.circle(img, c, r + 1, _RING_RGB, max(1, int(2 * s)), cv2.LINE_AA)
        cv2.circle(img, c, r, weight_colour(wgt, top), max(1, int(2 * s)), cv2.LINE_AA)
        _text(img, str(num), (c[0] + r, c[1] - r), 0.45 * s)
    return img


def caption_bar(img: np.ndarray, text: str) -> np.ndarray:
    """Return ``img`` with a dark caption bar on top."""
    s = _scale_for(img)
    bar_h = max(14, int(26 * s))
    bar = np.full((bar_h, img.shape[1], 3), 24, np.uint8)
    _text(bar, text, (4, bar_h - max(3, int(8 * s))), 0.55 * s)
    return np.concatenate([bar, img], axis=0)


def memory_frame_panel(
    frame: np.ndarray,
    grid: np.ndarray,
    points: Sequence[tuple[float, float, float, int]],
    caption: str,
    pad: Pad = (0, 0, 0, 0),
    stride: int = 16,
    vmax: float | None = None,
    max_width: int | None = None,
) -> np.ndarray:
    """One memory frame: heatmap of the clicked pixel's weights, numbered top matches and a caption.

    ``grid`` holds the weights at feature resolution (see :func:`grid_to_image` for ``pad``/``stride``);
    ``points`` are ``(x, y, weight, number)`` in ``frame`` pixels. A shared ``vmax`` (e.g. the click's
    largest cell weight) makes the panels of one click comparable. ``max_width`` shrinks large frames
    first, so a gallery of many memory frames stays cheap to draw and to send.
    """
    scale = 1.0
    if max_width is not None and frame.shape[1] > max_width:
        scale = max_width / frame.shape[1]
        frame = cv2.resize(frame, (max_width, max(1, int(round(frame.shape[0] * scale)))), interpolation=cv2.INTER_AREA)
        points = [(x * scale, y * scale, w, n) for x, y, w, n in points]
    weights = grid_to_image(grid, frame.shape[:2], pad, stride)
    img = blend_heatmap(frame, weights, vmax)
    draw_numbered_markers(img, points, vmax=max((p[2] for p in points), default=None))
    return caption_bar(img, caption)


def match_strip(
    query_frame: np.ndarray,
    query_xy: tuple[float, float],
    memory: Sequence[tuple[int, np.ndarray]],
    matches: Sequence[tuple[int, float, float, float]],
    height: int = 240,
    query_label: str = "query",
) -> np.ndarray:
    """``[query | memory frames ...]`` side by side, with a line from the clicked pixel to each top match.

    ``memory`` is ``(frame index, RGB frame)`` for the frames to show (those holding matches, in time
    order); ``matches`` is ``(frame index, x, y, weight)`` in image coordinates, best first. Lines and
    markers are coloured by weight (turbo) and numbered by rank.
    """
    tiles, offsets, scales = [], {}, {}

    def fit(img: np.ndarray) -> tuple[np.ndarray, float]:
        sc = height / img.shape[0]
        return cv2.resize(img, (max(1, int(round(img.shape[1] * sc))), height), interpolation=cv2.INTER_AREA), sc

    q, qs = fit(query_frame)
    q = caption_bar(q, query_label)
    tiles.append(q)
    x0 = q.shape[1]
    for t, frame in memory:
        tile, sc = fit(frame)
        tile = caption_bar(tile, f"t={t}")
        offsets[t], scales[t] = x0, sc
        tiles.append(tile)
        x0 += tile.shape[1]
    bar_h = q.shape[0] - height
    strip = np.concatenate(tiles, axis=1)
    # Separators so adjacent frames do not read as one image.
    for off in offsets.values():
        strip[:, off : off + 2] = 255
    vmax = max((m[3] for m in matches), default=0.0)
    qx, qy = query_xy[0] * qs, query_xy[1] * qs + bar_h
    s = _scale_for(strip[bar_h:])
    drawn = []
    for rank, (t, x, y, wgt) in enumerate(matches, start=1):
        if t not in offsets:
            continue
        mx, my = offsets[t] + x * scales[t], y * scales[t] + bar_h
        cv2.line(strip, (int(qx), int(qy)), (int(mx), int(my)), weight_colour(wgt, vmax), max(1, int(2 * s)), cv2.LINE_AA)
        drawn.append((mx, my, wgt, rank))
    draw_numbered_markers(strip, drawn, vmax=vmax)
    draw_query_marker(strip, qx, qy)
    return strip


@dataclass
class AffinitySummary:
    """Readouts of one pixel's memory read.

    ``frame_weight[i]`` is the total weight on memory frame ``i``; ``object_share[k]`` the share of
    weight landing inside object ``k``'s mask (0 = background, cells partly covered count by their
    covered fraction); ``entropy`` in nats over all memory elements and ``effective_matches = exp(entropy)``.
    """

    frame_weight: list[float]
    entropy: float
    effective_matches: float
    total: float
    object_share: dict[int, float] = field(default_factory=dict)


def entropy(weights: np.ndarray) -> float:
    """Shannon entropy (nats) of a non-negative weight array, normalised to sum 1 first."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    total = w.sum()
    if total <= 0:
        return 0.0
    p = w[w > 0] / total
    return float(-(p * np.log(p)).sum())


def object_coverage(
    labels: np.ndarray, grid_hw: tuple[int, int], pad: Pad = (0, 0, 0, 0), stride: int = 16, num_objects: int | None = None
) -> np.ndarray:
    """``(K+1, h, w)``: fraction of each feature cell's image pixels that carry label k (0 = background).

    Cells lying entirely in the padding cover no pixel and get 0 everywhere.
    """
    h, w = grid_hw
    cell_ids = grid_to_image(np.arange(h * w, dtype=np.int32).reshape(h, w), labels.shape, pad, stride, nearest=True)
    k1 = int(labels.max()) + 1 if num_objects is None else num_objects + 1
    counts = np.bincount(cell_ids.ravel(), minlength=h * w).astype(np.float64)
    cover = np.zeros((k1, h * w), np.float64)
    for k in range(k1):
        cover[k] = np.bincount(cell_ids[labels == k].ravel(), minlength=h * w)
    with np.errstate(invalid="ignore", divide="ignore"):
        cover = np.where(counts > 0, cover / counts, 0.0)
    return cover.reshape(k1, h, w)


def summarize_affinity(
    grids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    pad: Pad = (0, 0, 0, 0),
    stride: int = 16,
    num_objects: int | None = None,
) -> AffinitySummary:
    """Weight per memory frame, entropy, and (given each memory frame's label map) the share of weight
    inside each object's mask. ``grids`` are the per-memory-frame weights at feature resolution."""
    frame_weight = [float(g.sum()) for g in grids]
    total = float(sum(frame_weight))
    ent = entropy(np.concatenate([g.ravel() for g in grids])) if grids else 0.0
    share: dict[int, float] = {}
    if labels is not None and grids and total > 0:
        k_max = num_objects if num_objects is not None else max(int(l.max()) for l in labels)
        acc = np.zeros(k_max + 1, np.float64)
        for g, lab in zip(grids, labels):
            cover = object_coverage(lab, g.shape, pad, stride, k_max)
            acc += (cover * g[None].astype(np.float64)).reshape(k_max + 1, -1).sum(1)
        share = {k: float(acc[k] / total) for k in range(k_max + 1)}
    return AffinitySummary(frame_weight, ent, float(math.exp(ent)), total, share)

