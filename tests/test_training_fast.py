"""The cheap data pipeline and the shipped-checkpoint recipe (corrvos/training/{framestore,recipe}.py).

Covers: colour ops against torchvision, normalisation, label histograms and boxes, the decoded
frame store (same samples as reading the files, reuse, compact copy), --start-iteration and
fp16 snapshots in the trainer, the recipe's pair synchronisation and resume planning, and pack.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from corrvos.imageops import normalize, to_float_image
from corrvos.training import augment as A
from corrvos.training.datasets import ClipConfig, SampleKey, StaticClips, VideoClips
from corrvos.training.framestore import FrameStore
from corrvos.training.samples import apply_colors, candidate_objects, present_ids
from training_data_helpers import make_layout


def torchvision_colors(ops: A.ColorOps, image: torch.Tensor) -> torch.Tensor:
    """The reference: torchvision's functional ops in the drawn order, as the pipeline used before."""
    for name, f in zip(ops.order, ops.factors):
        image = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[name](image, f)
    if ops.grayscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0, 1)


@pytest.mark.parametrize("seed", range(6))
def test_color_ops_match_torchvision(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    image[:4] = 255  # saturated pixels: the per-op clamps matter there
    strong = A.sample_color(rng, 0.4, 0.4, 0.4, 0.1 if seed % 2 else 0.0, grayscale_p=0.5 if seed > 3 else 0.0)
    ops = (strong, A.sample_color(rng, 0.05, 0.05, 0.05, 0.0))
    ours = A.to_float_rgb(image)
    ref = to_float_image(image)
    for op in ops:
        ours = op(ours)
        ref = torchvision_colors(op, ref)
    atol = 2e-4 if "hue" in strong.order else 1e-5
    np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), atol=atol)


def test_apply_colors_is_normalised_like_imageops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    op = A.sample_color(rng, 0.1, 0.03, 0.03)
    ours = apply_colors([op], image)
    ref = normalize(torchvision_colors(op, to_float_image(image)))
    np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), atol=1e-5)
    plain = apply_colors([], image)
    np.testing.assert_allclose(plain, normalize(to_float_image(image)).permute(1, 2, 0).numpy(), atol=1e-5)


def test_label_histogram_and_boxes():
    labels = np.zeros((20, 30), np.uint8)
    labels[2:5, 3:9] = 1
    labels[10, 20] = 4
    assert present_ids(labels) == [1, 4]
    assert candidate_objects(labels, 2) == [1] and candidate_objects(labels, 1) == [1, 4]
    assert candidate_objects(labels, 0) == [1, 4]
    boxes = A.boxes_from_labels(labels, [1, 4, 7])
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5], [20, 10, 21, 11], [-1, -1, -1, -1]])


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("davis"), names=("a", "b"), n=10, davis=True)


def assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_store_gives_the_samples_of_the_files(davis_root, tmp_path, arch):
    store = FrameStore.open_or_build(davis_root, tmp_path / "store", progress=False)
    assert [s.name for s in store.sequences] == ["a", "b"] and len(store.sequences[0]) == 10
    assert store.rgb(0).shape == (10, 72, 112, 3) and store.labels(1).dtype == np.uint8
    cfg = ClipConfig.preset(arch, crop_size=48)
    files, decoded = VideoClips(davis_root, cfg, seed=5), VideoClips(store, cfg, seed=5)
    for key in (SampleKey(0, 3, 5), SampleKey(1, 9, 10)):
        assert_same_sample(files[key], decoded[key])
    static_cfg = ClipConfig.preset("stcn", max_objects=1, crop_size=48)
    s_files = StaticClips.from_video_layout(davis_root, config=static_cfg, seed=2)
    s_store = StaticClips.from_store(store, config=static_cfg, seed=2)
    assert len(s_files) == len(s_store) == 20
    for key in (SampleKey(0, 1, 5), SampleKey(13, 4, 5)):
        assert_same_sample(s_files[key], s_store[key])
    only_b = VideoClips(store, cfg, sequences=["b"], seed=5)
    assert [s.name for s in only_b.sequences] == ["b"]


