"""L_PCL: correspondence learning from pixel-level consistency (paper Eq. 5-7, Sec. 3.3).

Choices where the paper leaves room (also in the README, "Correspondence-aware training"):

* Keys. The features are the keys the segmentation forward already computed: the output of the
  model's key projection at stride 16, the very tensor the memory read uses (for XMem together
  with its shrinkage on the anchor/candidate side and its selection on the query side), and the
  similarity is ``corrvos.models.similarity.similarity``. No extra key head (the paper's code adds
  a second projection ``key_proj2``; we do not, so the loss shapes the matching used at test time).
* Anchors. Frame tau's keys are sampled on a jittered ``8 x 8`` grid: the key map is split into
  ``8 x 8`` cells and one random position is taken per cell (integer positions, no interpolation).
  When the map is smaller than 8 in a dimension, the grid shrinks to the map size.
* Frames. In a training clip of T frames (3 for STCN, 8 for XMem, in sampled temporal order),
  frame 0 is the anchor tau (the reference frame every other frame reads from) and every
  consecutive pair (t, t+1) of the remaining frames gives a term, in both directions (pseudo
  labels from t supervise t+1 and vice versa: local continuity is symmetric). For STCN this is
  (1 -> 2) and (2 -> 1).
* Pseudo labels (Eq. 5-6): j* = argmax over the anchors of *this* video of the similarity to
  frame t's pixel i, computed without gradient.
* Loss (Eq. 7): frame t+1's pixel i must pick anchor j* among the candidates = anchors of this
  video + anchors of the other videos of the batch (negatives; ``Negatives`` switches to intra-
  or inter-video only). Eq. 7 writes ``-log sum_i (...)``; we use ``mean_i -log(...)``, the standard
  InfoNCE form: with the sum inside the log the loss is minimised by making a single pixel right.
* Cross-view anchor (Sec. 3.3): a second geometric view of one clip frame (random multi-scale
  crop + flip, given by the dataset with the affine that maps view coordinates to the frame's)
  gives known correspondences: grid points of the view's key map are mapped into the frame,
  whose keys are sampled there bilinearly; each view point must pick its own warped frame
  feature among the warped features of all grid points of the batch (InfoNCE). Points that
  fall outside the frame are dropped. This term uses the plain similarity (the view's key pass
  skips XMem's shrinkage/selection to stay cheap).
* L_PCL is the mean of the temporal term and (when enabled) the cross-view term.
* Cost. All pairs of a clip go through one set of kernels (stacked along a leading pair axis, each
  pair's videos side by side as query columns), and the cross-view term uses the same layout: on a
  GPU the small models' step is bound by the host issuing kernels, and one call per pair (12 for
  XMem) dispatched ~4x the ops. Same values up to float rounding; on the CPU the same random draws.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from corrvos.models.similarity import similarity
from corrvos.training.contrastive import Negatives, contrastive_ce, video_candidate_mask

ANCHOR_GRID = 8


@functools.lru_cache(maxsize=64)
def _cells(n: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Start and size of each of ``cells`` near-equal cells of ``range(n)``, on ``device``; cached, since
    every training step asks for the same few (the kernels that make them would be a step's launches)."""
    edges = torch.div(torch.arange(cells + 1, device=device) * n, cells, rounding_mode="floor")
    return edges[:-1], edges[1:] - edges[:-1]


