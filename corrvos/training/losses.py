"""The training objective, Eq. 12: ``L = L_seg + alpha(it) * (L_PCL + beta * L_OCL)``.

``L_seg`` is upstream's (bootstrapped CE on the soft-aggregated logits, + Dice for XMem), summed
over the predicted frames 1..T-1 and averaged over the batch. ``L_PCL`` and ``L_OCL`` reuse the keys
the segmentation forward computed (``corrvos.training.forward``); see ``pcl.py`` and ``ocl.py`` for
how each is defined where the paper leaves room.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from corrvos.training.contrastive import Negatives
from corrvos.training.ocl import host_array, ocl_loss
from corrvos.training.pcl import pcl_loss
from corrvos.training.schedule import ALPHA_MAX, BETA, BOOTSTRAP_FINAL_P, bootstrap_p, correspondence_alpha
from corrvos.training.seg_losses import bootstrapped_ce, dice_loss

CORR_TERMS = ("pcl", "ocl")
# Batch fields only read on the host (OCL's per-video bookkeeping): the trainer leaves them on the CPU.
HOST_KEYS = frozenset({"boxes", "num_boxes", "object_boxes", "object_box_ids"})


def parse_corr(text: str) -> frozenset[str]:
    """``"none" | "pcl" | "ocl" | "pcl,ocl"`` -> the set of enabled correspondence terms."""
    text = text.strip().lower()
    if text in ("", "none"):
        return frozenset()
    terms = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = terms - set(CORR_TERMS)
    if unknown:
        raise ValueError(f"unknown correspondence loss {sorted(unknown)}; use none, pcl, ocl or pcl,ocl")
    return terms


@dataclass
class LossConfig:
    """Everything that decides the loss value at an iteration.

    ``bootstrap_scale`` scales upstream's 20K/70K bootstrapping thresholds; ``alpha_warmup`` is the
    number of iterations alpha takes to go from 0 to ``alpha_max`` (starting at ``alpha_start``).
    """

    corr: frozenset[str] = field(default_factory=lambda: frozenset(CORR_TERMS))
    cross_view: bool = True
    negatives: Negatives = Negatives.BOTH
    ocl_proposals: bool = True
    ocl_annotated: bool = True
    alpha_max: float = ALPHA_MAX
    alpha_warmup: int = 10_000
    alpha_start: int = 0
    beta: float = BETA
    bootstrap_scale: float = 1.0
    bootstrap_final_p: float = BOOTSTRAP_FINAL_P  # 1.0 = plain CE throughout
    dice: bool = False  # XMem adds Dice

    @property
    def pcl(self) -> bool:
        return "pcl" in self.corr

    @property
    def ocl(self) -> bool:
        return "ocl" in self.corr


def segmentation_loss(logits: list[Tensor], cls_gt: Tensor, selector: Tensor | None, p: float,
                      dice: bool) -> tuple[Tensor, Tensor | None]:
    """Sum over frames of bootstrapped CE (and Dice). ``logits[i]`` is frame ``i + 1``'s ``(B, K+1, H, W)``."""
    ce = sum(bootstrapped_ce(lg, cls_gt[:, i + 1], p, selector) for i, lg in enumerate(logits))
    dc = sum(dice_loss(lg, cls_gt[:, i + 1], selector) for i, lg in enumerate(logits)) if dice else None
    return ce, dc


