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
from typing import Sequence

import torch
from torch import Tensor

from corrvos.models.similarity import read_memory, similarity, softmax_affinity


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
    """Read weights over the elements ``index`` selects (all when None): the read's one softmax rule."""
    if index is not None:
        sim = sim.index_select(1, index)
    return softmax_affinity(sim, top_k)


def grouped_read(
    sim: Tensor,
    values: Tensor,
    element_frames: Tensor,
    births: Sequence[int],
    top_k: int | None,
) -> tuple[Tensor, Tensor | None]:
    """Read every object's memory, one softmax per birth group.

    Args:
        sim: ``(1, N, M)`` similarities of the N memory elements to the M query positions.
        values: ``(K, Cv, N)`` stored values (zero where an element precedes the object's birth).
        element_frames: ``(N,)`` CPU origin frames.
        births: birth frame of each of the K objects.
        top_k: the read's top-k.

    Returns:
        ``(1, K, Cv, M)`` readout, and the ``(1, N, M)`` affinity of the group that sees every element
        (the first-frame objects; XMem counts usage with it), or None if no group does.
    """
    parts = []
    full_affinity = None
    for birth, first, end in birth_groups(births):
        index = valid_index(element_frames, birth, sim.device)
        affinity = group_affinity(sim, index, top_k)
        group_values = values[first:end]
        if index is None:
            full_affinity = affinity
        else:
            group_values = group_values.index_select(2, index)
        parts.append(read_memory(affinity, group_values.unsqueeze(0)))
    return torch.cat(parts, dim=1), full_affinity


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
    sim = similarity(key, query_key.unsqueeze(0), shrinkage, selection)
    index = valid_index(frames, snapshot.births[object_index], sim.device)
    affinity = group_affinity(sim, index, snapshot.top_k)[0]
    if index is None:
        return affinity, frames, positions
    weights = affinity.new_zeros(frames.numel(), affinity.shape[1]).index_copy_(0, index, affinity)
    return weights, frames, positions


def pad_objects(values: Tensor, num_objects: int) -> Tensor:
    """Zero rows for objects born after these ``(K_old, Cv, N)`` values were stored."""
    missing = num_objects - values.shape[0]
    if missing <= 0:
        return values
    return torch.cat([values, values.new_zeros(missing, *values.shape[1:])], dim=0)
