"""STCN's memory bank: whole memory frames appended as they come, read with a top-k softmax.

Upstream STCN grows the bank without bound (a memory frame every ``mem_every`` frames). ``max_frames``
optionally caps it by dropping the oldest frames that were not given a mask (the annotated frames,
frame 0 first of all, are the anchors and stay).

The read path works on an :class:`ElementBuffer` (keys and element-major values in preallocated,
geometrically growing tensors); the per-frame segments kept beside it only hold key references for
snapshots (:meth:`Tracker.matches`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from corrvos.inference.memory_common import (
    ElementBuffer,
    GroupIndexCache,
    MemorySegment,
    MemorySnapshot,
    frame_segment_index,
    grouped_read,
)
from corrvos.models.similarity import Workspace, similarity


@dataclass(frozen=True)
class _MemoryFrame:
    segment: MemorySegment
    protected: bool


class STCNMemory:
    """Keys shared by all objects, values per object, one affinity per read.

    Args:
        top_k: the read's top-k (upstream: 20).
        max_frames: optional cap on the number of memory frames (None: unbounded, as upstream).
    """

    hidden = None  # no sensory memory
    keeps_selection = False

    def __init__(self, top_k: int | None = 20, max_frames: int | None = None) -> None:
        if max_frames is not None and max_frames < 2:
            raise ValueError("max_memory_frames must be at least 2 (the first frame and the latest one)")
        self.top_k = top_k
        self.max_frames = max_frames
        self.births: list[int] = []
        self._frames: list[_MemoryFrame] = []
        self._buffer = ElementBuffer()
        self._groups = GroupIndexCache()
        self._workspace = Workspace()  # the read's similarity and gathered values, reused every frame

    @classmethod
    def for_tracker(cls, top_k: int | None, config: Any, options: dict[str, Any]) -> "STCNMemory":
        return cls(top_k, options.get("max_memory_frames"))

    def options(self) -> dict[str, Any]:
        return {"max_memory_frames": self.max_frames}

    def memorise(self, frame: int, feats: Any, value: Tensor, given: bool) -> None:
        """The Tracker's memory write: frames given a mask are protected from the cap."""
        self.add(frame, feats.key, value, protected=given)

    def stats(self) -> tuple[int, int, int, int]:
        return self.num_frames, self.num_elements, 0, 0

    # objects -------------------------------------------------------------------------------------
    def add_objects(self, birth: int, count: int, feature_like: Tensor | None = None) -> None:
        """Register ``count`` new objects first seen at frame ``birth``."""
        self.births.extend([birth] * count)
        self._buffer.ensure_objects(self.num_objects)

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
        self._frames.append(_MemoryFrame(segment, protected))
        self._buffer.append(segment.key, None, value[0].flatten(2), frames)
        self._buffer.ensure_objects(self.num_objects)
        if self.max_frames is not None and len(self._frames) > self.max_frames:
            start = 0
            for i, mem in enumerate(self._frames[:-1]):
                n = mem.segment.frames.numel()
                if not mem.protected:
                    del self._frames[i]
                    self._buffer.remove(start, start + n)
                    break
                start += n

    # reading -------------------------------------------------------------------------------------
    def read(self, query_key: Tensor, query_selection: Tensor | None = None) -> Tensor:
        """``(1, Ck, h, w)`` query key -> ``(1, K, Cv, h, w)`` readout (selection is unused by STCN)."""
        if not self._frames:
            raise RuntimeError("the memory is empty: give a mask on the first frame")
        h, w = query_key.shape[-2:]
        buf = self._buffer
        frames = buf.element_frames()
        sim = similarity(buf.keys(), query_key.flatten(2), query_major=True, workspace=self._workspace)
        readout, _ = grouped_read(
            sim, buf.values(), frames, self.births, self.top_k,
            lambda birth: self._groups.get(buf.version, frames, birth, sim.device), self._workspace,
        )
        return readout.reshape(1, readout.shape[1], readout.shape[2], h, w)

    def values(self) -> Tensor:
        """``(K, Cv, N)`` stored values in read (and snapshot) order (a view: valid until the next change)."""
        return self._buffer.values().permute(1, 2, 0)

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
        return self._buffer.size
