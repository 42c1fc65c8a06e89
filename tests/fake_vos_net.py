"""A tiny hand-made network with the STCN/XMem interface, for tracker and memory tests.

Its keys are the frame's colours pooled to stride 16, its values the pooled masks, and its decoder
turns the read mask back into logits, so it really tracks distinctly coloured objects on a plain
background: tests can check segmentation quality without trained weights and run in milliseconds.
XMem mode adds a shrinkage, a selection and a hidden state that all influence the result.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.models.stcn import KeyFeatures


class FakeVOSNet(nn.Module):
    def __init__(self, arch: str = "stcn", key_dim: int = 4, hidden_dim: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(
            arch=arch, name=f"fake-{arch}", key_dim=key_dim, value_dim=3, hidden_dim=hidden_dim if arch == "xmem" else 0
        )
        proj = torch.zeros(key_dim, 3)
        proj[:3] = torch.eye(3) * 8.0
        proj[3:] = torch.randn(key_dim - 3, 3, generator=gen) * 0.1
        self.key_proj = nn.Parameter(proj)
        self.d_proj = nn.Parameter(torch.randn(1, 3, generator=gen) * 0.3)
        self.e_proj = nn.Parameter(torch.randn(key_dim, 3, generator=gen) * 0.5)

    def encode_key(self, image: Tensor, need_shrinkage: bool = True, need_selection: bool = True) -> KeyFeatures:
        f16 = F.avg_pool2d(image, 16)
        key = torch.einsum("kc,bchw->bkhw", self.key_proj, f16)
        shrinkage = selection = None
        if self.config.arch == "xmem":
            if need_shrinkage:
                shrinkage = torch.einsum("kc,bchw->bkhw", self.d_proj, f16) ** 2 + 1
            if need_selection:
                selection = torch.sigmoid(torch.einsum("kc,bchw->bkhw", self.e_proj, f16) + 2)
        return KeyFeatures(key, shrinkage, selection, f16, F.avg_pool2d(image, 8), F.avg_pool2d(image, 4))

    def encode_value(self, image, feats, hidden, masks, others, deep_update=True):
        b, k, h, w = masks.shape
        m16 = F.avg_pool2d(masks, 16)
        o16 = F.avg_pool2d(others, 16)
        value = torch.stack([m16, o16, m16 * feats.f16[:, :1]], dim=2)  # (B, K, 3, h, w)
        if self.config.hidden_dim and deep_update:
            hidden = self._zeros_if_none(hidden, value)
            hidden = torch.tanh(0.5 * hidden + m16.unsqueeze(2))
        return value, hidden if self.config.hidden_dim else None

    def decode(self, feats, readout, hidden=None, update_hidden=True):
        logit16 = 12.0 * (readout[:, :, 0] - 0.5)
        if self.config.hidden_dim:
            hidden = self._zeros_if_none(hidden, readout)
            logit16 = logit16 + 0.1 * hidden[:, :, 0]
            if update_hidden:
                hidden = torch.tanh(0.5 * hidden + readout[:, :, :1])
        logits = F.interpolate(logit16, scale_factor=16.0, mode="bilinear", align_corners=False)
        return (hidden if self.config.hidden_dim else None), logits

    def _zeros_if_none(self, hidden, like):
        if hidden is not None:
            return hidden
        b, k, _, h, w = like.shape
        return like.new_zeros(b, k, self.config.hidden_dim, h, w)


COLOURS = {1: (220, 40, 40), 2: (40, 60, 220), 3: (40, 200, 60)}


def moving_squares(
    num_frames: int,
    height: int = 152,
    width: int = 120,
    square: int = 36,
    late_object_at: int | None = None,
    seed: int = 0,
) -> tuple[list, list]:
    """Frames (HxWx3 uint8) and label maps of squares sliding across a noisy grey background.

    The default size is not a multiple of 16, so padding is exercised.

    Objects 1 and 2 move in the top and bottom bands (bobbing a little vertically); with
    ``late_object_at`` a third, green square enters the middle band at that frame. The bands keep
    the objects apart so that every object stays visible in every frame.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    frames, labels = [], []
    span = width - square
    bands = {1: 2, 2: height - square - 10, 3: (height - square) // 2 - 4}
    for t in range(num_frames):
        img = np.full((height, width, 3), 120, np.int16) + rng.integers(-6, 7, (height, width, 3))
        lab = np.zeros((height, width), np.uint8)
        positions = {
            1: (bands[1] + _bounce(t, 8), _bounce(3 + 2 * t, span)),
            2: (bands[2] + _bounce(2 * t, 8), _bounce(span - 1 - 3 * t, span)),
        }
        if late_object_at is not None and t >= late_object_at:
            positions[3] = (bands[3] + _bounce(t, 8), _bounce(2 * (t - late_object_at), span))
        for obj, (y, x) in positions.items():
            img[y : y + square, x : x + square] = COLOURS[obj]
            lab[y : y + square, x : x + square] = obj
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return frames, labels


def _bounce(v: int, span: int) -> int:
    v = v % (2 * span)
    return v if v <= span else 2 * span - v
