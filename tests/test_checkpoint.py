"""Checkpoint I/O: upstream .pth loading (plain, 4-channel, module.-prefixed, wrapped, no-sensory),
safetensors round trips, ImageNet init from the hub cache, and a clear CheckpointError for bad files."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision

from corrvos.errors import CheckpointError
from corrvos.models.backbones import ValueResNet
from corrvos.models.checkpoint import (
    build_model,
    checkpoint_metadata,
    infer_config,
    load_model,
    model_from_config,
    preferred_size,
    read_checkpoint,
    save_model,
)
from corrvos.models.config import get_config




def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so that a buffer that fails to load changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _outputs(model, seed: int = 0, size: int = 64, k: int = 2, layout=torch.contiguous_format) -> list[torch.Tensor]:
    # load_model returns channels-last weights on the CPU; compare in one layout so that the same
    # convolution kernels run and the outputs can be identical.
    model.to(memory_format=layout)
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, size, size, generator=g)
    masks = torch.rand(1, k, size, size, generator=g)
    with torch.no_grad():
        feats = model.encode_key(image)
        value, hidden = model.encode_value(image, feats, None, masks, masks.flip(1))
        hidden2, logits = model.decode(feats, value, hidden)
    outs = [feats.key, value, logits]
    outs += [t for t in (feats.shrinkage, feats.selection, hidden, hidden2) if t is not None]
    return outs


def _assert_same_outputs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _single_object_model(name: str, seed: int):
    """A random model whose 5th value-encoder input channel is zero, like a padded stage-0 model."""
    torch.manual_seed(seed)
    model = _randomize_bn(build_model(name), seed)
    with torch.no_grad():
        model.value_encoder.conv1.weight[:, 4] = 0
    return model


@pytest.mark.parametrize("name", ["stcn", "xmem"])
def test_full_size_upstream_pth_loads_with_inferred_config(tmp_path, name):
    torch.manual_seed(0)
    model = _randomize_bn(build_model(name))
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    path.unlink()
    assert not loaded.training
    tensors = list(loaded.state_dict().values())
    assert not any(t.is_meta for t in tensors) and all(t.dtype != torch.float16 for t in tensors)
    assert all(p.requires_grad for p in loaded.parameters())
    assert loaded.key_encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast = _outputs(loaded, layout=torch.channels_last)
    assert loaded.config == get_config(name) and loaded.config.name == name
    reference = _outputs(model)
    _assert_same_outputs(reference, _outputs(loaded))
    for x, y in zip(reference, fast):  # channels-last kernels: same result up to float rounding
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3 * float(x.abs().max()))


@pytest.mark.parametrize("name", ["stcn-s", "xmem-s"])
def test_upstream_variants_load_identically(tmp_path, name):
    model = _single_object_model(name, seed=1)
    sd = model.state_dict()
    reference = _outputs(model, size=32)

    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    four = tmp_path / "stage0.pth"
    torch.save({**sd, "value_encoder.conv1.weight": sd["value_encoder.conv1.weight"][:, :4].clone()}, four)
    prefixed = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, prefixed)
    wrapped = tmp_path / f"{name}_checkpoint.pth"
    # As upstream trainers write *_checkpoint.pth (a MultiStepLR state holds a Counter).
    trainer_state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"milestones": Counter({10: 1})}}
    torch.save({"it": 1000, "network": sd, **trainer_state}, wrapped)
    no_counters = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, no_counters)

    for path in (plain, four, prefixed, wrapped, no_counters):
        loaded = load_model(path)
        assert loaded.config == get_config(name), path.name
        _assert_same_outputs(reference, _outputs(loaded, size=32))
    assert torch.count_nonzero(load_model(four).value_encoder.conv1.weight[:, 4]) == 0


def test_four_channel_pad_can_be_orthogonal_for_fine_tuning(tmp_path):
    model = _single_object_model("stcn-s", seed=2)
    sd = model.state_dict()
    path = tmp_path / "stage0.pth"
    torch.save({**sd, "value_encoder.conv1.weight": sd["value_encoder.conv1.weight"][:, :4].clone()}, path)
    padded, config, _ = read_checkpoint(path, pad="orthogonal")
    extra = padded["value_encoder.conv1.weight"][:, 4].flatten(1)
    assert extra.shape == (32, 49)
    torch.testing.assert_close(extra @ extra.T, torch.eye(32), atol=1e-4, rtol=0)  # orthonormal rows
    assert config.value_in_channels == 5


def test_xmem_no_sensory_checkpoint_is_recognised(tmp_path):
    torch.manual_seed(3)
    model = _randomize_bn(model_from_config(get_config("xmem-s").replace(hidden_dim=0, name="nosens")))
    path = tmp_path / "XMem-no-sensory.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.config.hidden_dim == 0 and loaded.decoder.hidden_update is None
    _assert_same_outputs(_outputs(model), _outputs(loaded))
    # The full-size layout is inferred from shapes alone (no weights needed): decoder fuser takes 1536 ch.
    with torch.device("meta"):
        full = model_from_config(get_config("xmem").replace(hidden_dim=0))
    config = infer_config(full.state_dict())
    assert config.name == "xmem-no-sensory" and config.hidden_dim == 0
    assert config.key_backbone == "resnet50" and config.value_dim == 512


@pytest.mark.parametrize("name", ["stcn-s", "xmem-s"])
def test_safetensors_round_trip_fp32_and_fp16(tmp_path, name):
    torch.manual_seed(4)
    model = _randomize_bn(build_model(name))
    reference = _outputs(model)

    p32 = save_model(model, tmp_path / "m32.safetensors", extra_metadata={"iterations": 1234, "note": "test"})
    loaded = load_model(p32)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _assert_same_outputs(reference, _outputs(loaded))
    meta = checkpoint_metadata(p32)
    assert json.loads(meta["corrvos_config"]) == model.config.to_dict()
    assert meta["iterations"] == "1234" and meta["note"] == "test"

    p16 = save_model(model, tmp_path / "m16.safetensors", dtype=torch.float16)
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    half = load_model(p16)
    for key, value in model.state_dict().items():
        got = half.state_dict()[key]
        if value.is_floating_point():
            assert got.dtype == torch.float32, key
            assert torch.equal(got, value.half().float()), key
        else:
            assert torch.equal(got, value), key
    # Readable like any new file under the umask (safetensors alone would make it 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert p16.stat().st_mode & 0o777 == 0o666 & ~umask
    # Atomic write: no temporary files are left next to the checkpoints.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m16.safetensors", "m32.safetensors"]


def test_preferred_size_follows_the_training_crop(tmp_path):
    # The upstream ratio 480p inference / 384 crops carried over to other crops; explicit metadata wins.
    assert preferred_size({}) == 480
    assert preferred_size({"train_options": json.dumps({"crop": 192})}) == 240
    assert preferred_size({"train_options": json.dumps({"crop": 384})}) == 480
    assert preferred_size({"train_options": json.dumps({"crop": 200})}) == 256  # 250 -> nearest multiple of 16
    assert preferred_size({"train_options": json.dumps({"crop": None})}) == 480
    assert preferred_size({"train_options": "not json"}) == 480
    assert preferred_size({"processing_size": "320", "train_options": json.dumps({"crop": 192})}) == 320
    path = save_model(build_model("stcn-s"), tmp_path / "m.safetensors", dtype=torch.float16,
                      extra_metadata={"train_options": {"crop": 192, "batch": 4}})
    assert load_model(path).preferred_size == 240
    assert build_model("stcn-s").preferred_size == 480


def test_small_variant_fp16_files_are_at_most_16_mib(tmp_path):
    for name in ("stcn-s", "xmem-s"):
        path = save_model(build_model(name), tmp_path / f"{name}.safetensors", dtype=torch.float16)
        assert path.stat().st_size <= 16 * 2**20, name


def test_missing_file_says_it_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")


def test_truncated_files_are_reported_as_truncated(tmp_path):
    model = build_model("stcn-s")
    full_pth = tmp_path / "full.pth"
    torch.save(model.state_dict(), full_pth)
    full_st = save_model(model, tmp_path / "full.safetensors")
    for full in (full_pth, full_st):
        data = full.read_bytes()
        for cut in (len(data) // 2, len(data) - 10):
            cut_path = tmp_path / f"cut_{cut}{full.suffix}"
            cut_path.write_bytes(data[:cut])
            with pytest.raises(CheckpointError, match="is truncated") as err:
                load_model(cut_path)
            assert cut_path.name in str(err.value)
            cut_path.unlink()


def test_metadata_reads_the_header_only_with_the_same_checks(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_model(build_model("stcn-s"), tmp_path / "m.safetensors", extra_metadata={"note": "x"})

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("checkpoint_metadata loaded the tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    assert checkpoint_metadata(path)["note"] == "x"
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated"):
        checkpoint_metadata(cut)
    header_len = int.from_bytes(data[:8], "little")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[:9] + b"\xff" * (header_len - 1) + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        checkpoint_metadata(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_metadata(tmp_path / "nope.safetensors")


def test_random_bytes_and_empty_files_are_rejected(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" + os.urandom(4096))
    with pytest.raises(CheckpointError, match="neither a PyTorch"):
        load_model(junk)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="folder"):
        load_model(tmp_path)


def test_wrongly_shaped_and_missing_tensors_are_named(tmp_path):
    sd = build_model("stcn-s").state_dict()
    bad = dict(sd)
    bad["key_comp.weight"] = torch.zeros(7, 256, 3, 3)
    path = tmp_path / "checkpoint.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert msg.startswith("checkpoint.pth does not match the stcn architecture: wrong shapes key_comp.weight (7, 256, 3, 3)")
    assert msg.count(".") >= 1 and "\n" not in msg

    missing = {k: v for k, v in sd.items() if not k.startswith("decoder.up_8_4.")}
    missing["decoder.extra.weight"] = torch.zeros(1)
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.up_8_4\.\S+, \S+, \S+ \(and 3 more\); unexpected keys decoder\.extra\.weight"):
        load_model(path)


def test_non_vos_state_dicts_and_non_state_dicts_are_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match="not an STCN or XMem checkpoint"):
        load_model(path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="does not contain a model state_dict"):
        load_model(path)


class _Payload:
    """Unpickling this would create a file: proof of code execution."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_arbitrary_object_is_refused_without_running_it(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"key_proj.key_proj.weight": torch.zeros(1), "x": payload}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects other than tensors"):
        load_model(path)
    assert not payload.marker.exists()


