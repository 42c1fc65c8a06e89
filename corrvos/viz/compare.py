"""Comparing two models' label maps: the disagreement view and the per-frame series behind the app's chart."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from corrvos.eval.metrics import jaccard

# Disagreement colours (RGB): A-only foreground, B-only foreground, both foreground but different objects.
DISAGREE_A_RGB = (255, 140, 0)
DISAGREE_B_RGB = (0, 190, 255)
DISAGREE_BOTH_RGB = (255, 0, 255)


def disagreement_view(frame: np.ndarray, labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """The frame in dimmed grey where A and B agree (agreed foreground brighter), and the pixels where
    they differ painted: orange = only A says object, blue = only B, magenta = both say object but a
    different one."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    agree_fg = (labels_a == labels_b) & (labels_a > 0)
    shade = np.where(agree_fg, 0.8, 0.35)[..., None]
    out = np.repeat(grey[..., None], 3, axis=2) * shade
    a_fg, b_fg = labels_a > 0, labels_b > 0
    out[a_fg & ~b_fg] = DISAGREE_A_RGB
    out[b_fg & ~a_fg] = DISAGREE_B_RGB
    out[a_fg & b_fg & (labels_a != labels_b)] = DISAGREE_BOTH_RGB
    return np.clip(out, 0, 255).astype(np.uint8)


def mean_object_iou(labels_a: np.ndarray, labels_b: np.ndarray, num_objects: int) -> float:
    """IoU of A and B per object, averaged over objects (an object absent from both counts 1)."""
    return float(np.mean([jaccard(labels_a == k, labels_b == k) for k in range(1, num_objects + 1)]))


@dataclass
class FrameSeries:
    """Per-frame numbers for the comparison chart; ``None`` where a frame has no result (or no GT).

    ``area[model][k]`` is object k's share of the frame (0..1); ``j_gt[model]`` the mean J against
    the ground truth over objects.
    """

    frames: list[int]
    iou_ab: list[float | None]
    area: dict[str, dict[int, list[float | None]]] = field(default_factory=dict)
    j_gt: dict[str, list[float | None]] = field(default_factory=dict)


def frame_series(
    results: dict[str, Sequence[np.ndarray | None]],
    num_objects: int,
    gt: Sequence[np.ndarray | None] | None = None,
) -> FrameSeries:
    """Per-frame IoU between the first two models of ``results``, mask area per object and model, and
    J against ``gt`` (a label map per frame, ``None`` where there is none)."""
    names = list(results)
    n = len(next(iter(results.values()))) if results else 0
    series = FrameSeries(frames=list(range(n)), iou_ab=[None] * n)
    for name in names:
        series.area[name] = {k: [None] * n for k in range(1, num_objects + 1)}
        if gt is not None:
            series.j_gt[name] = [None] * n
    for t in range(n):
        labs = {name: results[name][t] for name in names}
        if len(names) >= 2 and labs[names[0]] is not None and labs[names[1]] is not None:
            series.iou_ab[t] = mean_object_iou(labs[names[0]], labs[names[1]], num_objects)
        for name, lab in labs.items():
            if lab is None:
                continue
            for k in range(1, num_objects + 1):
                series.area[name][k][t] = float((lab == k).mean())
            if gt is not None and t < len(gt) and gt[t] is not None:
                series.j_gt[name][t] = mean_object_iou(gt[t], lab, num_objects)
    return series