def test_store_reuse_resume_and_pickling(davis_root, tmp_path):
    import pickle

    folder = tmp_path / "store"
    FrameStore.open_or_build(davis_root, folder, progress=False)
    stamp = (folder / "a.rgb.npy").stat().st_mtime_ns
    again = FrameStore.open_or_build(davis_root, folder, progress=False)
    assert (folder / "a.rgb.npy").stat().st_mtime_ns == stamp
    # An interrupted build (no index yet) keeps the sequences it finished.
    (folder / "index.json").unlink()
    FrameStore.open_or_build(davis_root, folder, progress=False)
    assert (folder / "a.rgb.npy").stat().st_mtime_ns == stamp
    # A different request decodes again.
    small = FrameStore.open_or_build(davis_root, folder, short_side=36, progress=False)
    assert small.rgb(0).shape == (10, 36, 56, 3) and set(np.unique(small.labels(0))) <= {0, 1, 2}
    clone = pickle.loads(pickle.dumps(again))
    assert clone._arrays == {} and np.array_equal(clone.labels(1)[3], np.asarray(again.labels(1)[3]))


def test_store_from_the_compact_copy(davis2016_root, tmp_path):
    from corrvos.errors import DatasetError

    store = FrameStore.open_or_build(davis2016_root, tmp_path / "s", sequences=["bear"], short_side=48,
                                     progress=False)
    seq = store.sequences[0]
    assert seq.name == "bear" and seq.keys[0] == "bear/00000" and len(seq) == store.rgb(0).shape[0] == 82
    assert store.rgb(0).shape[1:] == (48, 85, 3) and set(np.unique(store.labels(0))) == {0, 1}
    with pytest.raises(DatasetError):
        store.select(["nope"])


def test_pack_and_recipe_planning(davis2016_root, tmp_path):
    from safetensors.torch import save_file

    from corrvos.io.davis import read_annotation
    from corrvos.training.proposals import save_proposals
    from experiments.recipe import Arm, collect, pack, plan_arms

    props = tmp_path / "p.npz"
    save_proposals(props, {"bear/00000": np.array([[0.1, 0.1, 0.5, 0.5]])}, {"synthetic": True})
    out = tmp_path / "carry"
    pack(davis2016_root, props, out, sequences=["bear"])
    src = sorted((davis2016_root / "Annotations" / "480p" / "bear").glob("*.png"))
    assert len(list((out / "Annotations" / "480p" / "bear").glob("*.png"))) == len(src)
    assert np.array_equal(read_annotation(out / "Annotations" / "480p" / "bear" / src[5].name), read_annotation(src[5]))
    assert (out / "ImageSets" / "480p" / "train.txt").read_text() == "bear\n"
    assert (out / "videos" / "bear.mp4").is_file() and (out / "proposals.npz").is_file()

    # Resume planning from returned weights.
    carried = tmp_path / "resume"
    carried.mkdir()
    meta = {"stage": "main", "iterations": "50", "stage_iters": "70"}
    for name in ("stcn-s_baseline", "stcn-s_corr"):
        save_file({"w": torch.zeros(1)}, str(carried / f"{name}.safetensors"), metadata=meta)
    arms = plan_arms(["stcn-s"], {"stcn-s": (30, 70)}, carried)
    assert [a.start for a in arms] == [(1, 50), (1, 50)]
    with pytest.raises(ValueError):
        plan_arms(["stcn-s"], {"stcn-s": (30, 80)}, carried)

    # Pair synchronisation: both arms are returned at the latest point both reached.
    def snaps(arm: Arm, points):
        for p in points:
            f = tmp_path / f"{arm.name}_{p[0]}_{p[1]}.safetensors"
            f.write_bytes(f"{p}".encode())
            arm.snapshots[arm.normalise(p)] = f

    fast, slow = Arm("stcn-s", "baseline", (30, 70)), Arm("stcn-s", "corr", (30, 70))
    snaps(fast, [(0, 25), (0, 30), (1, 25), (1, 50)])
    snaps(slow, [(0, 25), (0, 30), (1, 25)])
    lone = Arm("xmem-s", "baseline", (10, 10))
    snaps(lone, [(0, 10)])
    from experiments.recipe import build_parser

    args = build_parser().parse_args(["run", "--data", str(out), "--out", str(tmp_path / "OUT"), "--seed", "1",
                                      "--budget-s", "10"])
    args.out.mkdir()
    summary = collect([fast, slow, lone, Arm("xmem-s", "corr", (10, 10))], args,
                      {"stcn-s": (30, 70), "xmem-s": (10, 10)}, 1, 0.0, 0.0, 0.0, 0, print)
    ret = {a["arm"]: a["returned"] for a in summary["arms"]}
    assert ret["stcn-s_baseline"]["iteration"] == ret["stcn-s_corr"]["iteration"] == 25
    assert ret["stcn-s_baseline"]["stage"] == "main" and not ret["stcn-s_corr"]["complete"]
    assert (args.out / "stcn-s_baseline.safetensors").read_bytes() == b"(1, 25)"
    assert ret["xmem-s_baseline"] is None and ret["xmem-s_corr"] is None  # its partner never got going
    assert json.loads((args.out / "summary.json").read_text())["arms"][0]["arm"] == "stcn-s_baseline"


