"""Correspondence metrics of a Tracker run over DAVIS: the per-frame hook of :func:`predict_split`.

For every frame whose segmentation read memory, the tracker's own record of that read (the query
key and selection, and the snapshot of the memory it read) is scored against the GT masks:
mask precision@k on the read weights of the group of objects given on the first frame (all DAVIS
objects), and cycle consistency against each memory frame. Weights are recomputed with the
functions the read used (``similarity`` and the read's softmax/top-k rule), not approximated.

Limit (XMem): the backward half of a cycle treats the query frame as memory and a memory frame as
query; the tracker caches neither the query frame's shrinkage nor the memory frames' selection, so
that half runs without them (plain negative squared L2). STCN cycles are exact.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from corrvos.eval.correspondence import CorrespondenceStats, cycle_consistency, labels_to_grid, mask_precision_at_k
from corrvos.eval.davis_eval import DavisSplit, read_gt_labels
from corrvos.inference.memory_common import group_affinity, valid_index
from corrvos.models.similarity import similarity


class CorrespondenceRecorder:
    """Accumulates the two metrics per sequence and overall while a split is segmented."""

    def __init__(self, split: DavisSplit, k: int = 10):
        self.split = split
        self.k = k
        self.total = CorrespondenceStats(k=k)
        self._seq: str | None = None
        self._grid_labels: dict[int, torch.Tensor] = {}

    def _labels_on_grid(self, seq: str, frame: int, geometry, device: torch.device) -> torch.Tensor:
        """GT labels of one frame brought to the tracker's feature grid (resize, centred pad, majority)."""
        if seq != self._seq:
            self._seq, self._grid_labels = seq, {}
        if frame not in self._grid_labels:
            path = self.split.annotation_paths(seq)[frame]
            labels = torch.from_numpy(read_gt_labels(path, self.split.year).astype(np.int64))
            if tuple(labels.shape) != tuple(geometry.proc_size):
                labels = F.interpolate(labels[None, None].float(), size=geometry.proc_size, mode="nearest")[0, 0].long()
            left, right, top, bottom = geometry.pad
            labels = F.pad(labels, (left, right, top, bottom))  # padding is background, as the model sees it
            self._grid_labels[frame] = labels_to_grid(labels).flatten().to(device)
        return self._grid_labels[frame]

    def on_frame(self, seq: str, t: int, tracker, labels_out: np.ndarray) -> None:
        record = tracker.frame_read(t)
        if record is None:  # frame 0 (given its mask) reads nothing
            return
        geometry = tracker.geometry
        snapshot = record.snapshot
        key, shrinkage, frames, positions = snapshot.keys()
        query_key = record.query_key
        device = query_key.device
        sel = None if record.query_selection is None else record.query_selection[None]
        sim = similarity(key, query_key[None], shrinkage, sel)  # (1, N, M)
        index = valid_index(frames, snapshot.births[0], sim.device)
        affinity = group_affinity(sim, index, snapshot.top_k)[0]  # the read of the first-frame objects
        if index is not None:
            keep = index.cpu()
            frames, positions, key = frames[keep], positions[keep], key[:, :, index]
            shrinkage = None if shrinkage is None else shrinkage[:, :, index]

        query_labels = self._labels_on_grid(seq, t, geometry, device)
        mem_labels = torch.empty(frames.numel(), dtype=torch.long, device=device)
        for f in frames.unique().tolist():
            where = (frames == f).nonzero().squeeze(1)
            grid = self._labels_on_grid(seq, f, geometry, device)
            mem_labels[where.to(device)] = grid[positions[where].to(device)]

        seq_stats = self.total.per_sequence.setdefault(seq, CorrespondenceStats(k=self.k))
        precision = mask_precision_at_k(affinity, mem_labels, query_labels, self.k)
        seq_stats.add_precision(precision.cpu(), query_labels.cpu())
        for f in frames.unique().tolist():
            where = (frames == f).nonzero().squeeze(1).to(device)
            consistent = cycle_consistency(
                query_key,
                key[0][:, where],
                geometry.feature_size,
                mem_shrinkage=None if shrinkage is None else shrinkage[0, 0, where],
                query_selection=record.query_selection,
            )
            seq_stats.add_cycle(consistent.cpu())

    def finish(self) -> dict[str, dict[str, float]]:
        """Per-sequence summaries and the overall one (means over all scored query positions)."""
        overall = CorrespondenceStats(k=self.k)
        for stats in self.total.per_sequence.values():
            overall.merge(stats)
        out = {seq: s.summary() for seq, s in self.total.per_sequence.items()}
        out["overall"] = overall.summary()
        return out

    def format_table(self) -> str:
        rows = self.finish()
        cols = list(next(iter(rows.values())).keys()) if rows else []
        name_w = max([len("Sequence"), *map(len, rows)])
        lines = ["---------- Correspondence quality (GT labels on the feature grid) ----------"]
        lines.append("Sequence".ljust(name_w) + "  " + "  ".join(cols))
        for name, summary in rows.items():
            lines.append(name.ljust(name_w) + "  " + "  ".join(f"{summary[c]:.3f}".rjust(len(c)) for c in cols))
        return "\n".join(lines)
