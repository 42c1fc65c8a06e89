"""What the STCN bank and the XMem working/long-term memory share.

Objects and validity
    Every object has a *birth* frame (the frame whose mask first named it). Every memory element has an
    *origin* frame (the frame its key was computed on; for an XMem long-term prototype, the frame of the
    candidate it was chosen from). An element carries a value for an object only when
    ``origin >= birth``: before that the object did not exist, its stored value is zero and the read for
    that object ignores the element. Objects born on the same frame therefore share one softmax (upstream
    XMem calls them an "object group"), and the objects given on the first frame see every element.

Snapshots
    Keys are never modified in place (adding or removing elements always builds new tensors), so the
    memory as it was at frame t is a handful of tensor references (:class:`MemorySnapshot`). The tracker
    keeps one per processed frame so that :meth:`Tracker.matches` recomputes the read weights of any
    frame with the very same functions the read used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from corrvos.models.similarity import TopKAffinity, Workspace, read_topk, similarity, softmax_affinity, topk_affinity


@dataclass(frozen=True)
class MemorySegment:
    """A contiguous run of memory elements in read order."""

    key: Tensor  # (1, Ck, n)
    shrinkage: Tensor | None  # (1, 1, n), XMem only
    frames: Tensor  # (n,) int64 on the CPU: origin frame of each element
    positions: Tensor  # (n,) int64 on the CPU: flat feature position (row * w + col) in the origin frame


@dataclass(frozen=True)
class MemorySnapshot:
    """The memory a read saw: its elements in read order, the objects' births and the read's top-k."""

    segments: tuple[MemorySegment, ...]
    births: tuple[int, ...]
    top_k: int | None

    def keys(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Concatenated (key, shrinkage or None, origin frames, positions)."""
        segs = self.segments
        key = torch.cat([s.key for s in segs], dim=2)
        shrinkage = None
        if segs[0].shrinkage is not None:
            shrinkage = torch.cat([s.shrinkage for s in segs], dim=2)
        frames = torch.cat([s.frames for s in segs])
        positions = torch.cat([s.positions for s in segs])
        return key, shrinkage, frames, positions

    @property
    def num_elements(self) -> int:
        return sum(int(s.frames.numel()) for s in self.segments)


def frame_segment_index(frame: int, hw: int) -> tuple[Tensor, Tensor]:
    """(origin frames, positions) of the ``hw`` elements a whole memory frame contributes."""
    return torch.full((hw,), frame, dtype=torch.long), torch.arange(hw, dtype=torch.long)


def birth_groups(births: Sequence[int]) -> list[tuple[int, int, int]]:
    """``[(birth, first_object, end_object)]``: runs of objects born on the same frame.

    New objects are always appended, so objects sharing a birth are contiguous channels.
    """
    groups: list[tuple[int, int, int]] = []
    for obj, birth in enumerate(births):
        if groups and groups[-1][0] == birth:
            groups[-1] = (birth, groups[-1][1], obj + 1)
        else:
            groups.append((birth, obj, obj + 1))
    return groups


def valid_index(element_frames: Tensor, birth: int, device: torch.device) -> Tensor | None:
    """Indices of the elements that exist for objects born at ``birth``; None when all of them do.

    ``element_frames`` lives on the CPU so that this decision costs no device synchronisation.
    """
    valid = element_frames >= birth
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1).to(device)


def group_affinity(sim: Tensor, index: Tensor | None, top_k: int | None) -> Tensor:
    """Dense ``(B, N', M)`` read weights over the elements ``index`` selects (all when None).

    The same rule as the read (:func:`group_topk`), for callers that want an ``N x M`` matrix.
    """
    if index is not None:
        sim = sim.index_select(1, index)
    return softmax_affinity(sim, top_k)


def group_topk(sim: Tensor, index: Tensor | None, top_k: int | None) -> TopKAffinity:
    """The read's one softmax rule on query-major ``(B, M, N)`` similarities, restricted to the
    elements ``index`` selects (all when None); the indices returned refer to all N elements."""
    if index is None:
        return topk_affinity(sim, top_k)
    affinity = topk_affinity(sim.index_select(2, index), top_k)
    return affinity.remap(index, sim.shape[2])


