"""DAVIS region similarity J, boundary F and per-object statistics, as the official protocol defines them.

Numbers must equal davisvideochallenge/davis2017-evaluation to the last digit, so every quirk of
that protocol is reproduced on purpose (each one is commented where it happens): the half-pixel
boundary map with its special last row/column and zeroed corner, the disk tolerance
``ceil(0.008 * ||(H, W)||)`` applied with ``cv2.dilate``, the precision/recall edge cases, float64
arithmetic in the same order, and the uint8 bin indices of the decay statistic.
"""
from __future__ import annotations

import functools
import warnings

import cv2
import numpy as np

BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal (official default)
N_DECAY_BINS = 4


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """Region similarity J (IoU) of binary masks; an empty union scores 1.

    Accepts one frame ``(H, W)`` (returns a float) or a stack ``(T, H, W)`` (returns ``(T,)`` float64).
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} shapes differ")
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    inter = np.sum(gt & pred, axis=(-2, -1))
    union = np.sum(gt | pred, axis=(-2, -1))
    # Integer counts divided in float64, like the official tool; 0/0 is replaced by 1 just below.
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j[union == 0] = 1.0
    return j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask, offset half a pixel toward the origin.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour
    (outside the image counts as background for those shifted copies). The last row only compares
    with the east neighbour, the last column only with the south neighbour, and the bottom-right
    corner is never a boundary: the official tool (after D. Martin's Berkeley code) does exactly
    this, so a mask touching the right or bottom edge gets no boundary along that edge.
    """
    seg = seg.astype(bool)
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


@functools.lru_cache(maxsize=8)
def disk(radius: int) -> np.ndarray:
    """Disk structuring element as skimage.morphology.disk: points with ``x^2 + y^2 <= r^2``, uint8."""
    r = int(radius)
    coords = np.arange(-r, r + 1)
    xx, yy = np.meshgrid(coords, coords)
    kernel = (xx**2 + yy**2 <= r**2).astype(np.uint8)
    kernel.flags.writeable = False  # cached: callers must not modify it
    return kernel


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ``bound_th`` itself when >= 1, else ``ceil(bound_th * ||(H, W)||)``."""
    if bound_th >= 1:
        return int(bound_th)
    # Same float64 expression as the official tool (product first, then ceil): 480x854 gives 8.
    return int(np.ceil(bound_th * np.linalg.norm(shape)))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one frame: predicted vs ground-truth contours matched within the tolerance.

    precision = share of predicted boundary pixels within the tolerance of a GT boundary pixel,
    recall = the converse; F = 2PR / (P + R), 0 when P + R = 0. Edge cases follow the protocol:
    no predicted boundary but a GT one gives P=1, R=0 (F=0); the reverse gives P=0, R=1 (F=0);
    neither gives P=R=1 (F=1).
    """
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"expected two (H, W) masks of one shape, got {gt.shape} and {pred.shape}")
    # The official tool takes the diagonal of the prediction's shape; both shapes are equal here.
    kernel = disk(boundary_tolerance(pred.shape, bound_th))
    pred_b = seg2bmap(pred)
    gt_b = seg2bmap(gt)
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        pred_dil = cv2.dilate(pred_b.astype(np.uint8), kernel)
        gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel)
        precision = np.count_nonzero(pred_b & (gt_dil > 0)) / float(n_pred)
        recall = np.count_nonzero(gt_b & (pred_dil > 0)) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    # Same operation order as the official tool so the float64 result is bit-identical.
    return float(2 * precision * recall / (precision + recall))


def boundary_f_frames(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> np.ndarray:
    """:func:`boundary_f` of every frame of ``(T, H, W)`` stacks: ``(T,)`` float64."""
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"expected two (T, H, W) stacks of one shape, got {gt.shape} and {pred.shape}")
    return np.array([boundary_f(g, p, bound_th) for g, p in zip(gt, pred)], dtype=np.float64)


def decay_bin_indices(n: int, reproduce_uint8_overflow: bool = True) -> np.ndarray:
    """Start/end frame indices of the 4 decay bins: ``round(linspace(1, n, 5) + 1e-10) - 1``.

    The ``+ 1e-10`` makes halves round up (numpy rounds halves to even). The official tool casts
    these indices to uint8, so for more than 256 frames they wrap modulo 256 (x86 float->uint8
    behaviour) and the decay is computed on the wrong frames. DAVIS sequences are shorter than
    that, but long-video benchmarks are not: ``reproduce_uint8_overflow=True`` (the default) keeps
    the official numbers; ``False`` gives the intended bins.
    """
    ids = np.round(np.linspace(1, n, N_DECAY_BINS + 1) + 1e-10) - 1
    ids = ids.astype(np.int64)
    if reproduce_uint8_overflow:
        ids = ids % 256
    return ids


def object_statistics(
    per_frame: np.ndarray, reproduce_uint8_overflow: bool = True
) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores, as the official ``db_statistics``.

    mean = nanmean; recall = share of frames scoring > 0.5 (a NaN counts as a miss); decay =
    nanmean of the first of 4 overlapping bins minus nanmean of the last one. The bin end is
    ``index + 1`` computed in int64 (under the numpy 1.x the official tool needs, a uint8 scalar plus
    a Python int promotes to int64, so 255 + 1 is 256, not 0).
    """
    values = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # nanmean of an empty/all-NaN bin is NaN
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        ids = decay_bin_indices(len(values), reproduce_uint8_overflow)
        bins = [values[int(ids[i]) : int(ids[i + 1]) + 1] for i in range(N_DECAY_BINS)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))
    return mean, recall, decay

