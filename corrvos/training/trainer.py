"""The training loop: stage presets, optimiser, frozen BN, AMP, DDP + gradient accumulation, exact resume.

``Trainer(TrainOptions(...)).train()`` is what ``python corrvos/train.py`` runs. Under ``torchrun`` each
process trains on its shard of every batch (env:// rendezvous, NCCL on CUDA, gloo on CPU).

Exact resume: a checkpoint holds the model, optimiser, LR scheduler, grad scaler, iteration and the
RNG states (python, numpy, torch, CUDA) of every rank. The data needs no state: a sample is a pure
function of (seed, step, index) (``corrvos.training.samples``) and the sampler restarts at the
checkpoint's step; the DataLoader gets its own generator so that creating it never consumes the
global RNG that the losses and the XMem forward draw from. Checkpoints are written atomically
(tmp + os.replace) and only the last ``keep_last`` are kept.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from corrvos.errors import CheckpointError, DatasetError
from corrvos.models.checkpoint import size_for_crop
from corrvos.models.config import ModelConfig
from corrvos.models.registry import arch_spec
from corrvos.training.contrastive import Negatives
from corrvos.training.forward import VIEW_SCALE, XMEM_DEEP_UPDATE_P, ClipForward
from corrvos.training.losses import HOST_KEYS, LossConfig, compute_losses, stats_to_floats
from corrvos.training.schedule import ALPHA_MAX, BOOTSTRAP_FINAL_P
from corrvos.training.stages import StagePreset, get_stage
from corrvos.tracker_options import processing_size

CHECKPOINT_PREFIX = "ckpt_"
FINAL_NAME = "final.safetensors"
LOG_NAME = "log.csv"
UPSTREAM_SEED = 14159265


@dataclass
class TrainOptions:
    """Everything a training run depends on. ``None`` fields take the stage preset's value."""

    model: str | ModelConfig  # preset name, or a config whose .name is a preset (e.g. a narrower test net)
    data: list[str]
    out: str
    stage: str = "main"
    corr: frozenset[str] = frozenset({"pcl", "ocl"})
    cross_view: bool = True
    negatives: str = "both"
    ocl_objects: str = "both"  # both | annotated | proposals (paper Table 6)
    iters: int | None = None
    batch: int | None = None
    lr: float | None = None
    crop: int | None = None
    alpha_warmup: int | None = None
    alpha_start: int = 0  # alpha is 0 before this iteration
    alpha_max: float = ALPHA_MAX  # Eq. 12's alpha after its warm-up (the paper: 0.2)
    accum: int = 1
    amp: str | None = None  # bf16 | fp16 | none; None = bf16 on CUDA, none on CPU
    device: str | None = None
    seed: int = UPSTREAM_SEED
    workers: int = 4
    resume: bool = False
    load: str | None = None
    start_iteration: int = 0  # with load: continue the schedule there (fresh optimiser; see _start_at)
    frame_cache: str | None = None  # decode the data once into this folder (framestore.py)
    snapshot_every: int = 0  # fp16 weights OUT/snapshots/weights_%08d.safetensors every N iterations
    imagenet: bool = False
    # BatchNorm: "frozen" (upstream: running statistics of the pretrained encoders kept), "encoder" (only the
    # key encoder's kept), "train" (statistics learned), "auto": see resolve_bn_mode.
    bn: str = "auto"
    # Final fraction of hardest pixels of the bootstrapped CE (upstream 0.15); 1.0 = plain CE. From
    # random weights on a short schedule 0.15 kills the decoder (see docs/training.md).
    bootstrap_p: float = BOOTSTRAP_FINAL_P
    # Clip the global gradient norm to this value before the optimiser step (0: off, as upstream).
    # From random weights at lr 1e-3 Adam took a few huge steps that wrecked the CPU runs (docs/training.md).
    grad_clip: float = 0.0
    proposals: str | None = None
    repeats: list[int] | None = None
    sequences: list[str] | None = None
    split: str = "train"
    save_every: int = 5000
    keep_last: int = 3
    log_every: int = 50
    eval_every: int = 0
    eval_data: str | None = None
    eval_sequences: list[str] | None = None
    eval_size: int | None = None  # as --size: None = the training crop's scale (preferred_size), 0 = input size
    progress: bool = True
    deep_update_p: float = XMEM_DEEP_UPDATE_P
    view_scale: float = VIEW_SCALE

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["corr"] = sorted(self.corr)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        return json.dumps(d, sort_keys=True)


