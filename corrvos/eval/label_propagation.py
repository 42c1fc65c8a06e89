"""Label propagation through the key space alone: the correspondence-learning benchmark protocol.

Self-supervised correspondence methods (e.g. the contrastive random walk) are scored on DAVIS by
propagating the first frame's labels with nothing but their affinity: each frame's labels are the
affinity-weighted labels of the first frame and of the last few predicted frames, upsampled and
argmaxed. Run on a VOS model's key encoder, this scores the space the correspondence losses train
with the decoder, the value encoder and the memory's bookkeeping taken out: a model whose keys match
the right pixels propagates the right labels.

:class:`LabelPropagator` is a :class:`~corrvos.inference.tracker.Tracker` (same resize, padding,
precision handling and output mapping) whose ``step`` replaces the memory read and decoder by that
propagation, so ``python -m corrvos.eval --label-propagation`` scores it with the official DAVIS
protocol like any run. The weights are the model's own: :func:`~corrvos.models.similarity.similarity`
with XMem's shrinkage and selection, normalised by the same top-k softmax as its memory read.

Labels live on the stride-16 grid (each cell holds the share of each label in it), so boundaries are
coarse: compare models with each other under this protocol, not with full segmentation scores.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.errors import InputError
from corrvos.inference.tracker import Tracker
from corrvos.models.similarity import similarity, softmax_affinity

DEFAULT_CONTEXT = 20  # recent frames besides the first, as in the correspondence literature's DAVIS protocol


class _GridFrame(NamedTuple):
    key: Tensor  # (C, M)
    shrinkage: Tensor | None  # (1, M), XMem
    labels: Tensor  # (K+1, M), shares per cell summing to 1


class LabelPropagator(Tracker):
    """Propagate the first-frame labels with the model's affinity only (no value encoder, no decoder).

    Args:
        model: an STCN or XMem network; only its key encoder and key projection run.
        device, size, precision: as for :class:`Tracker`.
        top_k: weights kept per query position (default: the model's memory-read top-k).
        context: recent predicted frames read besides the first frame.
        radius: if given, a query position reads only memory positions within this many stride-16
            cells (Chebyshev distance), a locality prior some correspondence protocols use; default none,
            like the memory read.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        top_k: int | None = None,
        size: int | None = None,
        *,
        context: int = DEFAULT_CONTEXT,
        radius: int | None = None,
        precision: str = "fp32",
        match_cache_frames: int | None = 0,  # accepted for predict_split; there are no memory reads to explain
    ) -> None:
        if context < 0:
            raise ValueError("context must be at least 0")
        if radius is not None and radius < 0:
            raise ValueError("radius must be at least 0")
        self.context = context
        self.radius = radius
        super().__init__(model, device=device, top_k=top_k, size=size, match_cache_frames=0, precision=precision)

    def reset(self) -> None:
        super().reset()
        self._first: _GridFrame | None = None
        self._recent: deque[_GridFrame] = deque(maxlen=self.context)

    def step(
        self,
        image: np.ndarray | Tensor,
        mask: np.ndarray | Tensor | None = None,
        objects: Sequence[int] | None = None,
        *,
        last: bool = False,
        complete: bool = False,
    ) -> Tensor:
        """Labels of the next frame as ``(K+1, H, W)`` probabilities at the input size (see Tracker.step)."""
        t = self.t + 1
        img, geometry = self._prepare_image(t, image)
        if (mask is None) == (t == 0):
            raise InputError("Label propagation takes exactly one mask, on the first frame.")
        if objects is not None:
            raise InputError("Label propagation tracks the objects of the first mask; it takes no object list.")
        labels = None if mask is None else self._prepare_mask(t, mask, geometry)
        if labels is not None:
            present = sorted(int(v) for v in torch.unique(labels).tolist() if v != 0)
            if not present:
                raise InputError("The first-frame mask is empty; mark at least one object with a label above 0.")

        extras = self.spec.key_extras
        with self._network():
            feats = self.model.encode_key(img, need_shrinkage=extras, need_selection=extras)
        key = feats.key[0].float().flatten(1)
        shrinkage = None if feats.shrinkage is None else feats.shrinkage[0].float().flatten(1)
        selection = None if feats.selection is None else feats.selection[0].float().flatten(1)
        h, w = geometry.feature_size

        if labels is not None:
            self.object_ids = present
            prob = self._merge_mask(labels, present, None, geometry)  # the Tracker's first-frame probabilities
            grid = F.avg_pool2d(prob.unsqueeze(0), kernel_size=16)[0].flatten(1)
            self._first = _GridFrame(key, shrinkage, grid)
        else:
            with self._fp32():
                grid = self._read(key, selection, (h, w))
            prob = F.interpolate(grid.view(1, -1, h, w), size=(h * 16, w * 16), mode="bilinear", align_corners=False)[0]
            self._recent.append(_GridFrame(key, shrinkage, grid))
        self.t = t
        self._geometry = geometry
        return self._to_input(prob, geometry)

    def _read(self, key: Tensor, selection: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """``(K+1, M)`` label shares of the query positions, read from the first and recent frames."""
        memory = [self._first, *self._recent]
        mem_key = torch.cat([f.key for f in memory], dim=1)
        mem_shrinkage = None if memory[0].shrinkage is None else torch.cat([f.shrinkage for f in memory], dim=1)
        mem_labels = torch.cat([f.labels for f in memory], dim=1)
        sim = similarity(mem_key[None], key[None], None if mem_shrinkage is None else mem_shrinkage[None],
                         None if selection is None else selection[None])  # (1, N, M)
        if self.radius is not None:
            m = key.shape[1]  # every memory frame has the query's grid: mask each frame's (M, M) block alike
            far = ~_within(grid, self.radius, sim.device)
            sim = sim.view(len(memory), m, m).masked_fill(far, float("-inf")).view(1, -1, m)
        affinity = softmax_affinity(sim, self.top_k)[0]  # (N, M)
        return mem_labels @ affinity


def _within(grid: tuple[int, int], radius: int, device: torch.device) -> Tensor:
    """``(h * w, h * w)`` bool: memory position (row) within ``radius`` cells of query position (column)."""
    h, w = grid
    idx = torch.arange(h * w, device=device)
    rows, cols = idx // w, idx % w
    return torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()) <= radius
