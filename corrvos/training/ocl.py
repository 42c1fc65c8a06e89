"""L_OCL: correspondence learning from object-level coherence (paper Eq. 8-11, Sec. 3.3).

The paper's code has no object-level loss; this is our implementation of the text. Choices
(also in the README, "Correspondence-aware training"):

* Objects. Every frame has a set of boxes ``(x1, y1, x2, y2)`` in crop pixels: Selective Search
  proposals (id 0) and the annotated objects (id > 0, boxes from their masks). Switches keep
  only one kind (paper Table 6).
* Frames. t = the first and t' = the last frame of the training clip: the most distant pair the
  sampled clip offers ("two distant frames").
* Clusters and queries. A proposal's cluster is the cell of a grid of ``cell x cell``-pixel cells
  (``cell = 32``, the paper's "32 x 32 grids") that holds its centre. |Q| = 3 distinct clusters
  of frame t are drawn at random and one box is drawn in each; an annotated object in the cluster
  is preferred (it has a known match). Annotated objects that are absent from t' are dropped.
* Object features: ``p = mean(RoIAlign(K, box))`` on the stride-16 key map (the same keys the
  memory read uses), 4x4 bins, ``aligned=True``. Frame t' keeps at most ``max_candidates`` boxes
  (annotated ones always kept) so the cost stays bounded.
* Matching (Eq. 9-10): annotated query objects match the box of the same id in t'; proposal
  queries are assigned to the remaining boxes of t' by an exact maximum-weight assignment of the
  ``similarity`` (no gradient), the problem the Hungarian algorithm solves. With |Q| <= 5 it is
  solved on the features' device by enumeration: in an optimal assignment each of m queries gets
  one of its own m best candidates (otherwise one of those is free and at least as good), so the
  ``k^m`` combinations of per-query top-k candidates contain the optimum. This keeps the training
  step free of a device-to-host synchronisation (measured: the CPU round trip through
  ``scipy.optimize.linear_sum_assignment`` cost more than the rest of the loss on an H100);
  larger |Q| falls back to scipy. Tests check the two agree. The query norm that ``similarity``
  drops adds the same constant to every complete assignment, so the optimum is unchanged.
* Loss (Eq. 11): InfoNCE of p_i against p'_{j*} with negatives O = the object features (queries
  and t' boxes) of the other videos of the batch. Eq. 11 has the sum over Q inside the log; we use
  the mean over queries of ``-log(...)`` (standard InfoNCE) for the same reason as in L_PCL.
  ``Negatives.INTRA`` uses instead the boxes of t' of the same video that overlap the positive
  with IoU < 0.5 (likely other instances); ``BOTH`` uses both sets.
* One video in the batch (no inter-video negatives): ``BOTH`` falls back to the intra-video
  negatives; a query with no negative at all is not counted, and when no query counts the loss
  is an exact 0 attached to the graph (``OclResult.num_queries == 0`` says so).
* Boxes and ids are expected on the CPU (tensors or numpy arrays). The per-video bookkeeping is
  numpy, not torch: on a GPU the small model's step is bound by the host, and ~1,100 tiny torch CPU
  ops per step (several microseconds each) cost ~4 ms where numpy takes ~1 ms; the random draws stay
  torch's, so the results are bit-identical to the torch version. Its arrays reach the device in three
  copies (boxes, integers, flags) instead of one per array. The features stay on the device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_iou, roi_align

from corrvos.models.similarity import similarity
from corrvos.training.contrastive import Negatives, contrastive_ce

NUM_QUERIES = 3
CLUSTER_CELL = 32
MAX_CANDIDATES = 128
ROI_BINS = 4
INTRA_IOU = 0.5
MAX_ENUMERATED_QUERIES = 5
_NEG = -1e30
# Boxes or ids of one sample: CPU tensors or numpy arrays (the bookkeeping is numpy).
HostBoxes = Union[Tensor, np.ndarray]


class OclResult(NamedTuple):
    loss: Tensor
    num_queries: Tensor  # queries that entered the loss, a 0-dim tensor (0: the loss is an exact, attached 0)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> ``device`` without a stream synchronisation (pinned, non-blocking copy on CUDA)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def object_features(key: Tensor, rois: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Eq. 8: ``AVGPool(RoIAlign(K, box))`` for ``(R, 5)`` rois ``(batch index, x1, y1, x2, y2)`` in pixels."""
    if len(rois) == 0:
        return key.new_zeros(0, key.shape[1])
    scale = key.shape[-1] / image_size[1]
    return roi_align(key, rois.to(key.dtype), output_size=ROI_BINS, spatial_scale=scale, sampling_ratio=2,
                     aligned=True).mean(dim=(2, 3))


