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
  queries are assigned to the remaining boxes of t' by the Hungarian algorithm
  (``scipy.optimize.linear_sum_assignment``), maximising ``similarity`` (no gradient). The query
  norm that ``similarity`` drops adds the same constant to every complete assignment, so the
  optimum is unchanged.
* Loss (Eq. 11): InfoNCE of p_i against p'_{j*} with negatives O = the object features (queries
  and t' boxes) of the other videos of the batch. Eq. 11 has the sum over Q inside the log; we use
  the mean over queries of ``-log(...)`` (standard InfoNCE) for the same reason as in L_PCL.
  ``Negatives.INTRA`` uses instead the boxes of t' of the same video that overlap the positive
  with IoU < 0.5 (likely other instances); ``BOTH`` uses both sets.
* One video in the batch (no inter-video negatives): ``BOTH`` falls back to the intra-video
  negatives; a query with no negative at all is not counted, and when no query counts the loss
  is an exact 0 attached to the graph (``OclResult.num_queries == 0`` says so).
"""
from __future__ import annotations

from typing import NamedTuple

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


class OclResult(NamedTuple):
    loss: Tensor
    num_queries: int  # queries that entered the loss (0: loss is an exact, attached 0)


def object_features(key: Tensor, boxes: list[Tensor], image_size: tuple[int, int]) -> list[Tensor]:
    """Eq. 8: ``AVGPool(RoIAlign(K, box))`` for each sample's ``(N, 4)`` pixel boxes -> ``(N, C)`` each."""
    scale = key.shape[-1] / image_size[1]
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return [key.new_zeros(0, key.shape[1]) for _ in boxes]
    pooled = roi_align(key, [b.to(key.dtype) for b in boxes], output_size=ROI_BINS, spatial_scale=scale,
                       sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    return list(pooled.split(counts))


def match_objects(query_feat: Tensor, cand_feat: Tensor) -> Tensor:
    """Eq. 9-10: Hungarian assignment of ``(Q, C)`` queries to ``(N, C)`` candidates (N >= Q).

    Returns ``(Q,)`` long: the candidate index j* of every query, maximising the summed similarity.
    """
    if len(query_feat) == 0:
        return torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        sim = similarity(cand_feat.detach().float().T[None], query_feat.detach().float().T[None])[0]  # (N, Q)
    rows, cols = linear_sum_assignment(sim.T.cpu().numpy(), maximize=True)
    out = torch.empty(len(query_feat), dtype=torch.long)
    out[torch.from_numpy(rows.astype(np.int64))] = torch.from_numpy(cols.astype(np.int64))
    return out


def sample_queries(boxes: Tensor, ids: Tensor, num_queries: int = NUM_QUERIES, cell: int = CLUSTER_CELL,
                   generator: torch.Generator | None = None) -> Tensor:
    """Indices of up to ``num_queries`` boxes whose centres lie in distinct grid cells (sparse Q)."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = (centres // cell).long()
    cluster = cells[:, 1] * 100_000 + cells[:, 0]
    unique = torch.unique(cluster)
    order = torch.randperm(len(unique), generator=generator)[:num_queries]
    picked = []
    for u in unique[order]:
        members = torch.nonzero(cluster == u).flatten()
        annotated = members[ids[members] > 0]
        pool = annotated if len(annotated) else members
        picked.append(pool[torch.randint(len(pool), (1,), generator=generator)])
    return torch.cat(picked)


def _select_kinds(boxes: Tensor, ids: Tensor, proposals: bool, annotated: bool) -> tuple[Tensor, Tensor]:
    keep = ((ids == 0) & proposals) | ((ids > 0) & annotated)
    return boxes[keep], ids[keep]


def _cap_candidates(boxes: Tensor, ids: Tensor, limit: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    if len(boxes) <= limit:
        return boxes, ids
    annotated = torch.nonzero(ids > 0).flatten()
    others = torch.nonzero(ids <= 0).flatten()
    others = others[torch.randperm(len(others), generator=generator)[: max(0, limit - len(annotated))]]
    keep = torch.cat([annotated, others])
    return boxes[keep], ids[keep]


def ocl_loss(key_t: Tensor, key_t2: Tensor, boxes_t: list[Tensor], ids_t: list[Tensor], boxes_t2: list[Tensor],
             ids_t2: list[Tensor], image_size: tuple[int, int], *, negatives: Negatives | str = Negatives.BOTH,
             use_proposals: bool = True, use_annotated: bool = True, num_queries: int = NUM_QUERIES,
             cell: int = CLUSTER_CELL, max_candidates: int = MAX_CANDIDATES,
             generator: torch.Generator | None = None) -> OclResult:
    """L_OCL between frames t and t' of a batch of clips.

    Args:
        key_t, key_t2: ``(B, C, h, w)`` keys of frames t and t'.
        boxes_t, boxes_t2: per sample ``(N, 4)`` float boxes (x1, y1, x2, y2) in crop pixels.
        ids_t, ids_t2: per sample ``(N,)`` long: 0 for a proposal, the object id (> 0) for an annotation.
        image_size: ``(H, W)`` of the crop the boxes refer to.
    """
    negatives = Negatives(negatives)
    batch = key_t.shape[0]
    q_boxes, q_target_ids, p_boxes, p_ids = [], [], [], []
    for b in range(batch):
        bt, it = _select_kinds(boxes_t[b].float().cpu(), ids_t[b].long().cpu(), use_proposals, use_annotated)
        bt2, it2 = _select_kinds(boxes_t2[b].float().cpu(), ids_t2[b].long().cpu(), use_proposals, use_annotated)
        bt2, it2 = _cap_candidates(bt2, it2, max_candidates, generator)
        # An annotated object can only be a query if it is still visible in t'.
        present = (it <= 0) | torch.isin(it, it2[it2 > 0])
        bt, it = bt[present], it[present]
        q = sample_queries(bt, it, num_queries, cell, generator)
        q = q[: len(bt2)]  # the assignment needs at least as many candidates as queries
        q_boxes.append(bt[q])
        q_target_ids.append(it[q])
        p_boxes.append(bt2)
        p_ids.append(it2)

    device = key_t.device
    q_feat = object_features(key_t, [x.to(device) for x in q_boxes], image_size)
    p_feat = object_features(key_t2, [x.to(device) for x in p_boxes], image_size)

    # Bank of candidates, video by video: [t' boxes of video b, queries of video b].
    bank, owner, is_query, positives = [], [], [], []
    offset = 0
    for b in range(batch):
        n_p, n_q = len(p_feat[b]), len(q_feat[b])
        j_star = torch.full((n_q,), -1, dtype=torch.long)
        ann = q_target_ids[b] > 0
        for i in torch.nonzero(ann).flatten().tolist():
            j_star[i] = int(torch.nonzero(p_ids[b] == q_target_ids[b][i]).flatten()[0])
        prop = torch.nonzero(~ann).flatten()
        if len(prop):
            free = torch.ones(n_p, dtype=torch.bool)
            free[j_star[ann]] = False
            free_idx = torch.nonzero(free).flatten()
            if len(free_idx) >= len(prop):
                assign = match_objects(q_feat[b][prop.to(device)], p_feat[b][free_idx.to(device)])
                j_star[prop] = free_idx[assign]
        positives.append(j_star + offset)
        bank += [p_feat[b], q_feat[b]]
        owner += [b] * (n_p + n_q)
        is_query += [False] * n_p + [True] * n_q
        offset += n_p + n_q

    queries = torch.cat(q_feat) if q_feat else key_t.new_zeros(0, key_t.shape[1])
    if len(queries) == 0:
        return OclResult(key_t.sum() * 0.0 + key_t2.sum() * 0.0, 0)
    bank_t = torch.cat(bank)  # (M, C)
    owner_t = torch.tensor(owner, device=device)
    is_query_t = torch.tensor(is_query, device=device)
    q_owner = torch.cat([torch.full((len(q_feat[b]),), b, dtype=torch.long) for b in range(batch)]).to(device)
    target = torch.cat(positives).to(device)  # (Q_total,), -1 where no match exists
    has_pos = target >= 0
    target = target.clamp(min=0)

    m = len(bank_t)
    cols = torch.arange(m, device=device)
    allowed = torch.zeros(len(queries), m, dtype=torch.bool, device=device)
    if negatives in (Negatives.INTER, Negatives.BOTH):
        allowed |= owner_t[None, :] != q_owner[:, None]
    if negatives in (Negatives.INTRA, Negatives.BOTH):
        boxes_bank = torch.cat([torch.cat([p_boxes[b], q_boxes[b]]) for b in range(batch)]).to(device)
        iou = box_iou(boxes_bank[target], boxes_bank)  # (Q_total, M)
        allowed |= (owner_t[None, :] == q_owner[:, None]) & ~is_query_t[None, :] & (iou < INTRA_IOU)
    allowed &= cols[None, :] != target[:, None]
    valid = has_pos & allowed.any(dim=1)
    allowed |= cols[None, :] == target[:, None]

    sim = similarity(bank_t.T[None], queries.T[None])  # (1, M, Q_total)
    loss = contrastive_ce(sim, target[None], allowed.T[None], valid[None])
    return OclResult(loss, int(valid.sum()))
