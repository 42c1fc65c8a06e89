"""Training-step speed with and without the correspondence losses (the paper's "+7-9 % cost" claim).

    python -m experiments.speed --models stcn stcn-s --batch 8 --crop 384 --iters 30

Times ``Trainer.train_step`` (forward, losses, backward, optimiser step) on synthetic batches that
are already on the device, so the numbers isolate compute: the same batches serve every variant,
and data loading (identical for all variants apart from the second view) is left out. Variants:
``seg`` (L_seg only), ``pcl`` (+ L_PCL with the cross-view anchor), ``pcl,ocl`` (the full method)
``pcl,ocl/no-cv`` (without the cross-view anchor, i.e. no extra key-encoder input) and
``pcl,ocl/cv-half`` (the second view encoded at half size in a separate key-encoder call).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# name -> (--corr, cross-view anchor, view scale)
VARIANTS = {"seg": ("none", False, 1.0), "pcl": ("pcl", True, 1.0), "pcl,ocl": ("pcl,ocl", True, 1.0),
            "pcl,ocl/no-cv": ("pcl,ocl", False, 1.0), "pcl,ocl/cv-half": ("pcl,ocl", True, 0.5)}


def synthetic_sample(rng: np.random.Generator, frames: int, objects: int, crop: int, proposals: int = 64) -> dict:
    """One sample in the training format (datasets.py) with ellipse objects and random proposal boxes."""
    yy, xx = np.mgrid[:crop, :crop]
    masks = np.zeros((frames, objects, crop, crop), np.float32)
    object_boxes = np.full((frames, 8, 4), -1.0, np.float32)
    for k in range(objects):
        cy, cx = rng.uniform(0.3, 0.7, 2) * crop
        ry, rx = rng.uniform(0.1, 0.25, 2) * crop
        for t in range(frames):
            dy, dx = rng.normal(0, 0.02 * crop, 2)
            m = ((yy - cy - dy) / ry) ** 2 + ((xx - cx - dx) / rx) ** 2 <= 1
            masks[t, k] = m
            ys, xs = np.nonzero(m)
            object_boxes[t, k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    cls_gt = np.where(masks.sum(1) > 0, masks.argmax(1) + 1, 0)
    side = rng.uniform(0.3, 0.8, (frames, proposals, 2)) * crop
    x0 = rng.uniform(0, 1, (frames, proposals, 2)) * (crop - side)
    theta = np.array([[0.7, 0.0, 0.1], [0.0, 0.7, -0.2]], np.float32)
    ids = np.full(8, -1)
    ids[:objects] = np.arange(1, objects + 1)
    return {
        "rgb": torch.randn(frames, 3, crop, crop), "masks": torch.from_numpy(masks),
        "cls_gt": torch.from_numpy(cls_gt), "selector": torch.ones(objects),
        "boxes": torch.from_numpy(np.concatenate([x0, x0 + side], -1).astype(np.float32)),
        "num_boxes": torch.full((frames,), proposals), "object_boxes": torch.from_numpy(object_boxes),
        "object_box_ids": torch.from_numpy(ids), "view2_rgb": torch.randn(3, crop, crop),
        "view2_theta": torch.from_numpy(theta),
    }


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def synthetic_batches(model: str, args: argparse.Namespace, count: int, seed: int = 0) -> list[dict]:
    """``count`` collated batches of ``args.batch`` clips shaped for ``model``'s main stage (frames, objects)."""
    from corrvos.training.stages import get_stage

    preset = get_stage(model, "main")
    rng = np.random.default_rng(seed)
    return [collate([synthetic_sample(rng, preset.frames, preset.max_objects, args.crop) for _ in range(args.batch)])
            for _ in range(count)]


@contextlib.contextmanager
def variant_trainer(model: str, corr: str, cross_view: bool, view_scale: float, args: argparse.Namespace):
    """A ``Trainer`` of ``model`` for one variant, past the bootstrapping warm-up, writing to a temp dir."""
    from corrvos.training.losses import parse_corr
    from corrvos.training.trainer import Trainer, TrainOptions

    with tempfile.TemporaryDirectory() as out:
        opts = TrainOptions(model=model, data=[], out=out, corr=parse_corr(corr), cross_view=cross_view, view_scale=view_scale,
                            batch=args.batch, crop=args.crop, iters=10**6, amp=args.amp, device=args.device,
                            alpha_warmup=0, progress=False)
        trainer = Trainer(opts, dataset=[])
        trainer.iteration = 10**5  # past bootstrapping warm-up: the top-p selection runs too
        yield trainer


