"""Trainer on two DAVIS-2016 train sequences with a tiny network and 64 px crops (CPU).

Covers: a 20-iteration run with both correspondence losses, exact resume (6 straight vs 3 + resume
+ 3), the forward passes of both architectures, learned vs frozen BN, the CLI's --help and argument wiring.
"""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corrvos.models.config import get_config

REPO = Path(__file__).resolve().parents[1]
SEQUENCES = ["bear", "boat"]
# A narrower stcn-s: the same classes and preset name (so the stage preset applies), a quarter of the widths.
TINY_STCN = get_config("stcn-s").replace(value_dim=32, value_widths=(16, 32, 64), decoder_dims=(32, 16, 16))
TINY_XMEM = get_config("xmem-s").replace(value_dim=32, value_widths=(16, 32, 64), decoder_dims=(32, 16, 16),
                                         hidden_dim=8, hidden_mid_dim=16)


@pytest.fixture(scope="module")
def proposals(davis2016_root, tmp_path_factory) -> Path:
    """A synthetic proposal cache (random boxes in the paper's size range) for the two sequences."""
    from corrvos.training.layouts import compact_keys
    from corrvos.training.proposals import save_proposals

    rng = np.random.default_rng(0)
    boxes = {}
    for key in compact_keys(davis2016_root, "train", SEQUENCES):
        side = rng.uniform(0.3, 0.8, size=(20, 2))
        x0 = rng.uniform(0, 1 - side)
        boxes[key] = np.concatenate([x0, x0 + side], axis=1)
    path = tmp_path_factory.mktemp("props") / "proposals.npz"
    save_proposals(path, boxes, {"synthetic": True})
    return path




def _options(root, out, proposals, **kw):
    from corrvos.training.trainer import TrainOptions

    base = dict(model=TINY_STCN, data=[str(root)], sequences=SEQUENCES, out=str(out), crop=64, batch=2, iters=20,
                workers=0, proposals=str(proposals), progress=False, log_every=1, save_every=0, seed=3)
    base.update(kw)
    return TrainOptions(**base)


def _log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_twenty_iterations_both_losses(davis2016_root, proposals, tmp_path):
    from corrvos import load_model
    from corrvos.training.trainer import Trainer

    trainer = Trainer(_options(davis2016_root, tmp_path, proposals, alpha_warmup=5, alpha_start=4, alpha_max=0.1))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    final = trainer.train()
    rows = _log(tmp_path)
    assert [int(r["iteration"]) for r in rows] == list(range(1, 21))
    for r in rows:
        for k in ("loss", "ce", "pcl", "ocl", "grad_norm"):
            assert np.isfinite(float(r[k])), (k, r)
    alphas = [float(r["alpha"]) for r in rows]
    assert alphas[:4] == [0.0] * 4 and any(0 < a < 0.1 for a in alphas) and alphas[-1] == pytest.approx(0.1)
    assert max(float(r["ocl_n"]) for r in rows) > 0  # OCL really had queries with negatives
    loaded = load_model(final)
    changed = [k for k, v in loaded.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("key_proj") for k in changed) and any(k.startswith("decoder") for k in changed)
    # From random weights (--bn auto) BN learns its statistics: every running mean moved.
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and not any(torch.equal(loaded.state_dict()[k].float(), before[k]) for k in bn)
    # --load starts a new run from these weights, with BN frozen (auto): statistics never move.
    again = Trainer(_options(davis2016_root, tmp_path / "next", proposals, load=str(final), iters=2, corr=frozenset()))
    assert again.bn_frozen
    start = {k: v.clone() for k, v in again.net.state_dict().items()}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in start.items())
    again.train()
    after = again.net.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in bn)
    assert not torch.equal(after["decoder.pred.weight"], start["decoder.pred.weight"])


def test_gradient_clipping(davis2016_root, proposals, tmp_path):
    from corrvos.training.trainer import Trainer

    def grad_norm(net):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))

    for clip in (0.0, 1e-3):
        trainer = Trainer(_options(davis2016_root, tmp_path / str(clip), proposals, iters=1, grad_clip=clip))
        trainer.forward_module.train()
        trainer._micro_step(next(iter(trainer._loader())), sync=True)
        before = grad_norm(trainer.net)
        logged = trainer._clip_gradients()
        torch.testing.assert_close(logged, before)  # the log shows the norm before clipping
        after = grad_norm(trainer.net)
        if clip:
            assert before > 10 * clip and after == pytest.approx(clip, rel=1e-3)
        else:
            assert after == before
    with pytest.raises(ValueError, match="grad-clip"):
        Trainer(_options(davis2016_root, tmp_path / "bad", proposals, grad_clip=-1.0))
    with pytest.raises(ValueError, match="alpha-max"):
        Trainer(_options(davis2016_root, tmp_path / "bad_alpha", proposals, alpha_max=-0.1))