def jittered_grid(batch: int, h: int, w: int, grid: int = ANCHOR_GRID, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", terms: int = 1) -> tuple[Tensor, Tensor]:
    """One random integer position per cell of a ``grid x grid`` partition of an ``h x w`` map.

    Returns ``(ys, xs)``, each ``(terms * B, G)`` long (term-major) with ``G = min(grid, h) * min(grid, w)``:
    ``terms`` independent grids per sample, drawn in one call.
    """
    gy, gx = min(grid, h), min(grid, w)
    device = torch.device(device)
    # Without an explicit generator everything is made on the target device: a host-to-device copy
    # of pageable memory would synchronise the CUDA stream in the middle of the step.
    rand_device = device if generator is None else torch.device("cpu")
    y0, ysize = _cells(h, gy, device)
    x0, xsize = _cells(w, gx, device)
    # (term, y|x, sample, cell): on the CPU the same numbers, in the same order, as drawing ys then xs
    # per term in separate calls.
    r = torch.rand(terms, 2, batch, gy, gx, generator=generator, device=rand_device).to(device)
    # rand is in [0, 1), so floor(rand * size) stays inside the cell.
    ys = y0[:, None] + (r[:, 0] * ysize[:, None]).long()
    xs = x0[None, :] + (r[:, 1] * xsize[None, :]).long()
    return ys.reshape(terms * batch, -1), xs.reshape(terms * batch, -1)


def gather_points(feat: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """``(..., C, h, w)`` features at integer positions ``(..., G)`` -> ``(..., C, G)``; leading dims broadcast
    (one anchor map read at several grids needs no copy of the map)."""
    c, h, w = feat.shape[-3:]
    idx = (ys * w + xs).unsqueeze(-2)  # (..., 1, G)
    lead = torch.broadcast_shapes(feat.shape[:-3], idx.shape[:-2])
    return feat.flatten(-2).expand(*lead, c, h * w).gather(-1, idx.expand(*lead, c, idx.shape[-1]))


def _videos_to_columns(x: Tensor) -> Tensor:
    """``(P, B, C, n)`` -> ``(P, C, B*n)``: the points of every video of a term side by side, video by video."""
    p, b, c, n = x.shape
    return x.transpose(1, 2).reshape(p, c, b * n)


def pcl_temporal(anchor_key: Tensor, key_t: Tensor, key_t1: Tensor, *, anchor_shrinkage: Tensor | None = None,
                 selection_t: Tensor | None = None, selection_t1: Tensor | None = None,
                 negatives: Negatives | str = Negatives.BOTH, grid: int = ANCHOR_GRID,
                 generator: torch.Generator | None = None) -> Tensor:
    """Eq. 5-7 for (tau; t -> t+1) triples of a batch of clips: one pair, or P pairs at once.

    All pairs go through the same few kernels (XMem's 8-frame clips give 12 pairs; one call per pair
    made the loss launch-bound on a GPU). The value is the mean over pairs of each pair's loss.

    Args:
        anchor_key: ``(B, C, h, w)`` keys of the anchor frame tau.
        key_t: ``(B, C, h, w)`` keys of frame t (gives the pseudo labels, no gradient), or ``(P, B, C, h, w)``.
        key_t1: keys of frame t+1 (the student), shaped like ``key_t``.
        anchor_shrinkage: optional ``(B, 1, h, w)`` XMem shrinkage of frame tau.
        selection_t / selection_t1: optional XMem selection of frames t / t+1, shaped like the keys.
        negatives: which candidates compete (see ``Negatives``).
    """
    if key_t.dim() == 4:
        key_t, key_t1 = key_t[None], key_t1[None]
        selection_t = None if selection_t is None else selection_t[None]
        selection_t1 = None if selection_t1 is None else selection_t1[None]
    pairs, b, c, h, w = key_t.shape
    ys, xs = jittered_grid(b, h, w, grid, generator, anchor_key.device, terms=pairs)
    ys, xs = ys.view(pairs, b, -1), xs.view(pairs, b, -1)
    anchors = gather_points(anchor_key, ys, xs)  # (P, B, C, G)
    shrink = gather_points(anchor_shrinkage, ys, xs) if anchor_shrinkage is not None else None  # (P, B, 1, G)
    num_anchor = anchors.shape[-1]

    with torch.no_grad():  # Eq. 5-6: each pixel of t picks its most similar anchor of its own video
        own_sim = similarity(anchors.detach().flatten(0, 1), key_t.detach().flatten(3).flatten(0, 1),
                             shrink.detach().flatten(0, 1) if shrink is not None else None,
                             selection_t.detach().flatten(3).flatten(0, 1) if selection_t is not None else None)
        pseudo = own_sim.argmax(dim=1).view(pairs, b, h * w)  # (P, B, hw)
        target = (pseudo + torch.arange(b, device=pseudo.device)[:, None] * num_anchor).flatten(1)  # (P, B*hw)

    # Eq. 7: every pixel of t+1 (all videos of a pair as columns) against the anchors of all videos.
    query = _videos_to_columns(key_t1.flatten(3))  # (P, C, B*hw)
    sel = _videos_to_columns(selection_t1.flatten(3)) if selection_t1 is not None else None
    sim = similarity(_videos_to_columns(anchors), query,
                     _videos_to_columns(shrink) if shrink is not None else None, sel)  # (P, B*G, B*hw)
    query_video = torch.arange(b, device=sim.device).repeat_interleave(h * w)
    allowed = video_candidate_mask(b, num_anchor, negatives, target, query_video)
    return contrastive_ce(sim, target, allowed)


def view_points_in_frame(ys: Tensor, xs: Tensor, h: int, w: int, view_to_frame: Tensor) -> tuple[Tensor, Tensor]:
    """Map feature-cell centres of the view to normalised ``[-1, 1]`` frame coordinates.

    ``view_to_frame`` is ``(B, 2, 3)`` in ``F.affine_grid`` convention (``align_corners=False``):
    ``grid_sample(frame, affine_grid(theta, view_size))`` reproduces the view. Returns the
    ``(B, G, 2)`` ``(x, y)`` coordinates and a ``(B, G)`` bool mask of points inside the frame.
    """
    xn = (2 * xs.to(view_to_frame.dtype) + 1) / w - 1
    yn = (2 * ys.to(view_to_frame.dtype) + 1) / h - 1
    homog = torch.stack([xn, yn, torch.ones_like(xn)], dim=-1)  # (B, G, 3)
    coords = homog @ view_to_frame.transpose(1, 2)  # (B, G, 2)
    inside = (coords.abs() <= 1).all(dim=-1)
    return coords, inside


def pcl_cross_view(view_key: Tensor, frame_key: Tensor, view_to_frame: Tensor, *,
                   negatives: Negatives | str = Negatives.BOTH, grid: int = ANCHOR_GRID,
                   generator: torch.Generator | None = None) -> Tensor:
    """Cross-view InfoNCE with correspondences known from the view's affine (Sec. 3.3).

    Args:
        view_key: ``(B, C, h, w)`` keys of the transformed view.
        frame_key: ``(B, C, h, w)`` keys of the clip frame the view was made from.
        view_to_frame: ``(B, 2, 3)`` affine from view to frame normalised coordinates.
    """
    b, c, h, w = view_key.shape
    ys, xs = jittered_grid(b, h, w, grid, generator, view_key.device)
    queries = gather_points(view_key, ys, xs)  # (B, C, G)
    coords, inside = view_points_in_frame(ys, xs, h, w, view_to_frame.float())
    warped = F.grid_sample(frame_key, coords[:, :, None, :].to(frame_key.dtype), mode="bilinear",
                           padding_mode="zeros", align_corners=False)[..., 0]  # (B, C, G)
    g = queries.shape[2]
    sim = similarity(_videos_to_columns(warped[None]), _videos_to_columns(queries[None]))  # (1, B*G, B*G)
    target = torch.arange(b * g, device=sim.device)[None]  # view point i's own warped feature
    query_video = torch.arange(b, device=sim.device).repeat_interleave(g)
    allowed = video_candidate_mask(b, g, negatives, target, query_video)
    inside = inside.reshape(1, b * g)
    allowed = inside[:, :, None] if allowed is None else allowed & inside[:, :, None]
    return contrastive_ce(sim, target, allowed, valid=inside)


def pcl_loss(keys: Tensor, *, shrinkage: Tensor | None = None, selection: Tensor | None = None,
             view_key: Tensor | None = None, view_to_frame: Tensor | None = None, view_frame: Tensor | None = None,
             negatives: Negatives | str = Negatives.BOTH, grid: int = ANCHOR_GRID,
             generator: torch.Generator | None = None) -> Tensor:
    """Full L_PCL of a batch of clips (see the module docstring for the frame roles).

    Args:
        keys: ``(B, T, C, h, w)`` keys of every clip frame (T >= 3).
        shrinkage: optional ``(B, T, 1, h, w)``; selection: optional ``(B, T, C, h, w)`` (XMem).
        view_key: optional ``(B, C, h, w)`` keys of the second view (enables the cross-view term).
        view_to_frame: ``(B, 2, 3)`` affine of the view; view_frame: ``(B,)`` clip index it was made from
            (on the keys' device).
    """
    num_frames = keys.shape[1]
    if num_frames < 3:
        raise ValueError(f"L_PCL needs at least 3 frames per clip (anchor, t, t+1), got {num_frames}")

    # Pairs (t, t+1) and (t+1, t) for t = 1 .. T-2, all in one call: stacked (P, B, ...) views of the clip.
    pairs = [(s, d) for t in range(1, num_frames - 1) for s, d in ((t, t + 1), (t + 1, t))]

    def frames(x: Tensor | None, which: list[int]) -> Tensor | None:
        return None if x is None else torch.stack([x[:, i] for i in which])

    src, dst = [s for s, _ in pairs], [d for _, d in pairs]
    temporal = pcl_temporal(keys[:, 0], frames(keys, src), frames(keys, dst),
                            anchor_shrinkage=None if shrinkage is None else shrinkage[:, 0],
                            selection_t=frames(selection, src), selection_t1=frames(selection, dst),
                            negatives=negatives, grid=grid, generator=generator)
    if view_key is None:
        return temporal
    if view_to_frame is None or view_frame is None:
        raise ValueError("the cross-view term needs view_to_frame and view_frame along with view_key")
    batch_idx = torch.arange(keys.shape[0], device=keys.device)
    frame_key = keys[batch_idx, view_frame.long()]
    cross = pcl_cross_view(view_key, frame_key, view_to_frame, negatives=negatives, grid=grid, generator=generator)
    return 0.5 * (temporal + cross)