# ----------------------------------------------------------------------------------------- helpers

def freeze_bn(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode (running statistics frozen) while affine params still train.

    Right for pretrained encoders (upstream always starts from ImageNet). From random weights the
    frozen statistics are mean 0 / variance 1, i.e. BN normalises nothing; ``--bn train`` (the
    ``auto`` choice there) learns them as usual for training from scratch.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


BN_MODES = ("auto", "frozen", "encoder", "train")


def resolve_bn_mode(mode: str, net: nn.Module, imagenet: bool, loaded: bool) -> str:
    """``auto`` -> what the starting weights call for: frozen for loaded weights, or when every encoder came from
    ImageNet; ``encoder`` (the pretrained key encoder's statistics kept, the random-init rest learned) when only
    the key encoder did; ``train`` from random weights."""
    if mode not in BN_MODES:
        raise ValueError(f"--bn must be one of {', '.join(BN_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    if loaded:
        return "frozen"
    if imagenet:
        return "frozen" if net.config.value_encoder_takes_imagenet else "encoder"
    return "train"


def _dist_info() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors/ints only (so ``weights_only`` loading works)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(int(v) for v in py_state.tolist()), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (names carry the zero-padded iteration)."""
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*.pt"))


def _resolve_device(name: str | None, local_rank: int) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class CsvLog:
    """Append-only CSV of the logged iterations; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_iter: int | None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if resume_iter is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(r["iteration"]) <= resume_iter]
            if rows:
                self.fields = list(rows[0].keys())
                tmp = path.with_name(path.name + ".tmp")
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, self.fields)
                    writer.writeheader()
                    writer.writerows(kept)
                os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


# ----------------------------------------------------------------------------------------- trainer