def test_imagenet_init_reads_the_hub_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not in the torch hub cache"):
        build_model("stcn-s", imagenet=True)
    # A stand-in for torchvision's file (random weights) at the cache path it would be saved to.
    torch.manual_seed(5)
    fake = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("stcn-s", imagenet=True)
    assert torch.equal(model.key_encoder.conv1.weight, fake["conv1.weight"])
    assert torch.equal(model.key_encoder.res2[1].conv2.weight, fake["layer1.1.conv2.weight"])
    assert torch.equal(model.key_encoder.layer3[0].bn1.running_var, fake["layer3.0.bn1.running_var"])
    # Value encoder: narrow small-variant stages do not fit ResNet-18 and keep their own init ...
    assert build_model("stcn-s").value_encoder.load_imagenet() == []
    # ... full-width ones take every ImageNet tensor; the RGB filters go into the 5-channel conv1.
    full_value = ValueResNet(5, (64, 128, 256), bias=True)
    mask_filters = full_value.conv1.weight[:, 3:].clone()
    loaded = full_value.load_imagenet()
    assert len(loaded) == len([k for k in fake if not k.startswith(("layer4.", "fc.")) and "num_batches" not in k])
    assert torch.equal(full_value.conv1.weight[:, :3], fake["conv1.weight"])
    assert torch.equal(full_value.conv1.weight[:, 3:], mask_filters)
    assert torch.count_nonzero(full_value.conv1.bias) == 0
    assert torch.equal(full_value.layer2[0].downsample[0].weight, fake["layer2.0.downsample.0.weight"])
