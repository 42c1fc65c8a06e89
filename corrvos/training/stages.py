"""Training stage presets: (model, stage) -> iterations, batch, optimiser, LR drops, frames, skip curriculum.

Upstream values come from the reference spec section 3.1-3.2 (STCN util/hyper_para.py, XMem
util/configuration.py). Upstream STCN's batch is *per GPU* on 2 GPUs; here ``batch`` is always the
effective (global) batch: the trainer divides it by world size x accumulation steps.

The "-s" presets are ours: small networks trained on DAVIS-2016 train only (30 videos) on one GPU,
so fewer iterations, and the bootstrapping / warm-up thresholds are scaled to the run length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

STAGES = ("static", "main")


@dataclass(frozen=True)
class StagePreset:
    iters: int
    batch: int  # effective batch over all GPUs and accumulation steps
    lr: float
    lr_drops: tuple[int, ...]  # iterations at which the LR is multiplied by gamma
    optimizer: str  # "adam" (STCN) or "adamw" (XMem)
    weight_decay: float
    frames: int
    max_objects: int
    skip_initial: int = 5
    skip_values: tuple[int, ...] = ()
    skip_fractions: tuple[float, ...] = ()
    gamma: float = 0.1
    bootstrap_scale: float = 1.0  # multiplies upstream's 20K/70K bootstrapped-CE thresholds
    alpha_warmup: int = 10_000  # iterations for alpha 0 -> 0.2 (paper: "linear warm-up", length unstated)
    crop: int = 384

    def with_iters(self, iters: int) -> "StagePreset":
        """Same stage squeezed/stretched to ``iters``: LR drops, bootstrapping and warm-up scale along."""
        ratio = iters / self.iters
        return replace(
            self,
            iters=iters,
            lr_drops=tuple(max(1, round(d * ratio)) for d in self.lr_drops),
            bootstrap_scale=self.bootstrap_scale * ratio,
            alpha_warmup=max(0, round(self.alpha_warmup * ratio)),
        )


_STCN_SKIP = dict(skip_initial=5, skip_values=(10, 15, 20, 25, 5), skip_fractions=(0.1, 0.2, 0.3, 0.4, 0.9))
_XMEM_SKIP = dict(skip_initial=5, skip_values=(10, 15, 5), skip_fractions=(0.1, 0.3, 0.9))

PRESETS: dict[tuple[str, str], StagePreset] = {
    # STCN stage 0: 300K x 8/GPU x 2 GPUs; stage 3 (main without BL30K): 150K x 4/GPU x 2 GPUs.
    ("stcn", "static"): StagePreset(300_000, 16, 1e-5, (150_000,), "adam", 1e-7, frames=3, max_objects=1),
    ("stcn", "main"): StagePreset(150_000, 8, 1e-5, (125_000,), "adam", 1e-7, frames=3, max_objects=2,
                                  **_STCN_SKIP),
    # XMem stage 0: 150K x 16, no LR drop; stage 3 (main short): 100K x 8, drop at 80K.
    ("xmem", "static"): StagePreset(150_000, 16, 1e-5, (), "adamw", 0.05, frames=3, max_objects=1),
    ("xmem", "main"): StagePreset(100_000, 8, 1e-5, (80_000,), "adamw", 0.05, frames=8, max_objects=3,
                                  **_XMEM_SKIP),
    # Small models, DAVIS-2016 regime (single object, 30 training videos, one GPU). Higher LR
    # because a ResNet-18 key encoder trained for 1/10 of the iterations needs to move faster.
    ("stcn-s", "static"): StagePreset(30_000, 16, 5e-5, (24_000,), "adam", 1e-7, frames=3, max_objects=1,
                                      bootstrap_scale=0.1, alpha_warmup=3_000, crop=384),
    ("stcn-s", "main"): StagePreset(20_000, 8, 5e-5, (16_000,), "adam", 1e-7, frames=3, max_objects=2,
                                    bootstrap_scale=20_000 / 150_000, alpha_warmup=2_000, **_STCN_SKIP),
    ("xmem-s", "static"): StagePreset(30_000, 16, 5e-5, (24_000,), "adamw", 0.05, frames=3, max_objects=1,
                                      bootstrap_scale=0.2, alpha_warmup=3_000),
    ("xmem-s", "main"): StagePreset(20_000, 8, 5e-5, (16_000,), "adamw", 0.05, frames=8, max_objects=3,
                                    bootstrap_scale=0.2, alpha_warmup=2_000, **_XMEM_SKIP),
}


def parse_stage_point(text: str) -> tuple[int, int]:
    """``"main:1000"`` -> (stage index, iteration): a point of a two-stage run, as --stop-at options take it."""
    stage, _, k = text.partition(":")
    if stage not in STAGES or not k.isdigit():
        raise ValueError(f"--stop-at takes STAGE:ITERATION with STAGE in {STAGES}, not {text!r}.")
    return STAGES.index(stage), int(k)


def schedule_family(model: str) -> str:
    """The model whose schedules ``model`` trains with: itself when listed above, else by size and architecture
    (a ResNet-50 key encoder: upstream's "stcn" / "xmem"; any smaller one: "stcn-s" / "xmem-s"), so that a new
    network preset needs no entry here."""
    if any(m == model for m, _ in PRESETS):
        return model
    from corrvos.models.config import PRESETS as MODEL_PRESETS

    config = MODEL_PRESETS.get(model)
    if config is None:
        return model
    return config.arch if config.key_backbone == "resnet50" else f"{config.arch}-s"


def get_stage(model: str, stage: str) -> StagePreset:
    """Preset for ``model`` (any network preset; see :func:`schedule_family`) and ``stage`` ("static", "main")."""
    try:
        return PRESETS[(schedule_family(model), stage)]
    except KeyError:
        models = sorted({m for m, _ in PRESETS})
        raise ValueError(f"no preset for model {model!r} stage {stage!r}; models: {', '.join(models)}; "
                         f"stages: {', '.join(STAGES)}") from None
