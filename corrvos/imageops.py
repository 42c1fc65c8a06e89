"""Small tensor operations shared by inference, training and evaluation.

Normalisation, padding to a multiple of 16 (centred, as upstream STCN/XMem) and the soft
aggregation of per-object probabilities. Kept in one place so that training and inference can
never disagree about them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fill colour for geometric augmentations: ImageNet mean in 0..255 as upstream uses it.
IM_MEAN_255 = (124, 116, 104)

Pad = tuple[int, int, int, int]  # (left, right, top, bottom), F.pad order


def to_float_image(image: np.ndarray | Tensor) -> Tensor:
    """RGB uint8 ``HxWx3`` array (or ``3xHxW``/``HxWx3`` float tensor in [0, 1]) -> ``3xHxW`` float."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape HxWx3, got an array of shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image, got dtype {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    if not torch.is_tensor(image) or image.dim() != 3:
        raise ValueError("expected an RGB image as a HxWx3 uint8 array or a 3xHxW float tensor")
    if image.shape[0] != 3 and image.shape[2] == 3:
        image = image.permute(2, 0, 1)
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    return image.float()


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # Cached per device: building them from Python floats is a blocking host-to-device copy, which
    # would synchronise a GPU tracker on every frame. Normal (not inference) tensors, usable anywhere.
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(3, 1, 1)
    return mean, std


def normalize(image: Tensor) -> Tensor:
    """ImageNet-normalise a ``(..., 3, H, W)`` float image in [0, 1]."""
    mean, std = _mean_std(image.device, image.dtype)
    return (image - mean) / std


def pad_divide_by(x: Tensor, divisor: int = 16) -> tuple[Tensor, Pad]:
    """Zero-pad the last two dims up to a multiple of ``divisor``, centred (floor before, rest after)."""
    h, w = x.shape[-2:]
    new_h = h if h % divisor == 0 else h + divisor - h % divisor
    new_w = w if w % divisor == 0 else w + divisor - w % divisor
    top, left = (new_h - h) // 2, (new_w - w) // 2
    pad = (left, new_w - w - left, top, new_h - h - top)
    if any(pad):
        x = F.pad(x, pad)
    return x, pad


def unpad(x: Tensor, pad: Pad) -> Tensor:
    """Undo :func:`pad_divide_by`."""
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


def aggregate(prob: Tensor, dim: int = 0) -> Tensor:
    """Soft aggregation (STM): per-object probabilities -> logits over background + objects.

    ``prob`` holds K object probabilities along ``dim``; the background is ``prod(1 - p_k)``. The
    stacked probabilities are clamped, turned into logits ``log(p / (1 - p))`` and returned as
    logits with K + 1 channels along ``dim`` (background first). ``softmax`` of them is the
    aggregated probability used by inference; training feeds them to the cross-entropy.
    """
    bg = torch.prod(1 - prob, dim=dim, keepdim=True)
    stacked = torch.cat([bg, prob], dim=dim).clamp(1e-7, 1 - 1e-7)
    return torch.log(stacked / (1 - stacked))
