"""Building blocks shared by STCN and XMem.

Attribute names follow upstream so that state_dict keys match the released checkpoints
(``downsample``, ``ChannelGate.mlp.{1,3}``, ``SpatialGate.spatial.conv``, ``skip_conv``, ``out_conv``).

"Group" tensors carry an object axis, ``(B, K, C, H, W)``. XMem builds separate group modules for
them; here every block accepts both ``(N, C, H, W)`` and group tensors, folding K into the batch,
so one class serves both networks.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def orthogonal_(weight: Tensor) -> Tensor:
    """``nn.init.orthogonal_`` run on one thread.

    Its QR of a tall, skinny matrix is tiny work, but with several OpenMP threads on a busy CPU it
    took up to 1.5 s per call here (against 0.05 s on one thread), dominating model construction.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return nn.init.orthogonal_(weight)
    finally:
        torch.set_num_threads(threads)


def fold_objects(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 4-D ``fn`` to a 4-D tensor, or to a 5-D group tensor with K folded into the batch."""
    if x.dim() == 5:
        b, k = x.shape[:2]
        if k == 1:
            # select/unsqueeze keep a channels-last tensor's batch stride; flatten/view of two size-1
            # dims would give it stride C, which upsampling and convolutions then take for NCHW and
            # copy (measured: decode 150 -> 134 ms/frame for stcn-s at 480p, one thread).
            return fn(x.select(1, 0)).unsqueeze(1)
        out = fn(x.flatten(0, 1))
        return out.view(b, k, *out.shape[1:])
    return fn(x)


def expand_objects(x: Tensor, num_objects: int) -> Tensor:
    """Broadcast an image-level ``(B, C, H, W)`` feature to every object: ``(B, K, C, H, W)``."""
    return x.unsqueeze(1).expand(-1, num_objects, -1, -1, -1)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 3x3 ``downsample`` conv matches channels when in != out."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.downsample = nn.Conv2d(in_dim, out_dim, 3, padding=1) if in_dim != out_dim else None
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)

    def _forward(self, x: Tensor) -> Tensor:
        # In place on fresh convolution outputs (autograd-safe: neither is saved for backward).
        r = self.conv2(F.relu(self.conv1(F.relu(x)), inplace=True))
        if self.downsample is not None:
            x = self.downsample(x)
        return r.add_(x)

    def forward(self, x: Tensor) -> Tensor:
        return fold_objects(self._forward, x)


class ChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        # Index layout (Flatten, Linear, ReLU, Linear) gives upstream's keys mlp.1 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        att = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(att)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2))
        )

    def forward(self, x: Tensor) -> Tensor:
        # Channel max first, then mean: the order the released weights were trained with.
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    """Channel gate followed by spatial gate (Woo et al. 2018), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(channels, reduction)
        self.SpatialGate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        return fold_objects(lambda t: self.SpatialGate(self.ChannelGate(t)), x)


class FeatureFusionBlock(nn.Module):
    """ResBlock(in -> mid), CBAM added as a residual, ResBlock(mid -> out).

    The caller concatenates the inputs (the channel order differs between STCN and XMem).
    """

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.block1 = ResBlock(in_dim, mid_dim)
        self.attention = CBAM(mid_dim, reduction)
        self.block2 = ResBlock(mid_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block1(x)
        return self.block2(x + self.attention(x))


class UpsampleBlock(nn.Module):
    """Decoder step: image-level skip feature (conv) + group feature upsampled x2, then a ResBlock."""

    def __init__(self, skip_dim: int, up_dim: int, out_dim: int) -> None:
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_dim, up_dim, 3, padding=1)
        self.out_conv = ResBlock(up_dim, out_dim)

    def forward(self, skip: Tensor, up: Tensor) -> Tensor:
        """``skip`` ``(B, Cs, 2h, 2w)``, ``up`` ``(B, K, Cu, h, w)`` -> ``(B, K, out, 2h, 2w)``."""
        # The skip conv runs once per image, not once per object: it does not depend on the object.
        skip = self.skip_conv(skip).unsqueeze(1)
        up = fold_objects(
            lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False), up
        )
        return self.out_conv(up.add_(skip))


class KeyProjection(nn.Module):
    """3x3 key projection; with ``xmem_terms`` also XMem's shrinkage (``d_proj``) and selection (``e_proj``)."""

    def __init__(self, in_dim: int, key_dim: int, xmem_terms: bool) -> None:
        super().__init__()
        self.key_proj = nn.Conv2d(in_dim, key_dim, 3, padding=1)
        self.d_proj = nn.Conv2d(in_dim, 1, 3, padding=1) if xmem_terms else None
        self.e_proj = nn.Conv2d(in_dim, key_dim, 3, padding=1) if xmem_terms else None
        # Orthogonal keys spread the initial similarities out, as upstream initialises them.
        orthogonal_(self.key_proj.weight)
        nn.init.zeros_(self.key_proj.bias.data)

    def forward(
        self, x: Tensor, need_shrinkage: bool = True, need_selection: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> key, shrinkage ``d^2 + 1`` (>= 1) or None, selection ``sigmoid(e)`` in (0, 1) or None."""
        shrinkage = selection = None
        if self.d_proj is not None and need_shrinkage:
            shrinkage = self.d_proj(x) ** 2 + 1
        if self.e_proj is not None and need_selection:
            selection = torch.sigmoid(self.e_proj(x))
        return self.key_proj(x), shrinkage, selection
