"""Correspondence-quality metrics: how reliable is the affinity itself, measured against the GT masks.

The paper's claim (its Fig. 1) is that correspondence-aware training makes the memory read match the
right pixels. Two numbers make that measurable on any labelled video:

- mask precision@k: for each query position of frame t, the share of the model's top-k read weight
  that lands on memory positions carrying the query position's own GT label (background counts as
  a label). 1 means every strongly weighted memory pixel belongs to the same object.
- cycle consistency: for a query frame and one memory frame, the share of query positions whose best
  match in the memory frame maps back (best match of that memory position in the query frame) to
  within ``radius`` feature cells (Chebyshev distance) of where it started.

All similarities come from :mod:`corrvos.models.similarity` (never a second implementation), so the
weights scored are the weights the model reads with. Everything here works on feature-grid tensors:
labels must first be brought to the stride-16 grid with :func:`labels_to_grid`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from corrvos.models.similarity import similarity


def labels_to_grid(labels: Tensor, stride: int = 16) -> Tensor:
    """Majority GT label of each ``stride x stride`` cell: ``(H, W)`` int labels -> ``(H/stride, W/stride)``.

    ``labels`` must already be at the network's (padded) input size, so the cells coincide with the
    key positions. Majority rather than the centre pixel keeps thin objects from vanishing between
    centres; ties go to the lower label (background first).
    """
    if labels.dim() != 2 or labels.shape[0] % stride or labels.shape[1] % stride:
        raise ValueError(f"labels must be (H, W) with H and W multiples of {stride}, got {tuple(labels.shape)}")
    labels = labels.long()
    n_labels = int(labels.max()) + 1
    one_hot = F.one_hot(labels, n_labels).permute(2, 0, 1).float().unsqueeze(0)
    counts = F.avg_pool2d(one_hot, kernel_size=stride, stride=stride)[0]
    return counts.argmax(0)


def mask_precision_at_k(
    affinity: Tensor, mem_labels: Tensor, query_labels: Tensor, k: int
) -> Tensor:
    """Per query position, the share of its top-k read weight on memory positions with its own label.

    Args:
        affinity: ``(N, M)`` read weights (memory x query), e.g. a ``softmax_affinity`` output.
        mem_labels: ``(N,)`` GT labels of the memory positions.
        query_labels: ``(M,)`` GT labels of the query positions.
        k: number of largest weights per query that are scored (clipped to N).

    Returns:
        ``(M,)`` float values in [0, 1]; NaN for a query whose top-k weights sum to 0.
    """
    if affinity.dim() != 2:
        raise ValueError(f"affinity must be (N, M), got {tuple(affinity.shape)}")
    n, m = affinity.shape
    if mem_labels.numel() != n or query_labels.numel() != m:
        raise ValueError(
            f"{n} memory / {m} query positions but {mem_labels.numel()} / {query_labels.numel()} labels"
        )
    weights, idx = torch.topk(affinity.float(), k=min(k, n), dim=0)  # (k, M)
    same = mem_labels.reshape(-1)[idx] == query_labels.reshape(1, -1)
    total = weights.sum(0)
    hit = (weights * same).sum(0)
    return torch.where(total > 0, hit / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


def cycle_consistency(
    query_key: Tensor,
    mem_key: Tensor,
    grid: tuple[int, int],
    radius: int = 1,
    *,
    mem_shrinkage: Tensor | None = None,
    query_selection: Tensor | None = None,
    query_shrinkage: Tensor | None = None,
    mem_selection: Tensor | None = None,
) -> Tensor:
    """Per query position of one frame: does query -> best memory match -> best query match come back?

    Args:
        query_key: ``(C, M)`` keys of the query frame, ``M = h * w`` in row-major order.
        mem_key: ``(C, N)`` keys of ONE memory frame.
        grid: ``(h, w)`` of the query frame's feature grid.
        radius: tolerance in feature cells (Chebyshev distance); 1 = "within one feature cell".
        mem_shrinkage, query_selection: XMem terms of the forward (query reads memory) similarity.
        query_shrinkage, mem_selection: XMem terms of the backward similarity, where the query frame
            plays memory and the memory frame plays query. Omitted terms are simply not applied.

    Returns:
        ``(M,)`` bool: True where the cycle closes within ``radius``.
    """
    h, w = grid
    if query_key.dim() != 2 or mem_key.dim() != 2 or query_key.shape[1] != h * w:
        raise ValueError(
            f"expected query_key (C, {h * w}) and mem_key (C, N), "
            f"got {tuple(query_key.shape)} and {tuple(mem_key.shape)}"
        )

    def shrink(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(1, 1, -1)

    def select(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(1, x.shape[0], -1)

    # argmax of the similarity is the argmax of any softmax/top-k of it, so no normalisation is needed.
    forward = similarity(mem_key[None], query_key[None], shrink(mem_shrinkage), select(query_selection))[0]
    best_mem = forward.argmax(0)                                     # (M,) memory index per query
    backward = similarity(query_key[None], mem_key[None], shrink(query_shrinkage), select(mem_selection))[0]
    best_query = backward.argmax(0)                                  # (N,) query index per memory position
    back = best_query[best_mem]                                      # (M,)
    start = torch.arange(h * w, device=query_key.device)
    dy = (start // w - back // w).abs()
    dx = (start % w - back % w).abs()
    return torch.maximum(dx, dy) <= radius


@dataclass
class CorrespondenceStats:
    """Running sums of the two metrics over frames and sequences (means are taken over query positions)."""

    k: int = 10
    precision_sum: float = 0.0
    precision_count: int = 0
    fg_precision_sum: float = 0.0
    fg_precision_count: int = 0
    cycle_hits: int = 0
    cycle_count: int = 0
    per_sequence: dict[str, CorrespondenceStats] = field(default_factory=dict, repr=False)

    def add_precision(self, values: Tensor, query_labels: Tensor) -> None:
        valid = ~torch.isnan(values)
        fg = valid & (query_labels.reshape(-1) > 0)
        self.precision_sum += float(values[valid].sum())
        self.precision_count += int(valid.sum())
        self.fg_precision_sum += float(values[fg].sum())
        self.fg_precision_count += int(fg.sum())

    def add_cycle(self, consistent: Tensor) -> None:
        self.cycle_hits += int(consistent.sum())
        self.cycle_count += int(consistent.numel())

    def merge(self, other: CorrespondenceStats) -> None:
        self.precision_sum += other.precision_sum
        self.precision_count += other.precision_count
        self.fg_precision_sum += other.fg_precision_sum
        self.fg_precision_count += other.fg_precision_count
        self.cycle_hits += other.cycle_hits
        self.cycle_count += other.cycle_count

    def summary(self) -> dict[str, float]:
        nan = float("nan")
        return {
            f"Precision@{self.k}": self.precision_sum / self.precision_count if self.precision_count else nan,
            f"FG-Precision@{self.k}": (
                self.fg_precision_sum / self.fg_precision_count if self.fg_precision_count else nan
            ),
            "Cycle-Consistency": self.cycle_hits / self.cycle_count if self.cycle_count else nan,
        }
