"""Inference precision modes: fp32, or the network under bf16 / fp16 autocast with the memory kept in fp32.

torch is imported on use, so command lines can offer the modes without loading it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from corrvos.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The network's autocast dtype in ``precision`` mode (None: plain fp32)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise InputError (one sentence) when ``device`` cannot run the network in ``precision`` mode."""
    import torch

    dtype = autocast_dtype(precision)
    device = torch.device(device)
    if dtype is None:
        return
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InputError("This GPU does not support bf16; use --precision fp16 or fp32.")
    try:
        torch.autocast(device_type=device.type, dtype=dtype)
    except RuntimeError as err:
        raise InputError(f"--precision {precision} is not supported on {device.type} ({err}); use fp32.") from None