def time_variant(model: str, corr: str, cross_view: bool, view_scale: float, batches: list[dict],
                 args: argparse.Namespace, profile: bool = False) -> float:
    """Iterations per second of ``train_step`` over ``batches`` after ``args.warmup`` untimed steps."""
    with variant_trainer(model, corr, cross_view, view_scale, args) as trainer:
        on_cuda = trainer.device.type == "cuda"
        batches = [trainer._to_device(b) for b in batches]  # as the trainer does: box fields stay on the host

        def sync() -> None:
            if on_cuda:
                torch.cuda.synchronize()

        for i in range(args.warmup):
            trainer.train_step([batches[i % len(batches)]])
        sync()
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
            prof = torch_profile(activities=activities)
            prof.__enter__()
        start = time.perf_counter()
        for i in range(args.iters):
            trainer.train_step([batches[i % len(batches)]])
        sync()
        elapsed = time.perf_counter() - start
        if prof is not None:
            prof.__exit__(None, None, None)
            sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
        return args.iters / elapsed


class _OpCounter(TorchDispatchMode):
    """Counts ATen ops as they are dispatched, split by the device of their first tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        dev = next((a.device.type for a in leaves if torch.is_tensor(a)), None)
        if dev is None:  # a factory op (arange, full, rand): where it creates its tensor
            dev = torch.device((kwargs or {}).get("device") or "cpu").type
        self.counts[dev] = self.counts.get(dev, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(model: str, corr: str, cross_view: bool, view_scale: float, batch: dict,
              args: argparse.Namespace) -> dict[str, int]:
    """ATen ops dispatched by one ``train_step`` (forward, losses, backward, optimiser), by device.

    A small model's step on a GPU is bound by the host issuing kernels, so the number of ops a
    variant adds predicts its cost there; unlike a timing, it can be measured on any machine.
    On the CPU the optimiser runs per parameter (on CUDA, Adam runs foreach), so compare variants,
    not devices.
    """
    with variant_trainer(model, corr, cross_view, view_scale, args) as trainer:
        batch = trainer._to_device(batch)
        trainer.train_step([batch])  # warm-up: lazy initialisation dispatches ops once
        counter = _OpCounter()
        with counter:
            trainer.train_step([batch])
        return counter.counts


def check_syncs(model: str, args: argparse.Namespace) -> None:
    """Print every call site that made the device synchronise during one full-method training step."""
    import warnings

    batch = synthetic_batches(model, args, 1, seed=1)[0]
    quick = argparse.Namespace(**{**vars(args), "iters": 0, "warmup": 1})
    time_variant(model, *VARIANTS["pcl,ocl"], [batch], quick)  # warm-up outside the check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            time_variant(model, *VARIANTS["pcl,ocl"], [batch], quick)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = sorted({f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught})
    print(f"synchronising call sites in one step of {model} (pcl,ocl): {len(sites)}")
    for site in sites:
        print("  " + site)


def print_op_counts(args: argparse.Namespace) -> int:
    results = []
    for model in args.models:
        batch = synthetic_batches(model, args, 1)[0]
        base = None
        for name in args.variants:
            counts = count_ops(model, *VARIANTS[name], batch, args)
            total = sum(counts.values())
            base = total if name == "seg" else base
            extra = f"  +{total - base} vs seg" if base is not None and name != "seg" else ""
            by_dev = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"{model:8s} {name:14s} {total:6d} ops per step ({by_dev}){extra}", flush=True)
            results.append({"model": model, "variant": name, "ops": total, "ops_by_device": counts,
                            "batch": args.batch, "crop": args.crop})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["stcn", "stcn-s"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="time each variant this often, interleaved; report the best")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"))
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", nargs="+", choices=list(VARIANTS), default=[],
                   help="print a torch.profiler table of these variants (of the first model) instead of timing")
    p.add_argument("--count-ops", action="store_true",
                   help="instead of timing, count the ATen ops one training step dispatches (by device) per variant: "
                        "a machine-independent proxy for the cost on a GPU when the host is the bottleneck")
    p.add_argument("--check-syncs", action="store_true",
                   help="first run one full-method step with torch.cuda.set_sync_debug_mode('warn') and list the "
                        "places that synchronise the device")
    args = p.parse_args(argv)

    if args.check_syncs and torch.cuda.is_available():
        check_syncs(args.models[0], args)
    if args.profile:
        batches = synthetic_batches(args.models[0], args, 2)
        for name in args.profile:
            rate = time_variant(args.models[0], *VARIANTS[name], batches, args, profile=True)
            print(f"^ {args.models[0]} {name}: {rate:.3f} it/s while profiled")
        return 0
    if args.count_ops:
        return print_op_counts(args)
    results = []
    for model in args.models:
        batches = synthetic_batches(model, args, 4)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in args.variants:
                rate = time_variant(model, *VARIANTS[name], batches, args)
                best[name] = max(best.get(name, 0.0), rate)
        base = best.get("seg", math.nan)
        for name in args.variants:
            overhead = 100 * (base / best[name] - 1) if name != "seg" else 0.0
            results.append({"model": model, "variant": name, "it_per_s": best[name], "overhead_pct": overhead,
                            "batch": args.batch, "crop": args.crop})
            print(f"{model:8s} {name:14s} {best[name]:7.3f} it/s  overhead {overhead:+6.1f} %", flush=True)
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