def assign(sim: Tensor, cand_ok: Tensor, query_on: Tensor) -> Tensor:
    """Maximum-weight assignment of the active queries of each sample to distinct allowed candidates.

    Args:
        sim: ``(B, N, Q)`` similarities of N candidates to Q queries.
        cand_ok: ``(B, N)`` bool, candidates that may be assigned.
        query_on: ``(B, Q)`` bool, queries to assign (the others get -1).
    Returns:
        ``(B, Q)`` long candidate index per query; -1 for inactive queries and for every query of a
        sample that has fewer allowed candidates than active queries.
    """
    b, n, q = sim.shape
    out = torch.full((b, q), -1, dtype=torch.long, device=sim.device)
    if n == 0 or q == 0:
        return out
    if q > MAX_ENUMERATED_QUERIES:
        return _assign_scipy(sim, cand_ok, query_on)
    masked = sim.float().masked_fill(~cand_ok[:, :, None], _NEG)
    k = min(q, n)
    top_val, top_idx = masked.topk(k, dim=1)  # (B, k, Q)
    # All k^q choices of a rank per query, made on the device (no host-to-device copy).
    digit = k ** torch.arange(q - 1, -1, -1, device=sim.device)
    combos = torch.div(torch.arange(k**q, device=sim.device)[:, None], digit, rounding_mode="floor") % k  # (C, Q)
    qi = torch.arange(q, device=sim.device)
    chosen = top_idx[:, combos, qi]  # (B, C, Q) candidate of each query under each combination
    value = top_val[:, combos, qi]
    on = query_on[:, None, :]
    score = (value * on).sum(-1)
    same = chosen[..., :, None] == chosen[..., None, :]  # (B, C, Q, Q)
    both_on = on[..., :, None] & on[..., None, :]
    clash = (same & both_on & ~torch.eye(q, dtype=torch.bool, device=sim.device)).any(-1).any(-1)
    feasible = ~clash & ~((value <= _NEG / 2) & on).any(-1)
    best = score.masked_fill(~feasible, -float("inf")).argmax(dim=1)  # (B,)
    pick = chosen[torch.arange(b, device=sim.device), best]  # (B, Q)
    ok = feasible.any(dim=1)[:, None] & query_on
    return torch.where(ok, pick, out)


def _assign_scipy(sim: Tensor, cand_ok: Tensor, query_on: Tensor) -> Tensor:
    out = torch.full(query_on.shape, -1, dtype=torch.long)
    sim_np, cand_np, on_np = sim.detach().float().cpu().numpy(), cand_ok.cpu().numpy(), query_on.cpu().numpy()
    for b in range(sim_np.shape[0]):
        cands, queries = np.nonzero(cand_np[b])[0], np.nonzero(on_np[b])[0]
        if len(queries) == 0 or len(cands) < len(queries):
            continue
        rows, cols = linear_sum_assignment(sim_np[b][np.ix_(cands, queries)].T, maximize=True)
        out[b, torch.from_numpy(queries[rows])] = torch.from_numpy(cands[cols].astype(np.int64))
    return out.to(sim.device)


