"""XMem's memory, kept apart from the network: sensory, working and long-term memory.

Follows the upstream memory manager (reference-models.md 2.6-2.7) so that, for the objects given on
the first frame, every read equals upstream's:

* Working memory (WM) holds whole memory frames: key, shrinkage, selection (only with long-term memory)
  and per-object values. Reads concatenate [long-term, working] keys, compute one anisotropic similarity
  and a top-k softmax; usage (the top-k affinity summed over query positions) is added to ``use_count``
  and every element's ``life_count`` grows by one per read.
* When WM reaches ``max_working_frames`` frames it is consolidated: the candidates are the frames
  between the first memory frame and the newest ``min_working_frames - 1``, except frames added as
  ``permanent`` (the Tracker's frames with a given mask: a correction or a late object's first mask
  stays in WM for good, as Cutie's permanent memory; upstream keeps only the first frame); the ``num_prototypes``
  candidates of highest usage (use_count / life_count) become prototypes; their values and shrinkage
  are the candidates' values/shrinkage weighted by a full softmax of candidate-to-prototype similarity
  (potentiation, with the prototypes' selection); the candidates leave WM, the prototypes join the
  long-term memory (LT), which keeps no selection.
* Before prototypes are added, an LT of at least ``max_long_term_elements - num_prototypes`` elements
  loses its least-used elements (ties at the threshold included) down to that size.
* The sensory memory (hidden state) is one tensor ``(1, K, Ch, h, w)``; new objects start at zero.

Objects that appear later (their own birth frame, see memory_common) are where this differs from
upstream by design: values are stored per object with zeros before the birth and each read or
potentiation softmax only spans the elements that exist for the object; upstream's object-group
bookkeeping misaligns values after a consolidation and cannot remove LT elements with several groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from corrvos.inference.memory_common import (
    ElementBuffer,
    GroupIndexCache,
    MemorySegment,
    MemorySnapshot,
    birth_groups,
    frame_segment_index,
    grouped_read,
    pad_objects,
)
from corrvos.models.similarity import TopKAffinity, Workspace, read_memory, similarity, softmax_affinity


@dataclass(frozen=True)
class _WorkingFrame:
    segment: MemorySegment
    selection: Tensor | None  # (1, Ck, hw)
    permanent: bool = False  # never consolidated (a frame whose mask was given)


class _LongTermMemory:
    """Prototypes: concatenated tensors, replaced (never modified in place) when they change."""

    def __init__(self) -> None:
        self.key: Tensor | None = None  # (1, Ck, L)
        self.shrinkage: Tensor | None = None  # (1, 1, L)
        self.value: Tensor | None = None  # (K, Cv, L)
        self.frames = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.use_count: Tensor | None = None  # (L,)
        self.life_count: Tensor | None = None  # (L,)

    @property
    def size(self) -> int:
        return int(self.frames.numel())

    def segment(self) -> MemorySegment:
        return MemorySegment(self.key, self.shrinkage, self.frames, self.positions)

    def add(self, key: Tensor, shrinkage: Tensor, value: Tensor, frames: Tensor, positions: Tensor) -> None:
        n = frames.numel()
        new_use = key.new_zeros(n)
        new_life = key.new_full((n,), 1e-7)
        if self.key is None:
            self.key, self.shrinkage, self.value = key, shrinkage, value
            self.use_count, self.life_count = new_use, new_life
        else:
            self.key = torch.cat([self.key, key], dim=2)
            self.shrinkage = torch.cat([self.shrinkage, shrinkage], dim=2)
            self.value = torch.cat([pad_objects(self.value, value.shape[0]), value], dim=2)
            self.use_count = torch.cat([self.use_count, new_use])
            self.life_count = torch.cat([self.life_count, new_life])
        self.frames = torch.cat([self.frames, frames])
        self.positions = torch.cat([self.positions, positions])

    def remove_least_used(self, max_size: int) -> None:
        """Drop the lowest-usage elements (and any tied with the last of them) down to ``max_size``."""
        excess = self.size - max_size
        if excess <= 0:
            return
        usage = self.use_count / self.life_count
        lowest, _ = torch.topk(usage, k=excess, largest=False, sorted=True)
        keep = usage > lowest[-1]
        keep_cpu = keep.cpu()
        self.key = self.key[:, :, keep]
        self.shrinkage = self.shrinkage[:, :, keep]
        self.value = self.value[:, :, keep]
        self.use_count = self.use_count[keep]
        self.life_count = self.life_count[keep]
        self.frames = self.frames[keep_cpu]
        self.positions = self.positions[keep_cpu]


class XMemMemory:
    """Working + long-term + sensory memory of one video.

    Args:
        top_k: the read's top-k (upstream 30).
        enable_long_term: consolidate WM into LT (upstream default True); without it WM is unbounded.
        min_working_frames / max_working_frames: WM size after / triggering consolidation (5 / 10).
        num_prototypes: prototypes per consolidation (128).
        max_long_term_elements: LT cap (10000).
        hidden_dim: channels of the sensory memory (0: none).
    """

    # The user-settable ones: what a Tracker passes through and what options() reports.
    OPTION_NAMES = ("enable_long_term", "min_working_frames", "max_working_frames", "num_prototypes",
                    "max_long_term_elements")

    def __init__(
        self,
        top_k: int | None = 30,
        enable_long_term: bool = True,
        min_working_frames: int = 5,
        max_working_frames: int = 10,
        num_prototypes: int = 128,
        max_long_term_elements: int = 10000,
        hidden_dim: int = 0,
    ) -> None:
        if enable_long_term:
            if not 1 <= min_working_frames < max_working_frames:
                raise ValueError("need 1 <= min_working_frames < max_working_frames")
            if num_prototypes < 1 or max_long_term_elements <= num_prototypes:
                raise ValueError("need 1 <= num_prototypes < max_long_term_elements")
        self.top_k = top_k
        self.enable_long_term = enable_long_term
        self.min_working_frames = min_working_frames
        self.max_working_frames = max_working_frames
        self.num_prototypes = num_prototypes
        self.max_long_term_elements = max_long_term_elements
        self.hidden_dim = hidden_dim

        self.births: list[int] = []
        self.hidden: Tensor | None = None  # (1, K, Ch, h, w) sensory memory
        self._working: list[_WorkingFrame] = []
        self._use_count: Tensor | None = None  # (N_wm,) aligned with the concatenated WM
        self._life_count: Tensor | None = None
        self.long_term = _LongTermMemory()
        # What the read uses: [long-term, working] elements (values included) in one growing buffer;
        # the per-frame segments above only keep key references for snapshots.
        self._buffer = ElementBuffer(shrinkage=True)
        self._groups = GroupIndexCache()
        self._workspace = Workspace()  # the read's similarity and gathered values, reused every frame
        self.consolidations = 0

    @classmethod
    def for_tracker(cls, top_k: int | None, config: Any, options: dict[str, Any]) -> "XMemMemory":
        return cls(top_k, hidden_dim=config.hidden_dim, **{k: options[k] for k in cls.OPTION_NAMES if k in options})

    @property
    def keeps_selection(self) -> bool:
        return self.enable_long_term  # consolidation needs the selection of every memory frame

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.OPTION_NAMES}

    def memorise(self, frame: int, feats: Any, value: Tensor, given: bool) -> None:
        """The Tracker's memory write: frames given a mask stay in working memory for good."""
        self.add(frame, feats.key, feats.shrinkage, value, feats.selection, permanent=given)

    def stats(self) -> tuple[int, int, int, int]:
        return len(self.working_frame_indices), self.working_elements, self.long_term_elements, self.consolidations

    # objects and sensory memory -------------------------------------------------------------------
    def add_objects(self, birth: int, count: int, feature_like: Tensor) -> None:
        """Register ``count`` objects first seen at frame ``birth``; their hidden state starts at zero.

        ``feature_like`` is any ``(1, C, h, w)`` stride-16 tensor of the video (sets size and device).
        """
        self.births.extend([birth] * count)
        self._buffer.ensure_objects(self.num_objects)
        if self.hidden_dim > 0:
            h, w = feature_like.shape[-2:]
            zeros = feature_like.new_zeros(1, count, self.hidden_dim, h, w)
            self.hidden = zeros if self.hidden is None else torch.cat([self.hidden, zeros], dim=1)

    @property
    def num_objects(self) -> int:
        return len(self.births)

    # writing ---------------------------------------------------------------------------------------
    def add(
        self, frame: int, key: Tensor, shrinkage: Tensor, value: Tensor, selection: Tensor | None, permanent: bool = False
    ) -> None:
        """Add a memory frame to WM (consolidating when WM is full).

        Args:
            permanent: keep this frame in WM for good (never a consolidation candidate).
            key: ``(1, Ck, h, w)``; shrinkage ``(1, 1, h, w)``; selection ``(1, Ck, h, w)`` (kept only
                with long-term memory, where consolidation needs it).
            value: ``(1, K, Cv, h, w)`` for all registered objects.
        """
        hw = key.shape[-2] * key.shape[-1]
        frames, positions = frame_segment_index(frame, hw)
        segment = MemorySegment(key.flatten(2), shrinkage.flatten(2), frames, positions)
        kept_selection = selection.flatten(2) if (self.enable_long_term and selection is not None) else None
        self._working.append(_WorkingFrame(segment, kept_selection, permanent))
        self._buffer.append(segment.key, segment.shrinkage, value[0].flatten(2), frames)
        self._buffer.ensure_objects(self.num_objects)
        if self.enable_long_term:
            new_use = key.new_zeros(hw)
            new_life = key.new_full((hw,), 1e-7)
            if self._use_count is None:
                self._use_count, self._life_count = new_use, new_life
            else:
                self._use_count = torch.cat([self._use_count, new_use])
                self._life_count = torch.cat([self._life_count, new_life])
            if len(self._working) >= self.max_working_frames:
                lt_before = self.long_term.size
                working_values = self._buffer.values()[lt_before:].clone()  # (N_wm, K, Cv); the buffer is rebuilt
                if self.long_term.size >= self.max_long_term_elements - self.num_prototypes:
                    self.long_term.remove_least_used(self.max_long_term_elements - self.num_prototypes)
                keep = self._consolidate(hw, working_values)
                if keep is not None:
                    working_values = working_values[keep]
                self._rebuild_buffer(working_values)

    def _rebuild_buffer(self, working_values: Tensor) -> None:
        """Lay out [long-term, working] again after the long-term memory changed."""
        k = self.num_objects
        segs = self._segments()
        values = [working_values]
        if len(segs) > len(self._working):
            values.insert(0, pad_objects(self.long_term.value, k).permute(2, 0, 1))
        self._buffer.assign(
            torch.cat([s.key for s in segs], dim=2),
            torch.cat([s.shrinkage for s in segs], dim=2),
            torch.cat(values, dim=0),
            torch.cat([s.frames for s in segs]),
        )

    def _consolidate(self, hw: int, working_values: Tensor) -> Tensor | None:
        """Turn the candidate WM frames into prototypes; returns which rows of ``working_values``
        (``(N_wm, K, Cv)``, the WM values before) stay in WM, or None when nothing left it."""
        # Candidates: every WM frame but the first memory frame, the permanent ones and the newest
        # min_working_frames - 1.
        end = len(self._working) - (self.min_working_frames - 1)
        picked = [i for i in range(1, end) if not self._working[i].permanent]
        if not picked:
            return None
        candidates = [self._working[i] for i in picked]
        cand_key = torch.cat([c.segment.key for c in candidates], dim=2)
        cand_shrinkage = torch.cat([c.segment.shrinkage for c in candidates], dim=2)
        cand_selection = torch.cat([c.selection for c in candidates], dim=2)
        cand_frames = torch.cat([c.segment.frames for c in candidates])
        cand_positions = torch.cat([c.segment.positions for c in candidates])
        leaving = torch.zeros(len(self._working), hw, dtype=torch.bool, device=self._use_count.device)
        leaving[picked] = True
        leaving = leaving.flatten()
        cand_value = working_values[leaving].permute(1, 2, 0)  # (K, Cv, Nc)
        usage = self._use_count[leaving] / self._life_count[leaving]

        proto_key, proto_shrinkage, proto_value, chosen = potentiate(
            cand_key, cand_shrinkage, cand_selection, cand_value, cand_frames, usage, self.births,
            self.num_prototypes,
        )
        chosen_cpu = chosen.cpu()
        self.long_term.add(
            proto_key, proto_shrinkage, proto_value, cand_frames[chosen_cpu], cand_positions[chosen_cpu]
        )
        stay = ~leaving
        gone = set(picked)
        self._working = [w for i, w in enumerate(self._working) if i not in gone]
        self._use_count = self._use_count[stay]
        self._life_count = self._life_count[stay]
        self.consolidations += 1
        return stay

    # reading ---------------------------------------------------------------------------------------
    def _segments(self) -> list[MemorySegment]:
        segs = [w.segment for w in self._working]
        if self.enable_long_term and self.long_term.size > 0:
            segs.insert(0, self.long_term.segment())
        return segs

    def read(self, query_key: Tensor, query_selection: Tensor | None) -> Tensor:
        """``(1, Ck, h, w)`` query key and selection -> ``(1, K, Cv, h, w)`` readout; counts usage."""
        if not self._working:
            raise RuntimeError("the memory is empty: give a mask on the first frame")
        h, w = query_key.shape[-2:]
        buf = self._buffer
        frames = buf.element_frames()
        selection = None if query_selection is None else query_selection.flatten(2)
        sim = similarity(buf.keys(), query_key.flatten(2), buf.shrinkages(), selection, query_major=True, workspace=self._workspace)
        readout, full_affinity = grouped_read(
            sim, buf.values(), frames, self.births, self.top_k,
            lambda birth: self._groups.get(buf.version, frames, birth, sim.device), self._workspace,
        )
        if self.enable_long_term:
            self._count_usage(full_affinity, buf.size)
        return readout.reshape(1, readout.shape[1], readout.shape[2], h, w)

    def _count_usage(self, affinity: TopKAffinity | None, num_elements: int) -> None:
        if affinity is None:
            raise RuntimeError("usage needs an object that sees every memory element (a first-frame object)")
        usage = affinity.element_sums(num_elements)[0]
        lt = self.long_term.size
        self._use_count += usage[lt:]
        self._life_count += 1
        if lt:
            self.long_term.use_count += usage[:lt]
            self.long_term.life_count += 1

    def values(self) -> Tensor:
        """``(K, Cv, N)`` stored values in read (and snapshot) order: long-term first, then working
        (a view: valid until the memory next changes)."""
        return self._buffer.values().permute(1, 2, 0)

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(tuple(self._segments()), tuple(self.births), self.top_k)

    # stats -----------------------------------------------------------------------------------------
    @property
    def working_frame_indices(self) -> list[int]:
        return [int(w.segment.frames[0]) for w in self._working]

    @property
    def working_elements(self) -> int:
        return sum(int(w.segment.frames.numel()) for w in self._working)

    @property
    def long_term_elements(self) -> int:
        return self.long_term.size