def boxes_from_batch(batch: dict[str, Any], frame: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-sample boxes ``(N, 4)`` float32 and ids ``(N,)`` int64 (0 = proposal, object id > 0) of clip
    frame ``frame``, as host arrays (OCL's bookkeeping is numpy: see ``ocl.py``).

    Reads the collated sample format of ``corrvos.training.datasets``: ``boxes`` ``(B, T, P, 4)``
    with ``num_boxes`` ``(B, T)`` valid rows, and ``object_boxes`` ``(B, T, A, 4)`` (``-1`` rows where
    an object is absent) with ``object_box_ids`` ``(B, A)`` (``-1`` padding).
    """
    boxes, num = host_array(batch["boxes"], np.float32)[:, frame], host_array(batch["num_boxes"], np.int64)[:, frame]
    obj, obj_ids = host_array(batch["object_boxes"], np.float32)[:, frame], host_array(batch["object_box_ids"], np.int64)
    present = (obj_ids > 0) & (obj[..., 2] > obj[..., 0]) & (obj[..., 3] > obj[..., 1]) & (obj[..., 0] >= 0)
    out_boxes, out_ids = [], []
    for b in range(len(boxes)):
        n = int(num[b])
        out_boxes.append(np.concatenate([boxes[b, :n], obj[b][present[b]]]))
        out_ids.append(np.concatenate([np.zeros(n, dtype=np.int64), obj_ids[b][present[b]]]))
    return out_boxes, out_ids


def compute_losses(out: dict[str, Any], batch: dict[str, Any], config: LossConfig, iteration: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Total loss and every term, detached (0-dim tensors, or floats for the schedules; for logging).

    Args:
        out: the forward's dict (``logits``, ``keys``, ``shrinkage``, ``selection``, ``view_key``).
        batch: the collated training batch (``cls_gt``, ``selector``; for the cross-view term
            ``view2_theta``, the view being of clip frame 0; for OCL the box fields read by
            ``boxes_from_batch``, best left on the CPU: see ``HOST_KEYS``).
    """
    p = bootstrap_p(iteration, config.bootstrap_scale, config.bootstrap_final_p)
    ce, dc = segmentation_loss(out["logits"], batch["cls_gt"], batch.get("selector"), p, config.dice)
    total = ce if dc is None else ce + dc
    # Stats stay tensors (no device synchronisation in the middle of the step); see ``stats_to_floats``.
    stats: dict[str, Tensor | float] = {"ce": ce.detach(), "p": p}
    if dc is not None:
        stats["dice"] = dc.detach()

    alpha = correspondence_alpha(iteration, config.alpha_warmup, config.alpha_max, config.alpha_start)
    stats["alpha"] = alpha
    corr = None
    keys = out["keys"].float()
    if config.pcl:
        use_view = config.cross_view and out.get("view_key") is not None
        pcl = pcl_loss(
            keys,
            shrinkage=None if out.get("shrinkage") is None else out["shrinkage"].float(),
            selection=None if out.get("selection") is None else out["selection"].float(),
            view_key=out["view_key"].float() if use_view else None,
            view_to_frame=batch["view2_theta"].to(keys.device) if use_view else None,
            view_frame=torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device) if use_view else None,
            negatives=config.negatives,
            generator=generator,
        )
        stats["pcl"] = pcl.detach()
        corr = pcl
    if config.ocl:
        t_first, t_last = 0, keys.shape[1] - 1
        boxes_t, ids_t = boxes_from_batch(batch, t_first)
        boxes_t2, ids_t2 = boxes_from_batch(batch, t_last)
        result = ocl_loss(
            keys[:, t_first], keys[:, t_last], boxes_t, ids_t, boxes_t2, ids_t2,
            image_size=tuple(batch["cls_gt"].shape[-2:]),
            negatives=config.negatives, use_proposals=config.ocl_proposals, use_annotated=config.ocl_annotated,
            generator=generator,
        )
        stats["ocl"] = result.loss.detach()
        stats["ocl_n"] = result.num_queries.detach().float()
        corr = config.beta * result.loss if corr is None else corr + config.beta * result.loss
    if corr is not None:
        total = total + alpha * corr
    stats["loss"] = total.detach()
    return total, stats


def stats_to_floats(stats: dict[str, Tensor | float]) -> dict[str, float]:
    """Loss terms -> python floats with a single device synchronisation."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    values = torch.stack([stats[k].float().reshape(()) for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in stats.items() if not torch.is_tensor(v)}
    out.update(zip(keys, values))
    return {k: out[k] for k in stats}