def match_objects(query_feat: Tensor, cand_feat: Tensor) -> Tensor:
    """Eq. 9-10 for one sample: ``(Q, C)`` queries, ``(N, C)`` candidates (N >= Q) -> ``(Q,)`` j* per query."""
    with torch.no_grad():
        sim = similarity(cand_feat.detach().float().T[None], query_feat.detach().float().T[None])  # (1, N, Q)
        ok = torch.ones(1, len(cand_feat), dtype=torch.bool, device=sim.device)
        on = torch.ones(1, len(query_feat), dtype=torch.bool, device=sim.device)
        return assign(sim, ok, on)[0]


def host_array(x: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    """``x`` as a numpy array of ``dtype``: zero-copy, and no torch op, for CPU tensors without grad."""
    if torch.is_tensor(x):
        x = (x if x.device.type == "cpu" and not x.requires_grad else x.detach().cpu()).numpy()
    return np.asarray(x).astype(dtype, copy=False)


def sample_queries(boxes: Tensor | np.ndarray, ids: Tensor | np.ndarray, num_queries: int = NUM_QUERIES,
                   cell: int = CLUSTER_CELL, generator: torch.Generator | None = None) -> np.ndarray:
    """Indices of up to ``num_queries`` boxes whose centres lie in distinct grid cells (sparse Q).

    The bookkeeping is numpy (a few microseconds per call, where each small torch op costs several);
    only the random draws are torch's, so that ``generator`` (or torch's global RNG) decides them.
    """
    boxes, ids = host_array(boxes, np.float32), host_array(ids, np.int64)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = np.floor_divide(centres, cell).astype(np.int64)
    cluster = cells[:, 1] * 100_000 + cells[:, 0]
    unique = np.unique(cluster)
    order = torch.randperm(len(unique), generator=generator)[:num_queries].numpy()
    picked = []
    for u in unique[order]:
        members = np.flatnonzero(cluster == u)
        annotated = members[ids[members] > 0]
        pool = annotated if len(annotated) else members
        picked.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
    return np.asarray(picked, dtype=np.int64)


def _select_kinds(boxes: np.ndarray, ids: np.ndarray, proposals: bool, annotated: bool) -> tuple[np.ndarray, np.ndarray]:
    keep = ((ids == 0) & proposals) | ((ids > 0) & annotated)
    return boxes[keep], ids[keep]


def _cap_candidates(boxes: np.ndarray, ids: np.ndarray, limit: int,
                    generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    if len(boxes) <= limit:
        return boxes, ids
    annotated = np.flatnonzero(ids > 0)
    others = np.flatnonzero(ids <= 0)
    others = others[torch.randperm(len(others), generator=generator)[: max(0, limit - len(annotated))].numpy()]
    keep = np.concatenate([annotated, others])
    return boxes[keep], ids[keep]


class _Plan(NamedTuple):
    """Host-side layout of one OCL step: the candidate bank and the padded query / candidate slots."""

    rois: np.ndarray  # (M, 5) float32: RoIAlign rows (key-map index, x1, y1, x2, y2); columns 1: = the boxes
    ints: dict[str, np.ndarray]  # int64 arrays, moved to the device in one copy
    flags: dict[str, np.ndarray]  # bool arrays, moved in one copy


def _plan(boxes_t: Sequence[HostBoxes], ids_t: Sequence[HostBoxes], boxes_t2: Sequence[HostBoxes],
          ids_t2: Sequence[HostBoxes], use_proposals: bool, use_annotated: bool, num_queries: int, cell: int,
          max_candidates: int, generator: torch.Generator | None) -> _Plan | None:
    """Which boxes, which queries, which matches are known by identity; None when there is no query."""
    batch = len(boxes_t)
    q_boxes, p_boxes, known, free = [], [], [], []
    for b in range(batch):
        bt, it = _select_kinds(host_array(boxes_t[b], np.float32), host_array(ids_t[b], np.int64), use_proposals, use_annotated)
        bt2, it2 = _select_kinds(host_array(boxes_t2[b], np.float32), host_array(ids_t2[b], np.int64), use_proposals, use_annotated)
        bt2, it2 = _cap_candidates(bt2, it2, max_candidates, generator)
        # An annotated object can only be a query if it is still visible in t'.
        present = (it <= 0) | np.isin(it, it2[it2 > 0])
        bt, it = bt[present], it[present]
        q = sample_queries(bt, it, num_queries, cell, generator)
        q = q[: len(bt2)]  # an assignment needs at least as many candidates as queries
        j_known = np.full(len(q), -1, dtype=np.int64)
        for i, obj in enumerate(it[q]):
            if obj > 0:
                j_known[i] = np.flatnonzero(it2 == obj)[0]
        f = np.ones(len(bt2), dtype=bool)
        f[j_known[j_known >= 0]] = False
        q_boxes.append(bt[q])
        p_boxes.append(bt2)
        known.append(j_known)
        free.append(f)

    n_q = np.array([len(x) for x in q_boxes], dtype=np.int64)
    n_p = np.array([len(x) for x in p_boxes], dtype=np.int64)
    if n_q.sum() == 0:
        return None
    q_max, p_max = int(n_q.max()), max(int(n_p.max()), 1)

    # Layout of the candidate bank, video by video: [t' boxes of video b, queries of video b].
    bank_boxes = np.concatenate([np.concatenate([p_boxes[b], q_boxes[b]]).reshape(-1, 4) for b in range(batch)])
    owner = np.repeat(np.arange(batch), n_p + n_q)
    is_query = np.concatenate([np.repeat([False, True], [n_p[b], n_q[b]]) for b in range(batch)])
    p_offset = np.concatenate([[0], np.cumsum(n_p + n_q)[:-1]]).astype(np.int64)
    # Padded (B, Q) / (B, N) views for the assignment, as flat indices into the bank (-1 = padding).
    q_col, p_col = np.arange(q_max), np.arange(p_max)
    q_in, p_in = q_col[None, :] < n_q[:, None], p_col[None, :] < n_p[:, None]
    q_slot = np.where(q_in, p_offset[:, None] + n_p[:, None] + q_col[None, :], -1)
    p_slot = np.where(p_in, p_offset[:, None] + p_col[None, :], -1)
    cand_ok = np.zeros((batch, p_max), dtype=bool)
    cand_ok[p_in] = np.concatenate(free)
    known_pad = np.full((batch, q_max), -1, dtype=np.int64)
    known_pad[q_in] = np.concatenate(known)
    query_on = q_in & (known_pad < 0)  # proposal queries: matched by assignment
    bank_q = np.flatnonzero(is_query)  # bank rows that are queries, in (video, query) order
    # RoIAlign reads queries from the frame-t keys (rows 0..B-1 of the stacked maps) and the rest from t'.
    rois = np.concatenate([(owner + np.where(is_query, 0, batch))[:, None].astype(np.float32), bank_boxes], axis=1)
    ints = dict(owner=owner, p_offset=p_offset, q_slot=q_slot, p_slot=p_slot, known_pad=known_pad, bank_q=bank_q,
                q_owner=owner[bank_q], q_flat=np.flatnonzero(q_in))
    flags = dict(is_query=is_query, cand_ok=cand_ok, query_on=query_on)
    return _Plan(rois, ints, flags)


def _to_device_packed(arrays: dict[str, np.ndarray], dtype: np.dtype, device: torch.device) -> dict[str, Tensor]:
    """Several small host arrays -> device tensors through a single copy (each copy is a launch)."""
    flat = np.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays.values()])
    packed = to_device(torch.from_numpy(flat), device)
    out, start = {}, 0
    for name, a in arrays.items():
        out[name] = packed[start:start + a.size].view(a.shape)
        start += a.size
    return out


