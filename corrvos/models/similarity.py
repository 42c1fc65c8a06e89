"""The one similarity / affinity implementation of corrvos.

Inference (STCN and XMem memory reads), training (segmentation forward and the correspondence
losses PCL/OCL), the correspondence metrics and the app's heatmaps all call these functions, so
the weight a person sees in a heatmap is exactly the weight the model used.

Shapes: memory keys ``(B, C, N)`` and query keys ``(B, C, M)``; similarities and affinities are
``(B, N, M)`` with the softmax taken over the memory axis (dim 1). ``similarity(...,
query_major=True)`` gives the same numbers laid out ``(B, M, N)``: the memory axis is then the
contiguous one, which is what the inference read wants (:func:`topk_affinity` takes the top-k along
it and :func:`read_topk` gathers only the k selected values per query instead of multiplying a
dense, mostly-zero ``N x M`` affinity).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Workspace:
    """Storage reused from one inference read to the next for its large temporaries.

    An ``N x M`` similarity of a 480p frame against a few memory frames is tens of MiB; allocating
    it afresh every frame costs as much as computing it on the CPU (the kernel maps and zeroes new
    pages: 18 of the 37 ms of a 1620 x 6480 similarity, one thread). A tensor handed out by
    :meth:`get` aliases the storage and is valid until the next request for the same slot.
    """

    def __init__(self) -> None:
        self._slots: dict[str, Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._slots.get(slot)
        if buf is None or buf.device != like.device or buf.dtype != like.dtype:
            buf = None
        if buf is None or buf.numel() < numel:
            # Some headroom: the memory, and so the similarity, grows by a frame at a time.
            grown = numel if buf is None else max(numel, buf.numel() * 3 // 2)
            buf = like.new_empty(grown)
            self._slots[slot] = buf
        return buf[:numel].view(shape)


def similarity(
    mem_key: Tensor,
    query_key: Tensor,
    mem_shrinkage: Tensor | None = None,
    query_selection: Tensor | None = None,
    *,
    query_major: bool = False,
    workspace: Workspace | None = None,
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
        query_major: return ``(B, M, N)`` instead of ``(B, N, M)``. Both layouts evaluate the same
            expression element by element (the products are the same dot products), so they agree
            exactly on the CPU and to rounding elsewhere.
        workspace: without autograd, write the result into this reusable storage (it is then valid
            until the workspace's next similarity); same values.

    Returns:
        ``(B, N, M)`` similarities, or ``(B, M, N)`` with ``query_major``.
    """
    channels = mem_key.shape[1]
    # Without autograd the elementwise steps run in place: the same values, but no fresh N x M
    # temporaries (each one a page-faulting allocation on the CPU and a memory pass on any device).
    # Only where every intermediate has one dtype (no autocast, no mixed inputs): in place, a
    # low-precision product would not be promoted as the out-of-place expression promotes it.
    given = [t for t in (mem_key, query_key, mem_shrinkage, query_selection) if t is not None]
    inplace = (
        not _needs_graph(*given)
        and not torch.is_autocast_enabled(mem_key.device.type)
        and all(t.dtype == mem_key.dtype for t in given)
    )
    # The memory operand of the products and the axis the memory runs along in the result.
    mem_side, mem_axis = (mem_key, 2) if query_major else (mem_key.transpose(1, 2), 1)

    def product(mem_term: Tensor, query_term: Tensor, slot: str) -> Tensor:
        # query_term is (B, C, M); mem_term is laid out like mem_side
        a, b = (mem_term, query_term) if not query_major else (query_term.transpose(1, 2), mem_term)
        if workspace is None or not inplace or a.dim() != 3 or a.shape[0] != b.shape[0]:
            return a @ b
        return torch.bmm(a, b, out=workspace.get(slot, (a.shape[0], a.shape[1], b.shape[2]), a))

    if query_selection is not None:
        a_sq = product(mem_side.pow(2), query_selection, "similarity_aux")
        two_ab = product(mem_side, query_key * query_selection, "similarity")
        b_sq = (query_selection * query_key.pow(2)).sum(1).unsqueeze(mem_axis)
        if inplace:
            sim = two_ab.mul_(2).sub_(a_sq).sub_(b_sq)
        else:
            sim = 2 * two_ab - a_sq - b_sq
    else:
        a_sq = mem_key.pow(2).sum(1).unsqueeze(3 - mem_axis)
        ab = product(mem_side, query_key, "similarity")
        sim = ab.mul_(2).sub_(a_sq) if inplace else 2 * ab - a_sq
    if mem_shrinkage is not None:
        shrink = mem_shrinkage.reshape(sim.shape[0], 1, -1) if query_major else mem_shrinkage.reshape(sim.shape[0], -1, 1)
        sim = sim.mul_(shrink) if inplace else sim * shrink
    scale = math.sqrt(channels)
    return sim.div_(scale) if inplace else sim / scale