class ElementBuffer:
    """Memory elements in read order, in preallocated tensors that grow geometrically.

    Appending a memory frame writes into spare capacity (amortised O(frame) and no reallocation
    most of the time, where concatenating would copy the whole memory every memory frame).
    Values are element-major ``(capacity, K, Cv)`` so that a top-k read gathers contiguous rows.
    The buffer is private to one memory: snapshots keep their own references to the keys (see
    :class:`MemorySnapshot`), so the buffer may be modified in place.
    """

    def __init__(self, shrinkage: bool = False) -> None:
        self.has_shrinkage = shrinkage
        self.size = 0
        self.key: Tensor | None = None  # (1, Ck, capacity)
        self.shrinkage: Tensor | None = None  # (1, 1, capacity)
        self.value: Tensor | None = None  # (capacity, K, Cv)
        self.frames = torch.zeros(0, dtype=torch.long)  # (capacity,) CPU origin frames
        self.version = 0  # changes with the content (read caches compare it)

    @property
    def capacity(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def _allocate(self, like_key: Tensor, like_value: Tensor, channels: int, capacity: int, objects: int) -> None:
        key = like_key.new_empty(1, like_key.shape[1], capacity)
        shrinkage = like_key.new_empty(1, 1, capacity) if self.has_shrinkage else None
        value = like_value.new_zeros(capacity, objects, channels)
        frames = torch.zeros(capacity, dtype=torch.long)
        n = self.size
        if n:
            key[:, :, :n] = self.key[:, :, :n]
            if shrinkage is not None:
                shrinkage[:, :, :n] = self.shrinkage[:, :, :n]
            value[:n, : self.value.shape[1]] = self.value[:n]
            frames[:n] = self.frames[:n]
        self.key, self.shrinkage, self.value, self.frames = key, shrinkage, value, frames

    def ensure_objects(self, objects: int) -> None:
        """Room for ``objects`` objects (new objects read zeros for the elements stored before them)."""
        if self.value is not None and self.value.shape[1] < objects:
            self._allocate(self.key, self.value, self.value.shape[2], self.capacity, objects)
            self.version += 1

    def append(self, key: Tensor, shrinkage: Tensor | None, value: Tensor, frames: Tensor) -> None:
        """Add elements: key ``(1, Ck, n)``, shrinkage ``(1, 1, n)``, value ``(K', Cv, n)``
        (``K'`` <= objects of the buffer), CPU frames ``(n,)``."""
        n = key.shape[2]
        start, end = self.size, self.size + n
        objects = max(value.shape[0], 0 if self.value is None else self.value.shape[1])
        if self.key is None or end > self.capacity:
            self._allocate(key, value, value.shape[1], max(end, 2 * self.capacity), objects)
        else:
            self.ensure_objects(objects)
        self.key[:, :, start:end] = key
        if self.has_shrinkage:
            self.shrinkage[:, :, start:end] = shrinkage
        self.value[start:end, : value.shape[0]] = value.permute(2, 0, 1)
        self.value[start:end, value.shape[0]:] = 0
        self.frames[start:end] = frames
        self.size = end
        self.version += 1

    def remove(self, start: int, end: int) -> None:
        """Drop elements ``start:end`` (later elements move up; capacity is kept)."""
        n = self.size
        tail = n - end
        if tail > 0:
            self.key[:, :, start : start + tail] = self.key[:, :, end:n].clone()
            if self.has_shrinkage:
                self.shrinkage[:, :, start : start + tail] = self.shrinkage[:, :, end:n].clone()
            self.value[start : start + tail] = self.value[end:n].clone()
            self.frames[start : start + tail] = self.frames[end:n].clone()
        self.size = n - (end - start)
        self.version += 1

    def assign(self, key: Tensor, shrinkage: Tensor | None, value: Tensor, frames: Tensor) -> None:
        """Replace the whole content: key ``(1, Ck, N)``, shrinkage ``(1, 1, N)``, value ``(N, K, Cv)``."""
        self.size = 0
        n = key.shape[2]
        if self.key is None or n > self.capacity or value.shape[1] != self.value.shape[1]:
            self._allocate(key, value, value.shape[2], max(n, self.capacity), value.shape[1])
        self.key[:, :, :n] = key
        if self.has_shrinkage:
            self.shrinkage[:, :, :n] = shrinkage
        self.value[:n] = value
        self.frames[:n] = frames
        self.size = n
        self.version += 1

    def keys(self) -> Tensor:
        """``(1, Ck, N)`` view of the keys in read order."""
        return self.key[:, :, : self.size]

    def shrinkages(self) -> Tensor | None:
        return None if self.shrinkage is None else self.shrinkage[:, :, : self.size]

    def values(self) -> Tensor:
        """``(N, K, Cv)`` view of the values in read order (valid until the buffer next changes)."""
        return self.value[: self.size]

    def element_frames(self) -> Tensor:
        return self.frames[: self.size]


class GroupIndexCache:
    """Device copies of each birth group's valid-element index, rebuilt only when the memory changes
    (so a read costs no host-to-device copy and no synchronisation)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._index: dict[int, Tensor | None] = {}

    def get(self, version: int, element_frames: Tensor, birth: int, device: torch.device) -> Tensor | None:
        if self._key != (version, device):
            self._key, self._index = (version, device), {}
        if birth not in self._index:
            self._index[birth] = valid_index(element_frames, birth, device)
        return self._index[birth]


def grouped_read(
    sim: Tensor,
    values: Tensor,
    element_frames: Tensor,
    births: Sequence[int],
    top_k: int | None,
    index_for: Callable[[int], Tensor | None] | None = None,
    workspace: Workspace | None = None,
) -> tuple[Tensor, TopKAffinity | None]:
    """Read every object's memory, one softmax per birth group.

    Args:
        sim: ``(1, M, N)`` query-major similarities of the M query positions to the N memory elements.
        values: ``(N, K, Cv)`` element-major stored values (zero where an element precedes the
            object's birth).
        element_frames: ``(N,)`` CPU origin frames.
        births: birth frame of each of the K objects.
        top_k: the read's top-k.
        index_for: ``birth -> valid index on the device`` (a cache); default computes it.
        workspace: reusable storage for the gathered values.

    Returns:
        ``(1, K, Cv, M)`` readout, and the sparse affinity of the group that sees every element
        (the first-frame objects; XMem counts usage with it), or None if no group does.
    """
    n, k, cv = values.shape
    m = sim.shape[1]
    flat_values = values.reshape(1, n, k * cv)
    groups = birth_groups(births)
    parts = []
    full_affinity = None
    for birth, first, end in groups:
        index = index_for(birth) if index_for is not None else valid_index(element_frames, birth, sim.device)
        if index is not None and index.numel() == 0:
            parts.append(values.new_zeros(1, m, end - first, cv))  # nothing exists yet for these objects
            continue
        if index is None:
            affinity = topk_affinity(sim, top_k)
            full_affinity = affinity
            out = read_topk(affinity, flat_values, workspace)
        else:
            affinity = topk_affinity(sim.index_select(2, index), top_k)
            if affinity.indices is None:  # full softmax over the subset: a dense product over it
                out = read_topk(affinity, flat_values.index_select(1, index))
            else:
                out = read_topk(affinity.remap(index, n), flat_values, workspace)
        # Every object's values were gathered (one contiguous row per element); keep this group's.
        parts.append(out.view(1, m, k, cv)[:, :, first:end])
    readout = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return readout.permute(0, 2, 3, 1), full_affinity


def snapshot_weights(
    snapshot: MemorySnapshot,
    query_key: Tensor,
    query_selection: Tensor | None,
    object_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The weights the read of ``snapshot`` gave each element, recomputed for some query positions.

    Args:
        query_key: ``(Ck, M)`` keys of the query positions.
        query_selection: ``(Ck, M)`` XMem selection of the query positions, or None.
        object_index: channel of the object whose read is wanted (objects of one birth group share it).

    Returns:
        ``(N, M)`` weights in snapshot order (zero outside the top-k and for elements before the
        object's birth), and the elements' ``(N,)`` origin frames and positions (CPU).
    """
    key, shrinkage, frames, positions = snapshot.keys()
    selection = None if query_selection is None else query_selection.unsqueeze(0)
    sim = similarity(key, query_key.unsqueeze(0), shrinkage, selection, query_major=True)
    index = valid_index(frames, snapshot.births[object_index], sim.device)
    if index is not None and index.numel() == 0:
        return sim.new_zeros(frames.numel(), sim.shape[1]), frames, positions
    affinity = group_topk(sim, index, snapshot.top_k)
    return affinity.dense(frames.numel())[0], frames, positions


def pad_objects(values: Tensor, num_objects: int) -> Tensor:
    """Zero rows for objects born after these ``(K_old, Cv, N)`` values were stored."""
    missing = num_objects - values.shape[0]
    if missing <= 0:
        return values
    return torch.cat([values, values.new_zeros(missing, *values.shape[1:])], dim=0)



class Memory(Protocol):
    """What the Tracker needs from an architecture's inference memory (STCNMemory, XMemMemory)."""

    top_k: int | None
    births: list[int]
    hidden: Tensor | None  # sensory memory (1, K, Ch, h, w), or None for memories without one
    # The query selection must be computed even on frames that need no read (XMem's long-term memory keeps it).
    keeps_selection: bool

    @classmethod
    def for_tracker(cls, top_k: int | None, config: Any, options: dict[str, Any]) -> "Memory": ...

    def options(self) -> dict[str, Any]: ...  # the Tracker memory keywords this memory runs with

    def add_objects(self, birth: int, count: int, feature_like: Tensor) -> None: ...

    def memorise(self, frame: int, feats: Any, value: Tensor, given: bool) -> None: ...

    def read(self, query_key: Tensor, query_selection: Tensor | None = None) -> Tensor: ...

    def snapshot(self) -> MemorySnapshot: ...

    def stats(self) -> tuple[int, int, int, int]: ...  # (memory frames, working elements, long-term, consolidations)
