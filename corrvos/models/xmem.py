"""XMem (Cheng & Schwing, ECCV 2022) network: key encoder with shrinkage/selection, value encoder
with hidden-state reinforcement, decoder with the sensory-memory (hidden state) update.

As for STCN, the memory read lives outside the network (``corrvos.models.similarity``). With the
"xmem" preset the state_dict keys and shapes equal the released ``XMem.pth``; ``hidden_dim = 0``
gives the ``XMem-no-sensory`` layout (no ``hidden_*`` modules).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.models.backbones import ValueResNet, build_key_encoder
from corrvos.models.blocks import FeatureFusionBlock, KeyProjection, UpsampleBlock, expand_objects, fold_objects
from corrvos.models.config import ModelConfig
from corrvos.models.stcn import KeyFeatures, MatchingNetwork, predict_logits, upsample_logits, value_encoder_input


def gated_hidden_update(gates: Tensor, hidden: Tensor) -> Tensor:
    """XMem's hidden update from ``3 * C`` gate channels: ``f * h * (1 - u) + u * n``.

    f = sigmoid(forget), u = sigmoid(update), n = tanh(candidate). Upstream notes this is
    deliberately not the textbook GRU; the released weights were trained with exactly this form.
    """
    c = hidden.shape[2]
    forget = torch.sigmoid(gates[:, :, :c])
    update = torch.sigmoid(gates[:, :, c : 2 * c])
    candidate = torch.tanh(gates[:, :, 2 * c :])
    return forget * hidden * (1 - update) + update * candidate


class HiddenReinforcer(nn.Module):
    """Deep update: refresh the hidden state from a new memory value."""

    def __init__(self, value_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.transform = nn.Conv2d(value_dim + hidden_dim, 3 * hidden_dim, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, value: Tensor, hidden: Tensor) -> Tensor:
        gates = fold_objects(self.transform, torch.cat([value, hidden], dim=2))
        return gated_hidden_update(gates, hidden)


def _area_down(x: Tensor, factor: float) -> Tensor:
    return fold_objects(lambda t: F.interpolate(t, scale_factor=factor, mode="area"), x)


class HiddenUpdater(nn.Module):
    """Per-frame hidden update from the decoder features at 1/16, 1/8 and 1/4 (+ the logit)."""

    def __init__(self, in_dims: tuple[int, int, int], mid_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.g16_conv = nn.Conv2d(in_dims[0], mid_dim, 1)
        self.g8_conv = nn.Conv2d(in_dims[1], mid_dim, 1)
        self.g4_conv = nn.Conv2d(in_dims[2], mid_dim, 1)
        self.transform = nn.Conv2d(mid_dim + hidden_dim, 3 * hidden_dim, 3, padding=1)
        nn.init.xavier_normal_(self.transform.weight)

    def forward(self, g16: Tensor, g8: Tensor, g4: Tensor, hidden: Tensor) -> Tensor:
        g = (
            fold_objects(self.g16_conv, g16)
            + fold_objects(self.g8_conv, _area_down(g8, 0.5))
            + fold_objects(self.g4_conv, _area_down(g4, 0.25))
        )
        gates = fold_objects(self.transform, torch.cat([g, hidden], dim=2))
        return gated_hidden_update(gates, hidden)


class XMemValueEncoder(ValueResNet):
    """Value ResNet + ``fuser`` over cat(key f16, layer3 feature) + optional ``hidden_reinforce``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.value_in_channels, config.value_widths, config.value_bias)
        f16_dim = config.key_feature_dims[0]
        self.fuser = FeatureFusionBlock(
            f16_dim + config.value_widths[2], config.value_dim, config.value_dim, config.cbam_reduction
        )
        self.hidden_reinforce = (
            HiddenReinforcer(config.value_dim, config.hidden_dim) if config.hidden_dim > 0 else None
        )

    def encode(self, image: Tensor, f16: Tensor, masks: Tensor, others: Tensor) -> Tensor:
        g = fold_objects(self.backbone, value_encoder_input(image, masks, others))
        # XMem puts the image-level feature first.
        return self.fuser(torch.cat([expand_objects(f16, g.shape[1]), g], dim=2))


class XMemDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        f16_dim, f8_dim, f4_dim = config.key_feature_dims
        d16, d8, d4 = config.decoder_dims
        self.hidden_dim = config.hidden_dim
        self.fuser = FeatureFusionBlock(
            f16_dim + config.value_dim + config.hidden_dim, d16, d16, config.cbam_reduction
        )
        self.hidden_update = (
            HiddenUpdater((d16, d8, d4 + 1), config.hidden_mid_dim, config.hidden_dim)
            if config.hidden_dim > 0
            else None
        )
        self.up_16_8 = UpsampleBlock(f8_dim, d16, d8)
        self.up_8_4 = UpsampleBlock(f4_dim, d8, d4)
        self.pred = nn.Conv2d(d4, 1, 3, padding=1)

    def forward(
        self, feats: KeyFeatures, readout: Tensor, hidden: Tensor | None, update_hidden: bool
    ) -> tuple[Tensor | None, Tensor]:
        parts = [expand_objects(feats.f16, readout.shape[1]), readout]
        if self.hidden_update is not None:
            parts.append(hidden)
        g16 = self.fuser(torch.cat(parts, dim=2))
        g8 = self.up_16_8(feats.f8, g16)
        g4 = self.up_8_4(feats.f4, g8)
        logits = predict_logits(self.pred, g4)
        if update_hidden and self.hidden_update is not None:
            hidden = self.hidden_update(g16, g8, torch.cat([g4, logits], dim=2), hidden)
        return hidden, upsample_logits(logits)


class XMem(MatchingNetwork):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "xmem":
            raise ValueError("XMem needs a config with arch='xmem'")
        self.config = config
        f16_dim = config.key_feature_dims[0]
        self.key_encoder = build_key_encoder(config.key_backbone)
        self.value_encoder = XMemValueEncoder(config)
        self.key_proj = KeyProjection(f16_dim, config.key_dim, xmem_terms=True)
        self.decoder = XMemDecoder(config)

    def _hidden_or_zeros(self, hidden: Tensor | None, like: Tensor) -> Tensor | None:
        """``like`` is a ``(B, K, C, h, w)`` group tensor at stride 16."""
        if self.config.hidden_dim == 0:
            return None
        if hidden is None:
            b, k, _, h, w = like.shape
            return like.new_zeros(b, k, self.config.hidden_dim, h, w)
        return hidden

    def encode_value(
        self,
        image: Tensor,
        feats: KeyFeatures,
        hidden: Tensor | None,
        masks: Tensor,
        others: Tensor,
        deep_update: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """-> value ``(B, K, Cv, h, w)`` and the hidden state ``(B, K, Ch, h, w)`` (None without sensory memory).

        With ``deep_update`` the hidden state is refreshed from the new value; otherwise it is returned
        unchanged. ``hidden=None`` means a zero state.
        """
        value = self.value_encoder.encode(image, feats.f16, masks, others)
        hidden = self._hidden_or_zeros(hidden, value)
        if deep_update and self.value_encoder.hidden_reinforce is not None:
            hidden = self.value_encoder.hidden_reinforce(value, hidden)
        return value, hidden

    def decode(
        self,
        feats: KeyFeatures,
        readout: Tensor,
        hidden: Tensor | None = None,
        update_hidden: bool = True,
    ) -> tuple[Tensor | None, Tensor]:
        """``readout`` ``(B, K, Cv, h, w)`` -> (hidden state, logits ``(B, K, H, W)``).

        The hidden state is updated when ``update_hidden`` is true and returned unchanged otherwise
        (None without sensory memory). ``hidden=None`` means a zero state.
        """
        hidden = self._hidden_or_zeros(hidden, readout)
        return self.decoder(feats, readout, hidden, update_hidden)
