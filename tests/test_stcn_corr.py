"""The correspondence paper's released STCN (wenguanwang/VOS_Correspondence): its key layout loads strictly,
``key_proj2`` is dropped with a note, and the Tracker's probabilities equal a plain re-statement of the paper's
evaluation network (model/eval_network.py + model/network.py Decoder), written here with torch.nn.functional
on the raw state_dict, independently of corrvos's modules."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corrvos.errors import CheckpointError
from corrvos.imageops import normalize, to_float_image
from corrvos.inference.tracker import Tracker
from corrvos.models.checkpoint import build_model, load_model, save_model



@pytest.fixture(scope="module")
def paper_state_dict():
    """Random weights in the paper's layout: our stcn-corr network plus a key_proj2 head, BN statistics random."""
    torch.manual_seed(0)
    net = build_model("stcn-corr")
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    # Random un-normalised ResBlocks blow activations up to ~1e2 and make the network chaotic (its fp32 and fp64
    # outputs differ by 0.1); scaled down it is well conditioned (fp32 vs fp64 ~4e-6), so 1e-4 tests the algorithm.
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.Conv2d) and (name.startswith("decoder") or ".fuser" in name):
                m.weight.mul_(0.5)
        net.key_proj.key_proj.weight.mul_(0.1)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["key_proj2.key_proj.weight"] = torch.randn(64, 1024, 3, 3, generator=g) * 0.01
    sd["key_proj2.key_proj.bias"] = torch.zeros(64)
    return sd


def test_layout_is_the_papers(paper_state_dict):
    keys = set(paper_state_dict)
    assert "decoder.fuser.block1.conv1.weight" in keys and "key_comp.weight" not in keys
    assert not any(k.startswith("decoder.compress.") for k in keys)
    assert tuple(paper_state_dict["decoder.fuser.block1.conv1.weight"].shape) == (512, 1536, 3, 3)
    assert tuple(paper_state_dict["decoder.fuser.block1.downsample.weight"].shape) == (512, 1536, 3, 3)


def test_paper_file_loads_strictly_with_a_note_for_key_proj2(tmp_path, paper_state_dict):
    path = tmp_path / "paper.pth"
    torch.save(paper_state_dict, path)
    with pytest.warns(UserWarning, match=r"dropped key_proj2 \(2 tensors\).*training-only"):
        model = load_model(path)
    assert model.config.name == "stcn-corr" and model.config.decoder_style == "corr"
    assert model.key_comp is None
    # Round trip through our format keeps the architecture (and no key_proj2).
    again = load_model(save_model(model, tmp_path / "paper.safetensors"))
    assert again.config == model.config
    # Strict: a missing decoder tensor is named, not silently ignored.
    broken = {k: v for k, v in paper_state_dict.items() if k != "decoder.fuser.block2.conv2.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="decoder.fuser.block2.conv2.weight"):
            load_model(tmp_path / "broken.pth")


def test_four_channel_value_encoder_is_padded_as_upstream_stage0(tmp_path, paper_state_dict):
    sd = dict(paper_state_dict)
    sd["value_encoder.conv1.weight"] = sd["value_encoder.conv1.weight"][:, :4].clone()
    torch.save(sd, tmp_path / "s0.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(tmp_path / "s0.pth")
    w = model.value_encoder.conv1.weight
    assert w.shape[1] == 5 and torch.count_nonzero(w[:, 4]) == 0
    assert torch.equal(w[:, :4].contiguous(), sd["value_encoder.conv1.weight"])


# ------------------------------------------------------------------ the paper's evaluation network, restated

def _conv(sd, name, x, padding=1, stride=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride=stride, padding=padding)


def _bn(sd, name, x):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-5)


def _resblock(sd, name, x):
    r = _conv(sd, f"{name}.conv1", F.relu(x))
    r = _conv(sd, f"{name}.conv2", F.relu(r))
    if f"{name}.downsample.weight" in sd:
        x = _conv(sd, f"{name}.downsample", x)
    return x + r


def _cbam(sd, name, x):
    def mlp(v):
        v = F.linear(v, sd[f"{name}.ChannelGate.mlp.1.weight"], sd[f"{name}.ChannelGate.mlp.1.bias"])
        return F.linear(F.relu(v), sd[f"{name}.ChannelGate.mlp.3.weight"], sd[f"{name}.ChannelGate.mlp.3.bias"])
    att = mlp(x.mean((2, 3))) + mlp(x.amax((2, 3)))
    x = x * torch.sigmoid(att)[:, :, None, None]
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    return x * torch.sigmoid(_conv(sd, f"{name}.SpatialGate.spatial.conv", pooled, padding=3))


def _fusion(sd, name, a, b):
    x = _resblock(sd, f"{name}.block1", torch.cat([a, b], 1))
    return _resblock(sd, f"{name}.block2", x + _cbam(sd, f"{name}.attention", x))


def _resnet_stages(sd, prefix, x, first, bottleneck):
    """conv1 -> bn1 -> relu -> maxpool -> three stages (ResNet-50 bottlenecks or ResNet-18 basic blocks)."""
    x = F.max_pool2d(F.relu(_bn(sd, f"{prefix}.bn1", _conv(sd, f"{prefix}.conv1", x, padding=3, stride=2))), 3, 2, 1)
    outs = []
    for stage in (first, "layer2", "layer3"):
        b = 0
        while f"{prefix}.{stage}.{b}.conv1.weight" in sd:
            n = f"{prefix}.{stage}.{b}"
            stride = 2 if b == 0 and stage != first else 1
            if bottleneck:
                y = F.relu(_bn(sd, f"{n}.bn1", _conv(sd, f"{n}.conv1", x, padding=0)))
                y = F.relu(_bn(sd, f"{n}.bn2", _conv(sd, f"{n}.conv2", y, stride=stride)))
                y = _bn(sd, f"{n}.bn3", _conv(sd, f"{n}.conv3", y, padding=0))
            else:
                y = F.relu(_bn(sd, f"{n}.bn1", _conv(sd, f"{n}.conv1", x, stride=stride)))
                y = _bn(sd, f"{n}.bn2", _conv(sd, f"{n}.conv2", y))
            if f"{n}.downsample.0.weight" in sd:
                x = _bn(sd, f"{n}.downsample.1", _conv(sd, f"{n}.downsample.0", x, padding=0, stride=stride))
            x = F.relu(x + y)
            b += 1
        outs.append(x)
    return outs  # f4, f8, f16


def _encode_key(sd, img):
    f4, f8, f16 = _resnet_stages(sd, "key_encoder", img, "res2", bottleneck=True)
    return _conv(sd, "key_proj.key_proj", f16), f16, f8, f4


def _encode_value(sd, img, f16, masks):
    k = masks.shape[0]
    others = torch.stack([masks[[j for j in range(k) if j != i]].sum(0) for i in range(k)]) if k > 1 \
        else torch.zeros_like(masks)
    x = torch.cat([img.expand(k, -1, -1, -1), masks[:, None], others[:, None]], 1)
    g16 = _resnet_stages(sd, "value_encoder", x, "layer1", bottleneck=False)[2]
    return _fusion(sd, "value_encoder.fuser", g16, f16.expand(k, -1, -1, -1))


def _decode(sd, readout, f16, f8, f4):
    x = _fusion(sd, "decoder.fuser", f16.expand(readout.shape[0], -1, -1, -1), readout)
    for name, skip in (("decoder.up_16_8", f8), ("decoder.up_8_4", f4)):
        x = _conv(sd, f"{name}.skip_conv", skip) + F.interpolate(x, scale_factor=2, mode="bilinear",
                                                                  align_corners=False)
        x = _resblock(sd, f"{name}.out_conv", x)
    x = _conv(sd, "decoder.pred", F.relu(x))
    return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)[:, 0]


