"""Shared pieces of the correspondence losses: candidate sets and the InfoNCE cross-entropy.

Both L_PCL (pixel level) and L_OCL (object level) are contrastive: a query feature must pick its
positive out of a set of candidates. Similarities always come from
``corrvos.models.similarity.similarity`` with the candidates on the *memory* side (the axis the
softmax runs over) and the query on the *query* side, exactly as in a memory read; the query-norm
term that ``similarity`` drops is constant over the candidates and cancels in the softmax.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

# Finite rather than -inf so that a row whose candidates are all masked gives a finite loss that
# the ``valid`` mask then drops, instead of a NaN that would poison the whole batch.
_MASKED = -1e4


class Negatives(str, Enum):
    """Which candidates compete with the positive (paper Table 5 ablation).

    INTRA: candidates of the same video only; INTER: the positive plus candidates of the other
    videos of the batch; BOTH: the union (the paper's default: "both inter- and intra-video").
    """

    INTRA = "intra"
    INTER = "inter"
    BOTH = "both"


def contrastive_ce(sim: Tensor, target: Tensor, allowed: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """Mean over valid queries of ``-log softmax(sim)[target]`` (InfoNCE), softmax over candidates.

    Args:
        sim: ``(B, N, M)`` similarities of N candidates to M queries.
        target: ``(B, M)`` index of each query's positive among the N candidates.
        allowed: optional ``(B, N, M)`` (or broadcastable) bool mask of candidates that take part.
            The positive must be allowed.
        valid: optional ``(B, M)`` bool mask of queries that count.

    Returns:
        A scalar; exactly 0 (still attached to the graph) when no query is valid.
    """
    sim = sim.float()
    if allowed is not None:
        sim = sim.masked_fill(~allowed, _MASKED)
    loss = F.cross_entropy(sim, target, reduction="none")  # (B, M)
    if valid is None:
        return loss.mean()
    valid = valid.to(loss.dtype)
    return (loss * valid).sum() / valid.sum().clamp(min=1.0)


def video_candidate_mask(batch: int, per_video: int, mode: Negatives | str, target: Tensor,
                         query_video: Tensor) -> Tensor | None:
    """Allowed-candidate mask for candidates laid out video by video (``N = batch * per_video``).

    Args:
        target: ``(..., M)`` global candidate index of each query's positive.
        query_video: ``(M,)`` the video each query column belongs to.
    Returns:
        A bool ``(..., N, M)`` mask (``(N, M)`` when it does not depend on the target), or None when every
        candidate takes part (``BOTH``), following ``mode``.
    """
    mode = Negatives(mode)
    if mode is Negatives.BOTH:
        return None
    owner = torch.arange(batch * per_video, device=target.device) // per_video  # (N,)
    same_video = owner[:, None] == query_video[None, :]  # (N, M)
    if mode is Negatives.INTRA:
        return same_video
    # INTER: all candidates of other videos, and of this video only the positive itself.
    is_positive = torch.arange(batch * per_video, device=target.device)[:, None] == target[..., None, :]
    return ~same_video | is_positive
