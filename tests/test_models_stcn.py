"""STCN network: upstream key/shape compatibility, small-variant budget, interface shapes, blocks."""
import json
from pathlib import Path

import pytest
import torch

from corrvos.models.blocks import CBAM, FeatureFusionBlock, ResBlock, UpsampleBlock
from corrvos.models.checkpoint import build_model, model_from_config
from corrvos.models.config import PRESETS, ModelConfig, get_config
from corrvos.models.stcn import STCN, KeyFeatures

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FP16_BUDGET = 16 * 2**20




def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _fp16_bytes(model: torch.nn.Module) -> int:
    return sum(v.numel() * 2 for v in model.state_dict().values() if v.is_floating_point())


def test_stcn_state_dict_equals_upstream_keys_and_shapes():
    with torch.device("meta"):
        model = model_from_config(get_config("stcn"))
    expected = json.loads((FIXTURES / "stcn_state_dict_shapes.json").read_text())
    got = _shapes(model)
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert got == expected
    assert len(got) == 405
    params = sum(p.numel() for p in model.parameters())
    assert params == 54_434_180  # reference-models.md 1.11


def test_stcn_small_fits_16_mib_in_fp16_and_keeps_the_layout():
    model = build_model("stcn-s")
    assert _fp16_bytes(model) <= FP16_BUDGET
    full_keys = set(json.loads((FIXTURES / "stcn_state_dict_shapes.json").read_text()))
    small_keys = set(model.state_dict())
    # Same classes and names: only the key encoder's ResNet depth/blocks differ.
    assert {k for k in full_keys ^ small_keys if not k.startswith("key_encoder.")} == set()


@pytest.mark.parametrize("name", ["stcn-s", "stcn"])
def test_stcn_interface_shapes(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    cfg = model.config
    image = torch.randn(1, 3, 64, 64)
    masks = torch.rand(1, 2, 64, 64)
    others = masks.flip(1)
    with torch.no_grad():
        feats = model.encode_key(image)
        assert isinstance(feats, KeyFeatures)
        c16, c8, c4 = cfg.key_feature_dims
        assert feats.key.shape == (1, cfg.key_dim, 4, 4)
        assert feats.shrinkage is None and feats.selection is None
        assert feats.f16.shape == (1, c16, 4, 4)
        assert feats.f8.shape == (1, c8, 8, 8)
        assert feats.f4.shape == (1, c4, 16, 16)
        value, hidden = model.encode_value(image, feats, None, masks, others)
        assert value.shape == (1, 2, cfg.value_dim, 4, 4) and hidden is None
        hidden, logits = model.decode(feats, value, None)
        assert hidden is None and logits.shape == (1, 2, 64, 64)
        assert torch.isfinite(logits).all()


def test_stcn_objects_are_encoded_and_decoded_independently():
    """Folding K into the batch must not mix objects: object 1 alone == object 1 in a pair."""
    torch.manual_seed(1)
    model = build_model("stcn-s").eval()
    image = torch.randn(2, 3, 32, 48)
    masks = torch.rand(2, 3, 32, 48)
    others = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        feats = model.encode_key(image)
        value, _ = model.encode_value(image, feats, None, masks, others)
        single, _ = model.encode_value(image, feats, None, masks[:, 1:2], others[:, 1:2])
        torch.testing.assert_close(value[:, 1:2], single, rtol=1e-4, atol=1e-5)
        _, logits = model.decode(feats, value)
        _, logits_single = model.decode(feats, value[:, 1:2])
        torch.testing.assert_close(logits[:, 1:2], logits_single, rtol=1e-4, atol=1e-5)
        # Batch items are independent too.
        _, logits_b1 = model.decode(KeyFeatures(*(t[1:] if t is not None else None for t in feats)), value[1:])
        torch.testing.assert_close(logits[1:], logits_b1, rtol=1e-4, atol=1e-5)
        # The mask channel matters (the value encoder really sees it).
        other_value, _ = model.encode_value(image, feats, None, 1 - masks, others)
        assert not torch.allclose(value, other_value)


def test_stcn_forward_dispatch_and_training_backward():
    torch.manual_seed(2)
    model = build_model("stcn-s").train()
    image = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 1, 32, 32)
    feats = model("encode_key", image)
    value, _ = model("encode_value", image, feats, None, masks, torch.zeros_like(masks))
    _, logits = model("decode", feats, value)
    logits.mean().backward()
    assert model.key_encoder.conv1.weight.grad is not None
    assert model.value_encoder.conv1.weight.grad is not None
    assert model.key_proj.key_proj.weight.grad is None  # the key is not used without a memory read
    with pytest.raises(ValueError, match="unknown mode"):
        model("segment", image)


def test_key_projection_init_is_orthogonal_with_zero_bias():
    model = build_model("stcn-s")
    w = model.key_proj.key_proj.weight.detach().flatten(1)
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-4, rtol=0)
    assert torch.count_nonzero(model.key_proj.key_proj.bias) == 0


def test_value_encoder_has_conv_bias_only_for_stcn():
    stcn = build_model("stcn-s")
    assert stcn.value_encoder.conv1.bias is not None
    assert stcn.value_encoder.layer2[0].downsample[0].bias is not None
    assert stcn.key_encoder.conv1.bias is None


def test_config_presets_round_trip_through_json():
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        restored = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert restored == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="hidden_dim"):
        ModelConfig(arch="stcn", hidden_dim=64)
    with pytest.raises(ValueError, match="unknown model"):
        get_config("stcn-xl")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"arch": "stcn", "colour": 3})
    with pytest.raises(ValueError):
        STCN(get_config("xmem"))


def test_group_blocks_equal_per_object_application():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 8, 8)
    skip = torch.randn(2, 8, 16, 16)
    for block in (ResBlock(16, 8), CBAM(16), FeatureFusionBlock(16, 16, 8)):
        out = block(x)
        for k in range(3):
            torch.testing.assert_close(out[:, k], block(x[:, k]), rtol=1e-5, atol=1e-6)
    up = UpsampleBlock(8, 16, 4)
    out = up(skip, x)
    assert out.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(out[:, 2:3], up(skip, x[:, 2:3]), rtol=1e-5, atol=1e-6)


def test_resblock_downsample_is_3x3_and_present_only_when_widths_differ():
    assert ResBlock(8, 8).downsample is None
    assert ResBlock(8, 4).downsample.kernel_size == (3, 3)


def test_cbam_attribute_names_and_gating_range():
    cbam = CBAM(32)
    keys = set(cbam.state_dict())
    assert keys == {
        "ChannelGate.mlp.1.weight", "ChannelGate.mlp.1.bias", "ChannelGate.mlp.3.weight",
        "ChannelGate.mlp.3.bias", "SpatialGate.spatial.conv.weight", "SpatialGate.spatial.conv.bias",
    }
    x = torch.rand(1, 32, 6, 6)
    y = cbam(x)
    # Both gates are sigmoids of a non-negative input: output within [0, x].
    assert (y >= 0).all() and (y <= x + 1e-6).all()