def ocl_loss(key_t: Tensor, key_t2: Tensor, boxes_t: Sequence[HostBoxes], ids_t: Sequence[HostBoxes],
             boxes_t2: Sequence[HostBoxes], ids_t2: Sequence[HostBoxes], image_size: tuple[int, int], *,
             negatives: Negatives | str = Negatives.BOTH, use_proposals: bool = True, use_annotated: bool = True,
             num_queries: int = NUM_QUERIES, cell: int = CLUSTER_CELL, max_candidates: int = MAX_CANDIDATES,
             generator: torch.Generator | None = None) -> OclResult:
    """L_OCL between frames t and t' of a batch of clips.

    Args:
        key_t, key_t2: ``(B, C, h, w)`` keys of frames t and t'.
        boxes_t, boxes_t2: per sample ``(N, 4)`` float boxes (x1, y1, x2, y2) in crop pixels (tensors on
            the CPU, or numpy arrays).
        ids_t, ids_t2: per sample ``(N,)`` long: 0 for a proposal, the object id (> 0) for an annotation.
        image_size: ``(H, W)`` of the crop the boxes refer to.
    """
    negatives = Negatives(negatives)
    device = key_t.device
    if not len(boxes_t) == len(ids_t) == len(boxes_t2) == len(ids_t2) == key_t.shape[0]:
        raise ValueError(f"ocl_loss needs one box and id list per sample: batch {key_t.shape[0]}, lists of "
                         f"{len(boxes_t)}, {len(ids_t)}, {len(boxes_t2)}, {len(ids_t2)}")

    plan = _plan(boxes_t, ids_t, boxes_t2, ids_t2, use_proposals, use_annotated, num_queries, cell,
                 max_candidates, generator)
    if plan is None:
        zero = key_t.sum() * 0.0 + key_t2.sum() * 0.0
        return OclResult(zero, torch.zeros((), device=device))

    # ---- device side: one RoIAlign over both frames, the assignment, the InfoNCE.
    rois = to_device(torch.from_numpy(plan.rois), device)
    dev = _to_device_packed(plan.ints, np.int64, device) | _to_device_packed(plan.flags, np.bool_, device)
    dev["bank_boxes"] = rois[:, 1:]
    feats = object_features(torch.cat([key_t, key_t2]), rois, image_size)  # (M, C)

    with torch.no_grad():
        detached = feats.detach().float()
        q_pad = detached[dev["q_slot"].clamp(min=0)]  # (B, Q, C)
        p_pad = detached[dev["p_slot"].clamp(min=0)]  # (B, N, C)
        sim = similarity(p_pad.transpose(1, 2), q_pad.transpose(1, 2))  # (B, N, Q)
        assigned = assign(sim, dev["cand_ok"], dev["query_on"])
        local = torch.where(dev["known_pad"] >= 0, dev["known_pad"], assigned)  # (B, Q) index into t' boxes
        target_pad = torch.where(local >= 0, dev["p_offset"][:, None] + local, -1)
        target = target_pad.flatten()[dev["q_flat"]]  # (Q_total,), video by video like bank_q
    has_pos = target >= 0
    target = target.clamp(min=0)

    m = len(feats)
    cols = torch.arange(m, device=device)
    allowed = torch.zeros(len(target), m, dtype=torch.bool, device=device)
    same_video = dev["owner"][None, :] == dev["q_owner"][:, None]
    if negatives in (Negatives.INTER, Negatives.BOTH):
        allowed |= ~same_video
    if negatives in (Negatives.INTRA, Negatives.BOTH):
        boxes_dev = dev["bank_boxes"]
        iou = box_iou(boxes_dev[target], boxes_dev)  # (Q_total, M)
        allowed |= same_video & ~dev["is_query"][None, :] & (iou < INTRA_IOU)
    allowed &= cols[None, :] != target[:, None]
    valid = has_pos & allowed.any(dim=1)
    allowed |= cols[None, :] == target[:, None]

    queries = feats[dev["bank_q"]]  # (Q_total, C)
    sim = similarity(feats.T[None], queries.T[None])  # (1, M, Q_total)
    loss = contrastive_ce(sim, target[None], allowed.T[None], valid[None])
    return OclResult(loss, valid.sum())
