"""The one similarity / affinity implementation of corrvos.

Inference (STCN and XMem memory reads), training (segmentation forward and the correspondence
losses PCL/OCL), the correspondence metrics and the app's heatmaps all call these functions, so
the weight a person sees in a heatmap is exactly the weight the model used.

Shapes: memory keys ``(B, C, N)`` and query keys ``(B, C, M)``; similarities and affinities are
``(B, N, M)`` with the softmax taken over the memory axis (dim 1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def similarity(
    mem_key: Tensor,
    query_key: Tensor,
    mem_shrinkage: Tensor | None = None,
    query_selection: Tensor | None = None,
) -> Tensor:
    """Negative squared L2 similarity between every memory and every query position.

    Without a selection this is STCN's form ``(2 k.q - |k|^2) / sqrt(C)``: the ``|q|^2`` term is
    dropped because it is constant over the memory axis and cancels in the softmax over it.
    With a query selection ``e`` (XMem) it is the anisotropic L2 ``-sum_c e_c (k_c - q_c)^2``; there
    the ``q^2`` term is kept, because a per-memory shrinkage ``s`` multiplies it and it no longer
    cancels. The shrinkage (``(B, 1, N)`` or ``(B, N)``) scales each memory element's row.

    Args:
        mem_key: ``(B, C, N)`` memory keys.
        query_key: ``(B, C, M)`` query keys.
        mem_shrinkage: optional ``(B, 1, N)`` XMem shrinkage term (>= 1).
        query_selection: optional ``(B, C, M)`` XMem selection term in (0, 1).

    Returns:
        ``(B, N, M)`` similarities.
    """
    channels = mem_key.shape[1]
    mem_t = mem_key.transpose(1, 2)  # (B, N, C)
    if query_selection is not None:
        a_sq = mem_t.pow(2) @ query_selection
        two_ab = 2 * (mem_t @ (query_key * query_selection))
        b_sq = (query_selection * query_key.pow(2)).sum(1, keepdim=True)
        sim = two_ab - a_sq - b_sq
    else:
        a_sq = mem_key.pow(2).sum(1).unsqueeze(2)
        sim = 2 * (mem_t @ query_key) - a_sq
    if mem_shrinkage is not None:
        sim = sim * mem_shrinkage.reshape(sim.shape[0], -1, 1)
    return sim / math.sqrt(channels)


def softmax_affinity(sim: Tensor, top_k: int | None = None) -> Tensor:
    """Normalise similarities over the memory axis (dim 1) into read weights.

    ``top_k=None`` is the full softmax used in training. With ``top_k`` only the k largest
    similarities per query keep weight (the MiVOS/STCN/XMem inference trick) and the rest are 0.
    The maximum is subtracted before ``exp`` in both cases: mathematically the same normalised
    weights as upstream (which exponentiates the top-k values directly), but safe in half precision.
    """
    if top_k is None or top_k >= sim.shape[1]:
        return torch.softmax(sim, dim=1)
    values, indices = torch.topk(sim, k=top_k, dim=1)
    weights = torch.softmax(values, dim=1)
    return torch.zeros_like(sim).scatter_(1, indices, weights)


def read_memory(affinity: Tensor, mem_value: Tensor) -> Tensor:
    """Aggregate memory values with read weights: ``(B, D, N) x (B, N, M) -> (B, D, M)``.

    ``mem_value`` may also carry an object axis, ``(B, K, D, N)``, in which case the same affinity
    serves every object (the key is shared; only values are per object) and the result is
    ``(B, K, D, M)``.
    """
    if mem_value.dim() == 4:
        b, k, d, n = mem_value.shape
        out = mem_value.reshape(b, k * d, n) @ affinity
        return out.reshape(b, k, d, -1)
    return mem_value @ affinity
