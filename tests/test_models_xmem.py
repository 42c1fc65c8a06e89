"""XMem network: upstream key/shape compatibility, small-variant budget, interface, sensory memory."""
import json
from pathlib import Path

import pytest
import torch

from corrvos.models.checkpoint import build_model, model_from_config
from corrvos.models.config import get_config
from corrvos.models.xmem import XMem, gated_hidden_update

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FP16_BUDGET = 16 * 2**20




def test_xmem_state_dict_equals_upstream_keys_and_shapes():
    with torch.device("meta"):
        model = model_from_config(get_config("xmem"))
    expected = json.loads((FIXTURES / "xmem_state_dict_shapes.json").read_text())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert got == expected
    assert len(got) == 412
    assert sum(p.numel() for p in model.parameters()) == 62_185_224  # reference-models.md 2.8


def test_xmem_no_sensory_layout():
    with torch.device("meta"):
        model = model_from_config(get_config("xmem").replace(hidden_dim=0))
    keys = set(model.state_dict())
    assert not any("hidden_" in k for k in keys)
    assert model.decoder.fuser.block1.conv1.weight.shape[1] == 1536


def test_xmem_small_fits_16_mib_in_fp16():
    model = build_model("xmem-s")
    fp16_bytes = sum(v.numel() * 2 for v in model.state_dict().values() if v.is_floating_point())
    assert fp16_bytes <= FP16_BUDGET
    full_keys = set(json.loads((FIXTURES / "xmem_state_dict_shapes.json").read_text()))
    assert {k for k in full_keys ^ set(model.state_dict()) if not k.startswith("key_encoder.")} == set()


@pytest.mark.parametrize("name", ["xmem-s", "xmem"])
def test_xmem_interface_shapes(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    cfg = model.config
    image = torch.randn(1, 3, 64, 64)
    masks = torch.rand(1, 2, 64, 64)
    others = masks.flip(1)
    with torch.no_grad():
        feats = model.encode_key(image)
        c16, c8, c4 = cfg.key_feature_dims
        assert feats.key.shape == (1, cfg.key_dim, 4, 4)
        assert feats.shrinkage.shape == (1, 1, 4, 4) and (feats.shrinkage >= 1).all()
        assert feats.selection.shape == (1, cfg.key_dim, 4, 4)
        assert ((feats.selection >= 0) & (feats.selection <= 1)).all()  # sigmoid; may saturate in fp32
        assert (feats.f16.shape, feats.f8.shape, feats.f4.shape) == (
            (1, c16, 4, 4), (1, c8, 8, 8), (1, c4, 16, 16)
        )
        value, hidden = model.encode_value(image, feats, None, masks, others)
        assert value.shape == (1, 2, cfg.value_dim, 4, 4)
        assert hidden.shape == (1, 2, cfg.hidden_dim, 4, 4)
        new_hidden, logits = model.decode(feats, value, hidden)
        assert logits.shape == (1, 2, 64, 64) and new_hidden.shape == hidden.shape
        assert torch.isfinite(logits).all() and not torch.equal(new_hidden, hidden)


def test_xmem_key_terms_can_be_skipped():
    model = build_model("xmem-s").eval()
    with torch.no_grad():
        feats = model.encode_key(torch.randn(1, 3, 32, 32), need_shrinkage=False, need_selection=False)
    assert feats.shrinkage is None and feats.selection is None


def test_xmem_hidden_state_update_switches():
    torch.manual_seed(4)
    model = build_model("xmem-s").eval()
    image = torch.randn(1, 3, 32, 32)
    masks = torch.rand(1, 2, 32, 32)
    hidden = torch.randn(1, 2, model.config.hidden_dim, 2, 2)
    with torch.no_grad():
        feats = model.encode_key(image)
        value, same = model.encode_value(image, feats, hidden, masks, masks, deep_update=False)
        assert same is hidden
        _, deep = model.encode_value(image, feats, hidden, masks, masks, deep_update=True)
        assert not torch.allclose(deep, hidden)
        kept, logits_kept = model.decode(feats, value, hidden, update_hidden=False)
        assert kept is hidden
        updated, logits = model.decode(feats, value, hidden, update_hidden=True)
        assert not torch.allclose(updated, hidden)
        torch.testing.assert_close(logits, logits_kept)  # the update does not feed back into this frame
        # hidden=None means a zero state.
        _, from_none = model.decode(feats, value, None)
        _, from_zero = model.decode(feats, value, torch.zeros_like(hidden))
        torch.testing.assert_close(from_none, from_zero)
        # The hidden state is an input of the decoder.
        assert not torch.allclose(from_zero, logits)


def test_xmem_objects_are_independent():
    torch.manual_seed(5)
    model = build_model("xmem-s").eval()
    image = torch.randn(1, 3, 32, 32)
    masks = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode_key(image)
        value, hidden = model.encode_value(image, feats, None, masks, 1 - masks)
        single, single_h = model.encode_value(image, feats, None, masks[:, 2:], 1 - masks[:, 2:])
        torch.testing.assert_close(value[:, 2:], single, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hidden[:, 2:], single_h, rtol=1e-4, atol=1e-5)
        h, logits = model.decode(feats, value, hidden)
        h1, logits1 = model.decode(feats, value[:, 2:], hidden[:, 2:])
        torch.testing.assert_close(logits[:, 2:], logits1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h[:, 2:], h1, rtol=1e-4, atol=1e-5)


def test_xmem_no_sensory_small_runs_without_hidden():
    model = model_from_config(get_config("xmem-s").replace(hidden_dim=0, name="xmem-s-nosens")).eval()
    assert model.value_encoder.hidden_reinforce is None and model.decoder.hidden_update is None
    image = torch.randn(1, 3, 32, 32)
    masks = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        feats = model.encode_key(image)
        value, hidden = model.encode_value(image, feats, None, masks, torch.zeros_like(masks))
        assert hidden is None
        hidden, logits = model.decode(feats, value, None)
    assert hidden is None and logits.shape == (1, 1, 32, 32)


def test_gated_hidden_update_formula():
    h = torch.randn(1, 1, 4, 2, 2)
    big = 30.0
    keep = torch.cat([torch.full_like(h, big), torch.full_like(h, -big), torch.zeros_like(h)], dim=2)
    torch.testing.assert_close(gated_hidden_update(keep, h), h, atol=1e-6, rtol=0)
    cand = torch.randn_like(h)
    replace = torch.cat([torch.zeros_like(h), torch.full_like(h, big), cand], dim=2)
    torch.testing.assert_close(gated_hidden_update(replace, h), torch.tanh(cand), atol=1e-6, rtol=0)
    # forget 0.5, update 0.5: 0.25 h + 0.5 tanh(n)
    half = torch.cat([torch.zeros_like(h), torch.zeros_like(h), cand], dim=2)
    torch.testing.assert_close(gated_hidden_update(half, h), 0.25 * h + 0.5 * torch.tanh(cand))


def test_xmem_training_backward_reaches_hidden_modules():
    torch.manual_seed(6)
    model = build_model("xmem-s").train()
    image = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 2, 32, 32)
    feats = model("encode_key", image)
    value, hidden = model("encode_value", image, feats, None, masks, masks.flip(1))
    hidden, logits = model("decode", feats, value, hidden)
    (logits.mean() + hidden.mean()).backward()
    assert model.value_encoder.hidden_reinforce.transform.weight.grad is not None
    assert model.decoder.hidden_update.transform.weight.grad is not None
    with pytest.raises(ValueError):
        XMem(get_config("stcn"))