def potentiate(
    cand_key: Tensor,
    cand_shrinkage: Tensor,
    cand_selection: Tensor,
    cand_value: Tensor,
    cand_frames: Tensor,
    usage: Tensor,
    births: list[int],
    num_prototypes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Consolidation: pick prototypes by usage and give them softmax-weighted candidate values.

    Args:
        cand_key / cand_shrinkage / cand_selection: ``(1, Ck, Nc)`` / ``(1, 1, Nc)`` / ``(1, Ck, Nc)``.
        cand_value: ``(K, Cv, Nc)``; cand_frames ``(Nc,)`` CPU origin frames; usage ``(Nc,)``.
        births: birth frame of each object.

    Returns:
        Prototype key ``(1, Ck, P)``, shrinkage ``(1, 1, P)``, values ``(K, Cv, P)`` (zero for an object
        born after a prototype's origin) and the chosen candidate indices ``(P,)``.
    """
    p = min(num_prototypes, usage.numel())
    _, chosen = torch.topk(usage, k=p, dim=0, sorted=True)
    proto_key = cand_key[:, :, chosen]
    proto_selection = cand_selection[:, :, chosen]
    # Candidates are the memory side (with their shrinkage), prototypes the query side (with selection).
    sim = similarity(cand_key, proto_key, cand_shrinkage, proto_selection)  # (1, Nc, P)
    proto_shrinkage = read_memory(softmax_affinity(sim), cand_shrinkage)  # (1, 1, P)

    proto_frames = cand_frames[chosen.cpu()]
    proto_value = cand_value.new_zeros(cand_value.shape[0], cand_value.shape[1], p)
    for birth, first, end in birth_groups(births):
        rows = (cand_frames >= birth).nonzero().squeeze(1).to(sim.device)
        cols = (proto_frames >= birth).nonzero().squeeze(1).to(sim.device)
        if cols.numel() == 0:
            continue  # every prototype predates these objects
        group_sim = sim.index_select(1, rows).index_select(2, cols)
        group_value = cand_value[first:end].index_select(2, rows)
        proto_value[first:end, :, cols] = read_memory(softmax_affinity(group_sim), group_value.unsqueeze(0))[0]
    return proto_key, proto_shrinkage, proto_value, chosen