def test_start_iteration_continues_the_schedule(davis2016_root, tmp_path):
    from corrvos.models.config import get_config
    from corrvos.models.checkpoint import checkpoint_metadata
    from corrvos.training.trainer import Trainer, TrainOptions

    tiny = get_config("stcn-s").replace(value_dim=32, value_widths=(16, 32, 64), decoder_dims=(32, 16, 16))
    base = dict(model=tiny, data=[str(davis2016_root)], sequences=["bear", "boat"], crop=32, batch=2, iters=4,
                workers=0, progress=False, log_every=1, save_every=0, seed=3, corr=frozenset(),
                frame_cache=str(tmp_path / "frames"), snapshot_every=2, lr=1e-3)
    full = Trainer(TrainOptions(out=str(tmp_path / "full"), **base))
    lrs = []
    for _ in range(4):
        lrs.append(full.scheduler.get_last_lr()[0])
        full.train_step([_collate(full, full.iteration)])
    snap = Path(tmp_path / "full" / "snapshots")
    full.save_snapshot()
    meta = checkpoint_metadata(snap / "weights_00000004.safetensors")
    assert meta["stage"] == "main" and meta["iterations"] == "4" and meta["stage_iters"] == "4"
    assert (snap / "weights_00000004.safetensors").stat().st_size < 0.6 * sum(
        v.numel() * 4 for v in full.net.state_dict().values())  # fp16

    # A run stopped at 2 (snapshot) and continued from its fp16 weights reaches the same schedule.
    first = Trainer(TrainOptions(out=str(tmp_path / "a"), **base))
    first.train(stop_at=2)
    assert sorted(p.name for p in (tmp_path / "a" / "snapshots").iterdir()) == ["weights_00000002.safetensors"]
    # A stop between snapshot points still leaves the weights it stopped at.
    Trainer(TrainOptions(out=str(tmp_path / "odd"), **base)).train(stop_at=1)
    assert sorted(p.name for p in (tmp_path / "odd" / "snapshots").iterdir()) == ["weights_00000001.safetensors"]
    cont = Trainer(TrainOptions(out=str(tmp_path / "b"), load=str(tmp_path / "a" / "snapshots" /
                                                                   "weights_00000002.safetensors"),
                                start_iteration=2, **base))
    assert cont.iteration == 2 and cont.scheduler.get_last_lr()[0] == pytest.approx(lrs[2])
    cont.train()
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [3, 4]
    assert (tmp_path / "b" / "snapshots" / "weights_00000004.safetensors").is_file()
    # Continuing after the LR drop (at 80 % = iteration 3) starts at the dropped LR.
    assert lrs[3] == pytest.approx(0.1 * lrs[0])
    late = Trainer(TrainOptions(out=str(tmp_path / "c"), load=str(snap / "weights_00000004.safetensors"),
                                start_iteration=3, **base))
    assert late.scheduler.get_last_lr()[0] == pytest.approx(lrs[3])