class Trainer:
    """One training run. Build it, then call :meth:`train`; it returns the final weights' path."""

    def __init__(self, opts: TrainOptions, dataset: Any = None) -> None:
        """``dataset`` replaces the one built from ``opts.data`` (any map-style dataset of samples in the
        format of ``corrvos.training.datasets`` that accepts ``SampleKey`` items; used by benchmarks)."""
        from corrvos import build_model

        self.opts = opts
        self.rank, self.local_rank, self.world = _dist_info()
        self.device = _resolve_device(opts.device, self.local_rank)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.out = Path(opts.out)
        self.ckpt_dir = self.out / "checkpoints"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)

        self.model_name = opts.model.name if isinstance(opts.model, ModelConfig) else opts.model
        preset = get_stage(self.model_name, opts.stage)
        if opts.iters is not None and opts.iters != preset.iters:
            preset = preset.with_iters(opts.iters)
        self.preset: StagePreset = preset
        self.iters = preset.iters
        self.batch = opts.batch or preset.batch
        if self.batch % (self.world * opts.accum):
            raise ValueError(f"the batch {self.batch} must be divisible by GPUs x --accum = {self.world * opts.accum}")
        self.micro_batch = self.batch // (self.world * opts.accum)
        if not opts.grad_clip >= 0:
            raise ValueError(f"--grad-clip must be 0 (off) or a positive norm, not {opts.grad_clip}")
        if not opts.alpha_max >= 0:
            raise ValueError(f"--alpha-max must be 0 or more, not {opts.alpha_max}")
        self.crop = opts.crop or preset.crop
        self.amp_dtype = _amp_dtype(opts.amp, self.device)

        # Same initial weights on every rank (DDP also broadcasts rank 0's at construction).
        torch.manual_seed(opts.seed)
        net = build_model(opts.model, imagenet=opts.imagenet)
        if opts.load:
            self._load_weights(net, opts.load)
        self.net = net.to(self.device)
        self.bn_mode = resolve_bn_mode(opts.bn, net, imagenet=opts.imagenet, loaded=bool(opts.load))
        self.spec = arch_spec(net.config)
        self.forward_module: nn.Module = ClipForward(self.net, opts.deep_update_p, opts.view_scale)
        if self.world > 1:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.forward_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Frozen BN never changes its buffers; learned statistics are averaged over the
                # ranks after every step instead (_sync_bn_stats), so there is nothing to broadcast.
                broadcast_buffers=False,
            )
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if preset.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=opts.lr or preset.lr, weight_decay=preset.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(preset.lr_drops), preset.gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

        self.loss_config = LossConfig(
            corr=frozenset(opts.corr),
            cross_view=opts.cross_view,
            negatives=Negatives(opts.negatives),
            ocl_proposals=opts.ocl_objects in ("both", "proposals"),
            ocl_annotated=opts.ocl_objects in ("both", "annotated"),
            alpha_warmup=opts.alpha_warmup if opts.alpha_warmup is not None else preset.alpha_warmup,
            alpha_start=opts.alpha_start,
            alpha_max=opts.alpha_max,
            bootstrap_scale=preset.bootstrap_scale,
            bootstrap_final_p=opts.bootstrap_p,
            dice=self.spec.dice_loss,
        )
        self.iteration = 0
        self.dataset = dataset if dataset is not None else self._build_dataset()
        if opts.start_iteration and not opts.resume:
            self._start_at(opts.start_iteration)

        # Every rank seeds differently from here on (loss sampling, XMem memory choice), reproducibly.
        random.seed(opts.seed + self.rank)
        np.random.seed((opts.seed + self.rank) % 2**32)
        torch.manual_seed(opts.seed + self.rank)
        if opts.resume:
            self._resume()

    @property
    def bn_frozen(self) -> bool:
        """Every BatchNorm keeps its running statistics (``--bn frozen``)."""
        return self.bn_mode == "frozen"

    def _freeze_bn(self) -> None:
        if self.bn_mode == "frozen":
            freeze_bn(self.net)
        elif self.bn_mode == "encoder":
            freeze_bn(self.net.key_encoder)

    # ------------------------------------------------------------------ setup
    def _load_weights(self, net: nn.Module, path: str) -> None:
        from corrvos.models.checkpoint import load_weights, read_checkpoint

        # Orthogonal 5th input channel for an upstream single-object (4-channel) value encoder, as upstream
        # fine-tuning does; zeros would leave the "other objects" channel dead.
        state_dict, config, _ = read_checkpoint(path, pad="orthogonal")
        if config.arch != net.config.arch:
            raise CheckpointError(f"{path} holds a {config.arch} network but --model {self.model_name} is "
                                  f"{net.config.arch}; pass a matching --model.")
        load_weights(net, state_dict, Path(path).name)

    def _clip_config(self):
        from corrvos.training.datasets import ClipConfig

        preset = self.preset
        return ClipConfig.preset(self.spec.clip, num_frames=preset.frames, max_objects=preset.max_objects,
                                 crop_size=self.crop, second_view=self.loss_config.pcl and self.opts.cross_view)

    def _frame_store(self, root: str):
        """The decoded frames of ``root`` under ``--frame-cache`` (rank 0 decodes, the others wait)."""
        from corrvos.training.framestore import FrameStore, store_folder

        folder = store_folder(self.opts.frame_cache, root, self.opts.split)
        if self.is_main:
            store = FrameStore.open_or_build(root, folder, self.opts.split, self.opts.sequences,
                                             workers=max(1, self.opts.workers), progress=self.opts.progress)
        if self.world > 1:
            dist.barrier()
        return store if self.is_main else FrameStore(folder)

    def _build_dataset(self):
        from corrvos.training.datasets import ConcatClips, StaticClips, VideoClips
        from corrvos.training.layouts import find_sequences

        cfg = self._clip_config()
        proposals = self.opts.proposals
        if self.loss_config.ocl and self.loss_config.ocl_proposals and proposals is None and self.is_main:
            print("note: no --proposals file: the object-level loss uses annotated objects only")
        parts = []
        for root in self.opts.data:
            if self.opts.frame_cache:
                store = self._frame_store(root)
                if self.opts.stage == "static":
                    parts.append(StaticClips.from_store(store, config=cfg, proposals=proposals, seed=self.opts.seed))
                else:
                    parts.append(VideoClips(store, cfg, proposals=proposals, seed=self.opts.seed))
            elif self.opts.stage == "static":
                try:
                    find_sequences(root, self.opts.split, self.opts.sequences)
                    parts.append(StaticClips.from_video_layout(root, self.opts.split, self.opts.sequences, config=cfg,
                                                               proposals=proposals, seed=self.opts.seed))
                except DatasetError:
                    parts.append(StaticClips.from_folder(root, config=cfg, proposals=proposals, seed=self.opts.seed))
            else:
                parts.append(VideoClips(root, cfg, self.opts.split, self.opts.sequences, proposals, seed=self.opts.seed))
        if self.opts.stage == "main" and self.is_main:
            self._note_single_video(parts)
        if len(parts) == 1 and not self.opts.repeats:
            return parts[0]
        return ConcatClips(parts, self.opts.repeats, seed=self.opts.seed)

    def _note_single_video(self, parts) -> None:
        # The losses take the other clips of the batch as other videos; with one video they are the same objects.
        names = {seq.name for part in parts for seq in part.sequences}
        uses_inter = (self.loss_config.pcl or self.loss_config.ocl) and self.opts.negatives != "intra"
        if len(names) == 1 and uses_inter and self.micro_batch > 1:
            print(f"note: every clip comes from one video ({next(iter(names))}), so the correspondence losses' "
                  "'other videos of the batch' are the same objects; pass --negatives intra to fine-tune on it")

    def _start_at(self, iteration: int) -> None:
        """Continue a schedule at ``iteration`` from ``--load`` weights, with a fresh optimiser state.

        For runs whose full checkpoint could not be kept (e.g. only the fp16 weights of a time-boxed
        job came back): the LR (MultiStepLR), bootstrapping, alpha warm-up, skip curriculum and data
        stream are pure functions of the iteration and continue exactly; Adam's moments restart
        from zero, so the first steps after the restart differ from an uninterrupted run.
        """
        import bisect

        if not 0 <= iteration <= self.iters:
            raise ValueError(f"--start-iteration {iteration} is outside the run's 0..{self.iters} iterations")
        drops = bisect.bisect_right(sorted(self.scheduler.milestones.elements()), iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.preset.gamma ** drops
        self.scheduler.last_epoch = iteration
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.iteration = iteration

    def _loader(self) -> DataLoader:
        from corrvos.training.datasets import ClipSampler, worker_init_fn

        preset, accum = self.preset, self.opts.accum

        def max_skip(step: int) -> int:
            from corrvos.training.schedule import max_skip_at

            if not preset.skip_values:
                return preset.skip_initial
            return max_skip_at(step // accum, self.iters, preset.skip_initial, preset.skip_values, preset.skip_fractions)

        sampler = ClipSampler(len(self.dataset), self.micro_batch, seed=self.opts.seed,
                              start_step=self.iteration * accum, total_steps=self.iters * accum,
                              rank=self.rank, world_size=self.world, max_skip_fn=max_skip)
        return DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=sampler, num_workers=self.opts.workers,
            worker_init_fn=worker_init_fn, pin_memory=self.device.type == "cuda",
            persistent_workers=False, drop_last=True,
            # Own generator: creating the loader must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(self.opts.seed),
            prefetch_factor=4 if self.opts.workers > 0 else None,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "world_size": self.world,
            "options": self.opts.to_json(),
        }

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes model/optimiser/scheduler; every rank writes its RNG states next to it."""
        name = f"{CHECKPOINT_PREFIX}{self.iteration:08d}"
        rng_path = self.ckpt_dir / f"{name}.rng{self.rank}"
        if self.world > 1:
            dist.barrier()  # the folder exists
        atomic_torch_save(rng_state(), rng_path)
        if self.world > 1:
            dist.barrier()  # every rank's RNG file is in place before the checkpoint names it complete
        path = None
        if self.is_main:
            path = self.ckpt_dir / f"{name}.pt"
            atomic_torch_save(self.state_dict(), path)
            for old in list_checkpoints(self.ckpt_dir)[: -self.opts.keep_last]:
                for f in self.ckpt_dir.glob(old.stem + ".*"):
                    f.unlink(missing_ok=True)
        if self.world > 1:
            dist.barrier()
        return path

    def _resume(self) -> None:
        ckpts = list_checkpoints(self.ckpt_dir)
        if not ckpts:
            if self.is_main:
                print(f"note: --resume found no checkpoint in {self.ckpt_dir}; starting from iteration 0")
            return
        path = ckpts[-1]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unpickling failure means the same thing to the user
            raise CheckpointError(f"the training checkpoint {path} is unreadable ({err}); delete it to resume "
                                  "from the previous one.") from None
        if state["world_size"] != self.world:
            raise CheckpointError(f"{path} was written by {state['world_size']} processes but this run has "
                                  f"{self.world}; resume with the same number of GPUs.")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        rng_path = path.with_suffix(f".rng{self.rank}")
        if rng_path.exists():
            set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
        if self.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------ training
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) if torch.is_tensor(v) and k not in HOST_KEYS else v
                for k, v in batch.items()}

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> dict[str, Any]:
        batch = self._to_device(batch)
        ddp = isinstance(self.forward_module, nn.parallel.DistributedDataParallel)
        no_sync = self.forward_module.no_sync() if ddp and not sync else contextlib.nullcontext()
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with no_sync:
            with autocast:
                view = batch.get("view2_rgb") if self.loss_config.pcl and self.opts.cross_view else None
                out = self.forward_module(batch["rgb"], batch["masks"][:, 0], batch["selector"], view)
            loss, stats = compute_losses(out, batch, self.loss_config, self.iteration)
            self.scaler.scale(loss / self.opts.accum).backward()
        return stats

    def _sync_bn_stats(self) -> None:
        """Average learned BN running statistics over the ranks (SyncBatchNorm needs CUDA; this works on
        gloo too), so that every rank normalises, evaluates and saves the same way."""
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var):
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(self.world)

    def _clip_gradients(self) -> torch.Tensor:
        """Global L2 norm of the (unscaled) gradients, before clipping; clips to ``opts.grad_clip`` if set.

        Logged every step: a norm that jumps by orders of magnitude is the first sign of divergence.
        Stays a device tensor so that the step keeps its single synchronisation (stats_to_floats).
        """
        self.scaler.unscale_(self.optimizer)  # no-op without fp16 loss scaling
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self.opts.grad_clip > 0:
            return nn.utils.clip_grad_norm_(params, self.opts.grad_clip, foreach=True)
        return nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over ``accum`` micro-batches; returns the averaged loss terms."""
        self.forward_module.train()
        self._freeze_bn()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Any] = {}
        for i, batch in enumerate(batches):
            stats = self._micro_step(batch, sync=i == len(batches) - 1)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        totals["grad_norm"] = self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.world > 1 and not self.bn_frozen:
            self._sync_bn_stats()  # the frozen ones are equal on every rank, so averaging keeps them
        self.iteration += 1
        return stats_to_floats(totals)  # the step's only device synchronisation

    def train(self, stop_at: int | None = None) -> Path | None:
        """Train to the last iteration and return the final weights' path.

        ``stop_at`` ends the run after that iteration with a checkpoint and returns None, as an
        interruption would (used to test resuming, or to split a run into time-boxed jobs).
        """
        from tqdm import tqdm

        opts = self.opts
        log = CsvLog(self.out / LOG_NAME, self.iteration if opts.resume else None) if self.is_main else None
        tb = self._tensorboard() if self.is_main else None
        loader_iter = iter(self._loader())
        bar = tqdm(total=self.iters, initial=self.iteration, disable=not (opts.progress and self.is_main),
                   desc=f"{self.model_name} {opts.stage}", unit="it", dynamic_ncols=True)
        start, start_iter = time.perf_counter(), self.iteration
        try:
            while self.iteration < self.iters:
                batches = [next(loader_iter) for _ in range(opts.accum)]
                stats = self.train_step(batches)
                it = self.iteration
                # grad_norm is inf on the fp16 steps the grad scaler skips by design.
                if not all(math.isfinite(v) for k, v in stats.items() if k != "grad_norm"):
                    raise FloatingPointError(f"a loss became non-finite at iteration {it}: {stats}; lower the "
                                             "learning rate or use --amp bf16 / none.")
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in ("loss", "ce", "dice", "pcl", "ocl")},
                                refresh=False)
                if log is not None and (it % opts.log_every == 0 or it == self.iters or it == start_iter + 1):
                    rate = (it - start_iter) / max(1e-9, time.perf_counter() - start)
                    row = {"iteration": it, "lr": self.scheduler.get_last_lr()[0], "it_per_s": rate, **stats}
                    log.write(row)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "iteration":
                                tb.add_scalar(f"train/{k}", v, it)
                if opts.save_every and it % opts.save_every == 0 and it < self.iters:
                    self.save_checkpoint()
                if opts.snapshot_every and (it % opts.snapshot_every == 0 or it == self.iters):
                    self.save_snapshot()
                if opts.eval_every and opts.eval_data and it % opts.eval_every == 0:
                    self._evaluate(log, tb)
                if stop_at is not None and it >= stop_at and it < self.iters:
                    if not (opts.save_every and it % opts.save_every == 0):
                        self.save_checkpoint()
                    if opts.snapshot_every and it % opts.snapshot_every:
                        self.save_snapshot()  # the weights where the run was cut are what its user wants
                    return None
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        self.save_checkpoint()
        return self.save_final()

    def save_snapshot(self) -> Path | None:
        """fp16 weights of the current iteration in ``OUT/snapshots/`` (rank 0; atomic; kept for later choice)."""
        from corrvos import save_model

        if not self.is_main:
            return None
        path = self.out / "snapshots" / f"weights_{self.iteration:08d}.safetensors"
        save_model(self.net, path, extra_metadata=self._weights_metadata(), dtype=torch.float16)
        return path

    def _weights_metadata(self) -> dict[str, Any]:
        return {"stage": self.opts.stage, "iterations": self.iteration, "stage_iters": self.iters,
                "corr": ",".join(sorted(self.opts.corr)), "train_options": self.opts.to_json()}

    def save_final(self) -> Path:
        from corrvos import save_model

        path = self.out / FINAL_NAME
        if self.is_main:
            save_model(self.net, path, extra_metadata=self._weights_metadata())
        if self.world > 1:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ optional extras
    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 -- tensorboard is optional; the CSV log is always written
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _evaluate(self, log: CsvLog | None, tb) -> float | None:
        """J&F of the current weights on a few val sequences (rank 0); failures only print a warning."""
        if not self.is_main:
            return None
        import tempfile

        try:
            from corrvos.eval.davis_eval import evaluate_results, open_davis
            from corrvos.eval.predict import predict_split
        except ImportError as err:
            print(f"warning: evaluation skipped ({err})")
            return None
        self.net.eval()
        try:
            split = open_davis(self.opts.eval_data, "val", sequences=self.opts.eval_sequences)
            with tempfile.TemporaryDirectory() as tmp:
                # The scale the saved weights will run at (load_model's preferred_size from the crop).
                size = processing_size(self.opts.eval_size, size_for_crop(self.crop))
                predict_split(split, self.net, tmp, device=self.device, size=size, progress=False)
                score = evaluate_results(split, tmp, progress=False).global_scores()["J&F-Mean"]
        except Exception as err:  # noqa: BLE001 -- a broken eval must not kill a long training run
            print(f"warning: evaluation at iteration {self.iteration} failed: {err}")
            return None
        finally:
            self.net.train()
            self._freeze_bn()
        if log is not None:
            with open(self.out / "eval.csv", "a") as f:
                f.write(f"{self.iteration},{score!r}\n")
        if tb is not None:
            tb.add_scalar("val/J&F", score, self.iteration)
        print(f"iteration {self.iteration}: val J&F {score:.4f}")
        return score


def _cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