def softmax_affinity(sim: Tensor, top_k: int | None = None) -> Tensor:
    """Normalise similarities over the memory axis (dim 1) into read weights.

    ``top_k=None`` is the full softmax used in training. With ``top_k`` only the k largest
    similarities per query keep weight (the MiVOS/STCN/XMem inference trick) and the rest are 0.
    The maximum is subtracted before ``exp`` in both cases: mathematically the same normalised
    weights as upstream (which exponentiates the top-k values directly), but safe in half precision.
    This dense form is what training uses; inference reads with the equivalent sparse
    :func:`topk_affinity` + :func:`read_topk`.
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


class TopKAffinity(NamedTuple):
    """Sparse read weights: for each query, ``weights[b, m, j]`` goes to memory element ``indices[b, m, j]``.

    ``indices`` is None when every element keeps weight (no top-k, or k >= N): ``weights`` is then
    the dense ``(B, M, N)`` softmax.
    """

    weights: Tensor  # (B, M, k) or (B, M, N)
    indices: Tensor | None  # (B, M, k) int64

    def dense(self, num_elements: int) -> Tensor:
        """The same weights as :func:`softmax_affinity` gives: ``(B, N, M)``."""
        if self.indices is None:
            return self.weights.transpose(1, 2)
        b, m, _ = self.weights.shape
        out = self.weights.new_zeros(b, m, num_elements).scatter_(2, self.indices, self.weights)
        return out.transpose(1, 2)

    def element_sums(self, num_elements: int) -> Tensor:
        """``(B, N)``: each memory element's weight summed over the queries (XMem's usage)."""
        if self.indices is None:
            return self.weights.sum(1)
        b = self.weights.shape[0]
        out = self.weights.new_zeros(b, num_elements)
        return out.scatter_add_(1, self.indices.flatten(1), self.weights.flatten(1))

    def remap(self, index: Tensor, num_elements: int) -> "TopKAffinity":
        """Weights over a subset (``index`` selected the elements) -> weights over all ``num_elements``."""
        if self.indices is None:
            b, m, _ = self.weights.shape
            expanded = index.view(1, 1, -1).expand(b, m, -1)
            return TopKAffinity(self.weights, expanded)
        return TopKAffinity(self.weights, index[self.indices])


def topk_affinity(sim: Tensor, top_k: int | None = None) -> TopKAffinity:
    """:func:`softmax_affinity` for query-major ``(B, M, N)`` similarities, kept sparse.

    Same rule (the k largest similarities per query, softmax over them with the maximum subtracted),
    but the top-k runs along the contiguous memory axis and nothing is scattered into an ``N x M``
    matrix. ``top_k=None`` or ``k >= N`` gives the full softmax (dense weights, no indices).
    """
    if top_k is None or top_k >= sim.shape[2]:
        return TopKAffinity(torch.softmax(sim, dim=2), None)
    values, indices = torch.topk(sim, k=top_k, dim=2)
    return TopKAffinity(torch.softmax(values, dim=2), indices)


def read_topk(affinity: TopKAffinity, mem_value: Tensor, workspace: Workspace | None = None) -> Tensor:
    """:func:`read_memory` for sparse weights and element-major values.

    Args:
        affinity: from :func:`topk_affinity`, ``(B, M, k)`` weights and indices.
        mem_value: ``(B, N, D)`` values, one row per memory element (``D`` may be objects x channels
            flattened): each query gathers its k rows (contiguous reads) and sums them weighted.
        workspace: reusable storage for the gathered rows (inference, no autograd).

    Returns:
        ``(B, M, D)`` readout: ``out[b, m] = sum_j weights[b, m, j] * mem_value[b, indices[b, m, j]]``.
    """
    weights, indices = affinity
    if indices is None:
        return weights @ mem_value
    b, n, d = mem_value.shape
    m, k = weights.shape[1:]
    flat = indices if b == 1 else indices + (torch.arange(b, device=indices.device) * n).view(b, 1, 1)
    rows = mem_value.reshape(b * n, d)
    if workspace is not None and not _needs_graph(mem_value, weights):
        gathered = torch.index_select(rows, 0, flat.reshape(-1), out=workspace.get("gather", (b * m * k, d), rows))
    else:
        gathered = rows.index_select(0, flat.reshape(-1))
    gathered = gathered.view(b * m, k, d)
    out = torch.bmm(weights.reshape(b * m, 1, k).to(gathered.dtype), gathered)
    return out.view(b, m, d)
