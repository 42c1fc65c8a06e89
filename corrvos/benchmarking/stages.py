"""Per-stage timing of ``Tracker.step`` from the outside: the network's and the memory's methods are
wrapped on the instances (the Tracker's code is untouched) and restored afterwards.

On CUDA every wrapped call is bracketed by ``torch.cuda.synchronize`` so that its time is the kernels'
time; that slows the loop, so the bench takes stage times from a separate pass on a GPU.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from corrvos.inference.tracker import Tracker

_ABSENT = object()

# stage name -> (object attribute of the tracker, method name)
STAGES: dict[str, tuple[str, str]] = {
    "key_encoding": ("model", "encode_key"),
    "memory_read": ("memory", "read"),
    "decoding": ("model", "decode"),
    "value_encoding": ("model", "encode_value"),
    "memory_write": ("memory", "add"),
}


class StageTimer:
    """Accumulates seconds per stage while attached to a tracker (``attach`` after every ``reset``)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds = {name: 0.0 for name in STAGES}
        self.calls = {name: 0 for name in STAGES}
        # (owner, method, its previous instance attribute or _ABSENT) to undo the patch exactly
        self._patched: list[tuple[object, str, object]] = []

    def attach(self, tracker: Tracker) -> None:
        """Wrap the stage methods of ``tracker.model`` and ``tracker.memory`` (which ``reset`` replaces)."""
        self.detach()
        for name, (owner_attr, method) in STAGES.items():
            owner = getattr(tracker, owner_attr)
            previous = owner.__dict__.get(method, _ABSENT)  # e.g. a torch.compile'd method
            setattr(owner, method, self._timed(name, getattr(owner, method)))
            self._patched.append((owner, method, previous))

    def detach(self) -> None:
        for owner, method, previous in reversed(self._patched):
            if previous is _ABSENT:
                delattr(owner, method)  # the class's method shows through again
            else:
                setattr(owner, method, previous)
        self._patched.clear()

    def _timed(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result

        return wrapper


def cuda_sync(device: torch.device) -> Callable[[], None]:
    """A no-op on the CPU; ``torch.cuda.synchronize`` on a CUDA device."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