def _aggregate(prob):
    p = torch.cat([torch.prod(1 - prob, 0, keepdim=True), prob], 0).clamp(1e-7, 1 - 1e-7)
    return torch.softmax(torch.log(p / (1 - p)), 0)


@torch.no_grad()
def _paper_eval(sd, frames, first_mask, top_k=20):
    """STCN's evaluation loop as the paper runs it: memory every frame here (mem_every=1), top-k readout."""
    ids = sorted(int(v) for v in np.unique(first_mask) if v)
    imgs = [normalize(to_float_image(f)).unsqueeze(0) for f in frames]
    masks = torch.stack([torch.from_numpy(first_mask == i).float() for i in ids])
    prob = _aggregate(masks)
    keys, values, outs = [], [], [prob]
    k0, f16, _, _ = _encode_key(sd, imgs[0])
    keys.append(k0)
    values.append(_encode_value(sd, imgs[0], f16, prob[1:]))
    for t in range(1, len(frames)):
        qk, f16, f8, f4 = _encode_key(sd, imgs[t])
        mk = torch.cat([k.flatten(2) for k in keys], 2)[0]  # (C, N)
        mv = torch.cat([v.flatten(2) for v in values], 2)  # (K, Cv, N)
        q = qk.flatten(2)[0]
        aff = (2 * mk.t() @ q - mk.pow(2).sum(0)[:, None]) / math.sqrt(mk.shape[0])  # (N, HW)
        vals, idx = aff.topk(min(top_k, aff.shape[0]), dim=0)
        w = torch.exp(vals - vals.amax(0, keepdim=True))
        w = torch.zeros_like(aff).scatter_(0, idx, w / w.sum(0, keepdim=True))
        readout = (mv @ w).view(mv.shape[0], mv.shape[1], *qk.shape[-2:])
        prob = _aggregate(torch.sigmoid(_decode(sd, readout, f16, f8, f4)))
        outs.append(prob)
        if t < len(frames) - 1:
            keys.append(qk)
            values.append(_encode_value(sd, imgs[t], f16, prob[1:]))
    return outs


@torch.no_grad()
def test_tracker_equals_the_papers_evaluation(paper_state_dict, tmp_path):
    torch.save(paper_state_dict, tmp_path / "paper.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(tmp_path / "paper.pth").to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    frames = [np.roll(base, 4 * t, axis=1) for t in range(4)]
    first = np.zeros((128, 128), np.uint8)
    first[20:70, 30:80] = 1
    first[80:120, 60:110] = 2
    sd = {k: v.float() for k, v in paper_state_dict.items()}
    expected = _paper_eval(sd, frames, first)
    tracker = Tracker(model, device="cpu", mem_every=1, top_k=20)
    got = [tracker.step(frames[0], first)] + [tracker.step(f, last=t == len(frames) - 1)
                                             for t, f in enumerate(frames[1:], start=1)]
    for t, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4, f"frame {t}"
    # A real test: the model does move the masks (the later frames are not the first mask again).
    assert (got[-1].argmax(0).numpy() != first).any()
