"""ResNet backbones: the key (query) encoder and the value (memory) encoder's ResNet.

Both keep only stages 1-3 (stride 16). The key encoder is torchvision's ResNet-50/-18 with upstream
attribute names (``res2`` for torchvision's ``layer1``). The value encoder is our own ResNet-18
layout with a configurable number of input channels (image + mask + other objects), configurable
stage widths (for the small variants) and optional conv biases: STCN's custom ResNet has a bias on
every conv, XMem's has none, and the released checkpoints load strictly only with the right choice.

ImageNet initialisation reads torchvision's weight files from the torch hub cache and never
downloads (corrvos does not touch the network at run time).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from corrvos.errors import CheckpointError
from corrvos.models.blocks import orthogonal_

# torchvision's file for each backbone, plus the older file name STCN's code downloaded (same weights).
_IMAGENET_FILES: dict[str, tuple[str, ...]] = {
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
}


def imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch`` from the torch hub cache; CheckpointError if absent."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in _IMAGENET_FILES[arch]:
        path = folder / name
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # corrupt cache file: say which one
                raise CheckpointError(
                    f"The cached ImageNet weights {path} could not be read ({type(err).__name__}); "
                    "delete the file and place a fresh copy there, or build the model with imagenet=False."
                ) from err
    raise CheckpointError(
        f"ImageNet weights for {arch} are not in the torch hub cache ({folder / _IMAGENET_FILES[arch][0]}); "
        "copy torchvision's file there from a machine with internet access, or build the model with imagenet=False."
    )


class KeyEncoder(nn.Module):
    """ResNet stem + stages 1-3. Returns (f16, f8, f4)."""

    def __init__(self, backbone: str = "resnet50") -> None:
        super().__init__()
        if backbone == "resnet50":
            net = torchvision.models.resnet50(weights=None)
        elif backbone == "resnet18":
            net = torchvision.models.resnet18(weights=None)
        else:
            raise ValueError(f"unknown key backbone {backbone!r}")
        self.backbone = backbone
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.res2 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f4 = self.res2(x)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return f16, f8, f4

    def load_imagenet(self) -> None:
        src = imagenet_state_dict(self.backbone)
        own = self.state_dict()
        renamed = {("res2." + k[len("layer1."):] if k.startswith("layer1.") else k): v for k, v in src.items()}
        self.load_state_dict({k: renamed[k] for k in own if k in renamed}, strict=False)


def build_key_encoder(backbone: str) -> nn.Module:
    """The key encoder for ``ModelConfig.key_backbone``: a ResNet or an EfficientNet-Lite, each -> (f16, f8, f4)."""
    if backbone.startswith("efficientnet-lite"):
        from corrvos.models.efficientnet_lite import LiteKeyEncoder

        return LiteKeyEncoder(backbone)
    return KeyEncoder(backbone)


class BasicBlock(nn.Module):
    """ResNet-18 basic block with optional conv biases (STCN's custom ResNet has them)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.downsample = None
        if stride != 1 or in_dim != out_dim:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=bias), nn.BatchNorm2d(out_dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        # In place on fresh intermediate tensors (autograd-safe: none is saved for backward).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out.add_(identity), inplace=True)


class ValueResNet(nn.Module):
    """ResNet-18 stem + stages 1-3 for the value encoder; ``forward`` returns the stride-16 feature.

    Subclasses (STCN's and XMem's value encoders) add their ``fuser`` etc. as attributes, so the
    backbone's state_dict keys stay at the top level (``value_encoder.conv1.weight``, ...) as upstream.
    """

    def __init__(
        self,
        in_channels: int = 5,
        widths: tuple[int, int, int] = (64, 128, 256),
        bias: bool = True,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, w1, 7, stride=2, padding=3, bias=bias)
        self.bn1 = nn.BatchNorm2d(w1)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(w1, w1, 1, bias), BasicBlock(w1, w1, 1, bias))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, 2, bias), BasicBlock(w2, w2, 1, bias))
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, 2, bias), BasicBlock(w3, w3, 1, bias))
        self._init_backbone()

    def _init_backbone(self) -> None:
        # Same scheme as torchvision's ResNet so that training from scratch starts sensibly.
        for m in [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]:
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d):
                    nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)
                elif isinstance(mod, nn.BatchNorm2d):
                    nn.init.ones_(mod.weight)
                    nn.init.zeros_(mod.bias)
        self._init_extra_channels()

    def _init_extra_channels(self) -> None:
        # The mask channels have no ImageNet counterpart; upstream initialises them orthogonally.
        if self.in_channels > 3:
            extra = torch.empty(self.conv1.out_channels, (self.in_channels - 3) * 49)
            orthogonal_(extra)
            with torch.no_grad():
                self.conv1.weight[:, 3:] = extra.view(self.conv1.out_channels, self.in_channels - 3, 7, 7)

    def backbone(self, x: Tensor) -> Tensor:
        # relu/maxpool commute (both monotone), so this serves XMem's bn -> maxpool -> relu order too.
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def load_imagenet(self) -> list[str]:
        """Load torchvision ResNet-18 weights where shapes fit; returns the keys that were loaded.

        conv1 takes the RGB filters and keeps orthogonal weights for the mask channels; conv biases
        (STCN) stay zero. Narrow (small-variant) stages do not fit and keep their random init.
        """
        src = imagenet_state_dict("resnet18")
        own = self.state_dict()
        take: dict[str, Tensor] = {}
        for key, value in src.items():
            if key.endswith("num_batches_tracked"):
                continue  # a counter, not a weight; it would "fit" any stage
            if key == "conv1.weight" and key in own and own[key].shape[0] == value.shape[0]:
                merged = own[key].clone()
                merged[:, :3] = value
                take[key] = merged
            elif key in own and own[key].shape == value.shape:
                take[key] = value
        self.load_state_dict(take, strict=False)
        return sorted(take)