def test_resume_continues_exactly(davis2016_root, proposals, tmp_path):
    from corrvos.training.trainer import Trainer, list_checkpoints

    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(_options(davis2016_root, straight, proposals, iters=6, save_every=3)).train()
    assert Trainer(_options(davis2016_root, split, proposals, iters=6, save_every=3)).train(stop_at=3) is None
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["ckpt_00000003.pt"]
    resumed = Trainer(_options(davis2016_root, split, proposals, iters=6, save_every=3, resume=True))
    assert resumed.iteration == 3
    resumed.train()
    a, b = _log(straight), _log(split)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for k in ra:
            if k != "it_per_s":
                assert ra[k] == rb[k], (ra["iteration"], k, ra[k], rb[k])
    wa = torch.load(list_checkpoints(straight / "checkpoints")[-1], weights_only=True)["model"]
    wb = torch.load(list_checkpoints(split / "checkpoints")[-1], weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_xmem_forward_and_losses_tiny():
    from corrvos import build_model
    from corrvos.training.forward import ClipForward
    from corrvos.training.losses import LossConfig, compute_losses

    torch.manual_seed(0)
    net = build_model(TINY_XMEM)
    b, t, k, s = 2, 8, 3, 64
    masks = (torch.rand(b, t, k, s, s) > 0.7).float()
    selector = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    masks = masks * selector[:, None, :, None, None]
    cls_gt = torch.where(masks.sum(2) > 0, masks.argmax(2) + 1, 0)
    rgb, view = torch.randn(b, t, 3, s, s), torch.randn(b, 3, s, s)
    out = ClipForward(net)(rgb, masks[:, 0], selector, view=view)
    assert len(out["logits"]) == 7 and out["keys"].shape == (b, t, 64, 4, 4)
    assert out["shrinkage"].shape == (b, t, 1, 4, 4) and out["view_key"].shape == (b, 64, 4, 4)
    # Batched with the clip or encoded alone, the view's key is the same (frozen BN: no batch statistics).
    net.eval()
    alone = ClipForward(net, view_scale=0.5).encode_view(view)
    assert alone.shape == (b, 64, 2, 2)
    joint = ClipForward(net).encode_keys(rgb, view)[1]
    torch.testing.assert_close(joint, net.encode_key(view).key, atol=1e-4, rtol=1e-4)
    net.train()
    batch = {"cls_gt": cls_gt, "selector": selector, "view2_theta": torch.eye(3)[:2].expand(b, 2, 3),
             "boxes": torch.tensor([[0.0, 0, 32, 32], [32, 32, 64, 64], [0, 32, 32, 64]]).expand(b, t, 3, 4),
             "num_boxes": torch.full((b, t), 3), "object_boxes": torch.full((b, t, 2, 4), -1.0),
             "object_box_ids": torch.full((b, 2), -1)}
    loss, stats = compute_losses(out, batch, LossConfig(dice=True, alpha_warmup=0), iteration=0)
    loss.backward()
    assert np.isfinite(loss.item()) and {"ce", "dice", "pcl", "ocl"} <= set(stats)
    assert next(net.key_proj.parameters()).grad is not None


def test_cli_help_and_script_path():
    out = subprocess.run([sys.executable, str(REPO / "corrvos" / "train.py"), "--help"], capture_output=True,
                         text=True, cwd="/", timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--data", "--stage", "--corr", "--iters", "--batch", "--out", "--resume", "--load",
                 "--imagenet", "--proposals", "--amp", "--accum", "--device", "--seed", "--no-cross-view",
                 "--negatives", "--ocl-objects"):
        assert flag in out.stdout


def test_cli_options_wiring():
    from corrvos.train import build_parser, options_from_args

    args = build_parser().parse_args(["--model", "xmem-s", "--data", "a", "b", "--repeats", "5", "1", "--out", "o",
                                      "--corr", "pcl", "--no-cross-view", "--negatives", "intra", "--accum", "2",
                                      "--bn", "train", "--bootstrap-p", "1.0", "--grad-clip", "20",
                                      "--alpha-start", "7", "--alpha-max", "0.05"])
    opts = options_from_args(args)
    assert (opts.alpha_start, opts.alpha_max) == (7, 0.05)
    assert options_from_args(build_parser().parse_args(["--model", "stcn", "--data", "a", "--out", "o"])).alpha_max == 0.2
    assert opts.bn == "train" and opts.bootstrap_p == 1.0 and opts.grad_clip == 20.0
    assert opts.corr == {"pcl"} and not opts.cross_view and opts.negatives == "intra" and opts.accum == 2
    assert opts.data == ["a", "b"] and opts.repeats == [5, 1]
    with pytest.raises(ValueError):
        options_from_args(build_parser().parse_args(["--model", "stcn", "--data", "a", "--out", "o", "--corr", "x"]))


def test_stage_presets():
    from corrvos.training.stages import get_stage

    stcn = get_stage("stcn", "main")
    assert (stcn.iters, stcn.lr, stcn.lr_drops, stcn.optimizer, stcn.frames) == (150_000, 1e-5, (125_000,), "adam", 3)
    xmem = get_stage("xmem", "main")
    assert (xmem.optimizer, xmem.weight_decay, xmem.frames, xmem.max_objects) == ("adamw", 0.05, 8, 3)
    short = stcn.with_iters(15_000)
    assert short.lr_drops == (12_500,) and short.bootstrap_scale == pytest.approx(0.1)
    for model in ("stcn-s", "xmem-s"):
        for stage in ("static", "main"):
            get_stage(model, stage)
    with pytest.raises(ValueError):
        get_stage("stcn", "bl30k")


def test_a_new_network_preset_needs_no_other_entry(monkeypatch):
    """Adding a preset to corrvos.models.config.PRESETS is enough: its schedules follow its size and architecture."""
    from corrvos.models import config as model_config
    from corrvos.training.stages import get_stage, schedule_family

    monkeypatch.setitem(model_config.PRESETS, "xmem-tiny-test", get_config("xmem-s").replace(name="xmem-tiny-test"))
    monkeypatch.setitem(model_config.PRESETS, "stcn-big-test", get_config("stcn").replace(name="stcn-big-test"))
    assert schedule_family("xmem-tiny-test") == "xmem-s" and schedule_family("stcn-big-test") == "stcn"
    assert get_stage("xmem-tiny-test", "main") == get_stage("xmem-s", "main")
    assert schedule_family("stcn-lite") == "stcn-s" and schedule_family("stcn-corr") == "stcn"
    from corrvos.train import MODELS

    assert {"stcn-lite", "xmem-lite", "stcn-corr", "stcn-s"} <= set(MODELS)


@pytest.mark.parametrize("name,changes", [
    # The correspondence paper's decoder (fuser over cat(f16, readout)), on a ResNet-18 key encoder to stay small.
    ("stcn-corr", dict(key_backbone="resnet18", value_dim=32, value_widths=(16, 32, 64), decoder_dims=(32, 16, 16))),
    ("stcn-lite", dict(key_backbone="efficientnet-lite0", value_dim=32, value_widths=(16, 32, 64),
                       decoder_dims=(32, 16, 16))),
])
def test_other_architectures_train_with_both_losses_and_encoder_bn(davis2016_root, proposals, tmp_path, name, changes):
    """--bn encoder keeps the key encoder's statistics and learns the rest's."""
    from corrvos.training.trainer import Trainer

    config = get_config(name).replace(**changes)
    trainer = Trainer(_options(davis2016_root, tmp_path, proposals, model=config, iters=2, alpha_warmup=0, bn="encoder"))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.train()
    rows = _log(tmp_path)
    assert all(np.isfinite(float(r[k])) and float(r[k]) > 0 for r in rows for k in ("ce", "pcl", "ocl"))
    after = trainer.net.state_dict()
    key_bn = [k for k in before if k.startswith("key_encoder.") and k.endswith("running_mean")]
    value_bn = [k for k in before if k.startswith("value_encoder.") and k.endswith("running_mean")]
    assert key_bn and all(torch.equal(after[k], before[k]) for k in key_bn)
    assert value_bn and not any(torch.equal(after[k], before[k]) for k in value_bn)
    assert not torch.equal(after["decoder.pred.weight"], before["decoder.pred.weight"])
