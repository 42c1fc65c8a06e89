"""The architecture registry: everything the Tracker, the trainer, the evaluation and the app need to know about
an architecture, in one spec each, so that none of them asks which model it holds.

An architecture is a family of networks sharing one class and one inference memory (``ModelConfig.arch``:
"stcn", "xmem"); presets (sizes, backbones, decoder styles) are configurations of it and live in
:mod:`corrvos.models.config`. Classes are named as ``"module:attribute"`` strings and imported on first use, so
that this module imports neither torch nor the inference code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    name: str
    network_class: str  # "module:Class" of the nn.Module, built from a ModelConfig
    memory_class: str  # "module:Class" of the inference memory (see corrvos.inference.memory_common.Memory)
    default_top_k: int  # top-k of the inference memory read (upstream's evaluation defaults)
    # XMem counts mem_every from the last memory frame; STCN memorises frames t % mem_every == 0.
    relative_memory_schedule: bool
    # The key encoder's extra terms of the read: shrinkage (memory side) and selection (query side).
    key_extras: bool
    # Training: the clip preset (corrvos.training.samples.ClipConfig.preset) and the Dice term of the loss.
    clip: str
    dice_loss: bool

    @cached_property
    def network(self) -> type:
        return _import(self.network_class)

    @cached_property
    def memory(self) -> type:
        return _import(self.memory_class)


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


ARCHITECTURES: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("stcn", "corrvos.models.stcn:STCN", "corrvos.inference.stcn_memory:STCNMemory", default_top_k=20,
             relative_memory_schedule=False, key_extras=False, clip="stcn", dice_loss=False),
    ArchSpec("xmem", "corrvos.models.xmem:XMem", "corrvos.inference.xmem_memory:XMemMemory", default_top_k=30,
             relative_memory_schedule=True, key_extras=True, clip="xmem", dice_loss=True),
)}


def arch_spec(arch: str | Any) -> ArchSpec:
    """The spec of ``arch`` (a name, a ModelConfig or a network with ``.config``)."""
    name = getattr(getattr(arch, "config", arch), "arch", arch)
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None