def _collate(trainer, step: int) -> dict:
    from torch.utils.data import default_collate

    return default_collate([trainer.dataset[SampleKey(i, step, 5)] for i in range(2)])


def test_recipe_stage_commands_parse_with_train_py(tmp_path):
    """Every option the recipe forwards (crop, LR, BN, bootstrap, gradient clipping...) is one train.py accepts."""
    from corrvos.train import build_parser as train_parser
    from corrvos.train import options_from_args
    from corrvos.train import main as train_main
    from experiments.recipe import Arm, build_parser, plan_arms, stage_command
    from experiments.recipe import main as recipe_main

    args = build_parser().parse_args(["run", "--data", str(tmp_path), "--out", str(tmp_path / "OUT"), "--device", "cpu",
                                      "--crop", "160", "--batch", "4", "--lr", "1e-3", "--bn", "train",
                                      "--grad-clip", "20", "--sequences", "bear,boat", "--alpha-start", "3",
                                      "--alpha-warmup", "2", "--alpha-max", "0.05"])
    args.frame_cache = tmp_path / "frames"
    cmd = stage_command(Arm("xmem-s", "corr", (6, 8)), 1, args, 0, tmp_path / "main", tmp_path / "w.safetensors", 4)
    assert cmd[1].endswith("train.py")
    opts = options_from_args(train_parser().parse_args(cmd[2:]))
    assert (opts.grad_clip, opts.crop, opts.batch, opts.lr, opts.bn) == (20.0, 160, 4, 1e-3, "train")
    assert (opts.alpha_start, opts.alpha_warmup, opts.alpha_max) == (3, 2, 0.05)
    assert (opts.stage, opts.iters, opts.start_iteration, opts.sequences) == ("main", 8, 4, ["bear", "boat"])
    assert opts.corr == {"pcl", "ocl"} and opts.load.endswith("w.safetensors")
    assert "--stop-at" not in cmd
    zeros = build_parser().parse_args(["run", "--data", str(tmp_path), "--out", str(tmp_path / "OUT"),
                                       "--alpha-max", "0", "--alpha-warmup", "0"])
    zeros.frame_cache = tmp_path / "frames"
    cmd = stage_command(Arm("xmem-s", "corr", (6, 8)), 1, zeros, 0, tmp_path / "main", tmp_path / "w.safetensors", 4)
    opts = options_from_args(train_parser().parse_args(cmd[2:]))
    assert (opts.alpha_max, opts.alpha_warmup, opts.grad_clip) == (0.0, 0, 0.0)

    # Table 4 arms cut short: the stage that holds the stop point ends there, the schedule keeps --iters.
    arms = plan_arms(["stcn-s"], {"stcn-s": (6, 8)}, None, ("pcl", "ocl"), (1, 5))
    assert [(a.name, a.corr, a.end) for a in arms] == [("stcn-s_pcl", "pcl", (1, 5)), ("stcn-s_ocl", "ocl", (1, 5))]
    static = stage_command(arms[1], 0, args, 0, tmp_path / "s", None, 0)
    main = train_parser().parse_args(stage_command(arms[1], 1, args, 0, tmp_path / "m", tmp_path / "w.safetensors", 0)[2:])
    assert "--stop-at" not in static and (main.stop_at, main.iters, main.corr) == (5, 8, "ocl")
    assert plan_arms(["stcn-s"], {"stcn-s": (6, 8)}, None, ("baseline",), (0, 6))[0].end == (0, 6)  # static only
    with pytest.raises(ValueError, match="outside"):
        plan_arms(["stcn-s"], {"stcn-s": (6, 8)}, None, ("pcl",), (1, 9))
    assert recipe_main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "O"), "--stop-at", "main"]) == 2
    assert train_main(["--model", "stcn-s", "--data", str(tmp_path), "--out", str(tmp_path / "t"), "--stop-at", "0"]) == 2
