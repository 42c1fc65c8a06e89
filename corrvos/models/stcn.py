"""STCN (Cheng et al., NeurIPS 2021) network: key encoder, value encoder, decoder.

The memory read is not part of the network: the tracker and the trainer read memory with
``corrvos.models.similarity`` and pass the readout to :meth:`STCN.decode`. With the "stcn" preset
the state_dict keys and shapes equal the released ``stcn.pth``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.models.backbones import ValueResNet, build_key_encoder
from corrvos.models.blocks import (
    FeatureFusionBlock,
    KeyProjection,
    ResBlock,
    UpsampleBlock,
    expand_objects,
    fold_objects,
)
from corrvos.models.config import ModelConfig


class KeyFeatures(NamedTuple):
    """Everything :meth:`encode_key` computes for one frame (shared by all objects)."""

    key: Tensor  # (B, Ck, h, w)
    shrinkage: Tensor | None  # (B, 1, h, w), XMem only
    selection: Tensor | None  # (B, Ck, h, w), XMem only
    f16: Tensor  # (B, C16, h, w)
    f8: Tensor  # (B, C8, 2h, 2w)
    f4: Tensor  # (B, C4, 4h, 4w)


def value_encoder_input(image: Tensor, masks: Tensor, others: Tensor) -> Tensor:
    """``(B, 3, H, W)`` image + ``(B, K, H, W)`` masks and others -> ``(B, K, 5, H, W)``."""
    num_objects = masks.shape[1]
    return torch.cat(
        [expand_objects(image, num_objects), masks.unsqueeze(2).to(image.dtype), others.unsqueeze(2).to(image.dtype)],
        dim=2,
    )


def predict_logits(pred: nn.Conv2d, g4: Tensor) -> Tensor:
    """``(B, K, C, H/4, W/4)`` decoder feature -> ``(B, K, 1, H/4, W/4)`` logits (conv on relu)."""
    return fold_objects(lambda t: pred(F.relu(t)), g4)


def upsample_logits(logits: Tensor) -> Tensor:
    """``(B, K, 1, H/4, W/4)`` -> ``(B, K, H, W)``, bilinear x4."""
    return fold_objects(
        lambda t: F.interpolate(t, scale_factor=4.0, mode="bilinear", align_corners=False), logits
    )[:, :, 0]


class MatchingNetwork(nn.Module):
    """What STCN and XMem share: key encoding, config, and a ``forward`` dispatcher.

    ``forward(mode, ...)`` exists so that DistributedDataParallel (which only hooks ``forward``) can
    wrap the network: ``net("encode_key", image)`` equals ``net.encode_key(image)``.
    """

    config: ModelConfig
    key_encoder: nn.Module
    key_proj: KeyProjection
    # Shorter side frames should be resized to at inference: the scale the weights were trained at
    # (load_model sets it from the checkpoint; 480 is the upstream protocol).
    preferred_size: int = 480

    def encode_key(
        self, image: Tensor, need_shrinkage: bool = True, need_selection: bool = True
    ) -> KeyFeatures:
        """``(B, 3, H, W)`` normalised image, H and W multiples of 16 -> :class:`KeyFeatures`."""
        f16, f8, f4 = self.key_encoder(image)
        key, shrinkage, selection = self.key_proj(f16, need_shrinkage, need_selection)
        return KeyFeatures(key, shrinkage, selection, f16, f8, f4)

    def forward(self, mode: str, *args: Any, **kwargs: Any) -> Any:
        if mode not in ("encode_key", "encode_value", "decode"):
            raise ValueError(f"unknown mode {mode!r}; use encode_key, encode_value or decode")
        return getattr(self, mode)(*args, **kwargs)


class STCNValueEncoder(ValueResNet):
    """Value ResNet + ``fuser`` over cat(layer3 feature, key f16)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.value_in_channels, config.value_widths, config.value_bias)
        f16_dim = config.key_feature_dims[0]
        self.fuser = FeatureFusionBlock(
            config.value_widths[2] + f16_dim, config.value_dim, config.value_dim, config.cbam_reduction
        )

    def encode(self, image: Tensor, f16: Tensor, masks: Tensor, others: Tensor) -> Tensor:
        x = value_encoder_input(image, masks, others)
        g = fold_objects(self.backbone, x)
        # STCN concatenates the object feature first, then the key feature.
        return self.fuser(torch.cat([g, expand_objects(f16, g.shape[1])], dim=2))


class STCNDecoder(nn.Module):
    """``compress`` (upstream) or ``fuser`` (the correspondence paper's release) at 1/16, then two upsampling steps."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        f16_dim, f8_dim, f4_dim = config.key_feature_dims
        d16, d8, d4 = config.decoder_dims
        self.fuses_f16 = config.decoder_style == "corr"
        if self.fuses_f16:
            self.fuser = FeatureFusionBlock(f16_dim + config.value_dim, d16, d16, config.cbam_reduction)
        else:
            self.compress = ResBlock(2 * config.value_dim, d16)
        self.up_16_8 = UpsampleBlock(f8_dim, d16, d8)
        self.up_8_4 = UpsampleBlock(f4_dim, d8, d4)
        self.pred = nn.Conv2d(d4, 1, 3, padding=1)

    def forward(self, f8: Tensor, f4: Tensor, x: Tensor) -> Tensor:
        g16 = self.fuser(x) if self.fuses_f16 else self.compress(x)
        g4 = self.up_8_4(f4, self.up_16_8(f8, g16))
        return upsample_logits(predict_logits(self.pred, g4))


class STCN(MatchingNetwork):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "stcn" or config.hidden_dim != 0:
            raise ValueError("STCN needs a config with arch='stcn' and hidden_dim=0")
        self.config = config
        f16_dim = config.key_feature_dims[0]
        self.key_encoder = build_key_encoder(config.key_backbone)
        self.value_encoder = STCNValueEncoder(config)
        self.key_proj = KeyProjection(f16_dim, config.key_dim, xmem_terms=False)
        # key_comp turns the query frame's f16 into the skip path concatenated with the readout; the
        # correspondence paper's decoder takes f16 itself.
        self.key_comp = nn.Conv2d(f16_dim, config.value_dim, 3, padding=1) if config.decoder_style == "stcn" else None
        self.decoder = STCNDecoder(config)

    def encode_value(
        self,
        image: Tensor,
        feats: KeyFeatures,
        hidden: Tensor | None,
        masks: Tensor,
        others: Tensor,
        deep_update: bool = True,
    ) -> tuple[Tensor, None]:
        """-> value ``(B, K, Cv, h, w)`` and None (STCN has no hidden state)."""
        return self.value_encoder.encode(image, feats.f16, masks, others), None

    def decode(
        self,
        feats: KeyFeatures,
        readout: Tensor,
        hidden: Tensor | None = None,
        update_hidden: bool = True,
    ) -> tuple[None, Tensor]:
        """``readout`` ``(B, K, Cv, h, w)`` -> (None, logits ``(B, K, H, W)``)."""
        if self.key_comp is None:  # the correspondence paper's order: query f16 first
            x = torch.cat([expand_objects(feats.f16, readout.shape[1]), readout], dim=2)
        else:
            x = torch.cat([readout, expand_objects(self.key_comp(feats.f16), readout.shape[1])], dim=2)
        return None, self.decoder(feats.f8, feats.f4, x)
