"""STCN's memory bank: whole memory frames appended as they come, read with a top-k softmax.

Upstream STCN grows the bank without bound (a memory frame every ``mem_every`` frames). ``max_frames``
optionally caps it by dropping the oldest frames that were not given a mask (the annotated frames,
frame 0 first of all, are the anchors and stay).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from corrvos.inference.memory_common import (
    MemorySegment,
    MemorySnapshot,
    frame_segment_index,
    grouped_read,
    pad_objects,
)
from corrvos.models.similarity import similarity


@dataclass(frozen=True)
class _MemoryFrame:
    segment: MemorySegment
    value: Tensor  # (K_at_that_time, Cv, hw)
    protected: bool


class STCNMemory:
    """Keys shared by all objects, values per object, one affinity per read.

    Args:
        top_k: the read's top-k (upstream: 20).
        max_frames: optional cap on the number of memory frames (None: unbounded, as upstream).
    """

    def __init__(self, top_k: int | None = 20, max_frames: int | None = None) -> None:
        if max_frames is not None and max_frames < 2:
            raise ValueError("max_memory_frames must be at least 2 (the first frame and the latest one)")
        self.top_k = top_k
        self.max_frames = max_frames
        self.births: list[int] = []
        self._frames: list[_MemoryFrame] = []
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None

    # objects -------------------------------------------------------------------------------------
    def add_objects(self, birth: int, count: int) -> None:
        """Register ``count`` new objects first seen at frame ``birth``."""
        self.births.extend([birth] * count)
        self._cache = None

    @property
    def num_objects(self) -> int:
        return len(self.births)

    # writing -------------------------------------------------------------------------------------
    def add(self, frame: int, key: Tensor, value: Tensor, protected: bool = False) -> None:
        """Append a memory frame.

        Args:
            frame: its index in the video.
            key: ``(1, Ck, h, w)``.
            value: ``(1, K, Cv, h, w)`` for all currently registered objects.
            protected: never dropped by the cap (frames given a mask).
        """
        hw = key.shape[-2] * key.shape[-1]
        frames, positions = frame_segment_index(frame, hw)
        segment = MemorySegment(key.flatten(2), None, frames, positions)
        self._frames.append(_MemoryFrame(segment, value[0].flatten(2), protected))
        if self.max_frames is not None and len(self._frames) > self.max_frames:
            for i, mem in enumerate(self._frames[:-1]):
                if not mem.protected:
                    del self._frames[i]
                    break
        self._cache = None

    # reading -------------------------------------------------------------------------------------
    def _concatenated(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._cache is None:
            k = self.num_objects
            key = torch.cat([m.segment.key for m in self._frames], dim=2)
            values = torch.cat([pad_objects(m.value, k) for m in self._frames], dim=2)
            frames = torch.cat([m.segment.frames for m in self._frames])
            self._cache = (key, values, frames)
        return self._cache

    def read(self, query_key: Tensor, query_selection: Tensor | None = None) -> Tensor:
        """``(1, Ck, h, w)`` query key -> ``(1, K, Cv, h, w)`` readout (selection is unused by STCN)."""
        if not self._frames:
            raise RuntimeError("the memory is empty: give a mask on the first frame")
        h, w = query_key.shape[-2:]
        key, values, frames = self._concatenated()
        sim = similarity(key, query_key.flatten(2))
        readout, _ = grouped_read(sim, values, frames, self.births, self.top_k)
        return readout.reshape(1, readout.shape[1], readout.shape[2], h, w)

    def values(self) -> Tensor:
        """``(K, Cv, N)`` stored values in read (and snapshot) order."""
        return self._concatenated()[1]

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(tuple(m.segment for m in self._frames), tuple(self.births), self.top_k)

    # stats -----------------------------------------------------------------------------------------
    @property
    def frame_indices(self) -> list[int]:
        return [int(m.segment.frames[0]) for m in self._frames]

    @property
    def num_frames(self) -> int:
        return len(self._frames)

    @property
    def num_elements(self) -> int:
        return sum(int(m.segment.frames.numel()) for m in self._frames)
