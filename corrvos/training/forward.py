"""Training forward passes of STCN and XMem, as upstream trains them (reference spec section 3.4).

The memory read uses ``corrvos.models.similarity`` (full softmax during training). The keys of every
frame (and, when asked, of PCL's second view, encoded in the same key-encoder call) are returned so
that the correspondence losses need no extra key computation.

``ClipForward`` wraps the network so that DistributedDataParallel sees one ``forward`` per
iteration (DDP only synchronises through ``forward``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrvos.imageops import aggregate
from corrvos.models.registry import arch_spec
from corrvos.models.similarity import read_memory, similarity, softmax_affinity

XMEM_REF_FRAMES = 3  # memory = all earlier frames while t <= 3, else frame 0 + 2 random earlier ones
XMEM_DEEP_UPDATE_P = 0.2
# Size of PCL's second view for the key encoder, as a fraction of the crop. 1.0 (default) batches the view
# into the clip's key-encoder call: no extra kernel launches, which is what counts while the step is bound
# by the host (H100, batch 8, 384 px: full method +9 % per step vs +18 % with a separate half-size call).
# A fraction < 1 encodes it in a separate call at that size (GPU cost: its square of one frame's key
# pass), better where the GPU is the bottleneck; the view is a 0.5-1.0 zoom-in crop, so at half size
# it still shows the scene at 0.5x-1x the frame's scale.
VIEW_SCALE = 1.0


def others_of(masks: Tensor) -> Tensor:
    """``(B, K, H, W)`` per-object masks -> for each object the sum of the *other* objects' masks."""
    return masks.sum(dim=1, keepdim=True) - masks


def _aggregate(logits: Tensor, selector: Tensor | None) -> tuple[Tensor, Tensor]:
    """Object logits -> (aggregated logits ``(B, K+1, H, W)``, object probabilities ``(B, K, H, W)``)."""
    prob = torch.sigmoid(logits.float())
    if selector is not None:
        prob = prob * selector[:, :, None, None].to(prob.dtype)
    agg = aggregate(prob, dim=1)
    return agg, torch.softmax(agg, dim=1)[:, 1:]


def _flat(x: Tensor) -> Tensor:
    """``(B, ..., C, h, w)`` -> ``(B, ..., C, h*w)``."""
    return x.flatten(-2)


class ClipForward(nn.Module):
    """Runs one training clip through the network and returns what the losses need.

    ``forward(rgb, first_gt, selector, view=None)``:
        rgb: ``(B, T, 3, H, W)`` normalised frames; first_gt: ``(B, K, H, W)`` frame-0 masks;
        selector: ``(B, K)`` 0/1 existing objects; view: optional ``(B, 3, H, W)`` second view.
    Returns a dict with ``logits`` (list of ``(B, K+1, H, W)`` aggregated logits for frames 1..T-1),
    ``keys`` ``(B, T, Ck, h, w)``, ``shrinkage``/``selection`` (XMem, else None), ``view_key``
    ``(B, Ck, h', w')`` (``h' = h * view_scale`` rounded to the stride).
    """

    def __init__(self, net: nn.Module, deep_update_p: float = XMEM_DEEP_UPDATE_P, view_scale: float = VIEW_SCALE) -> None:
        super().__init__()
        self.net = net
        self.deep_update_p = deep_update_p
        self.view_scale = view_scale

    def encode_view(self, view: Tensor) -> Tensor:
        """Key of PCL's second view, at ``view_scale`` of its size (a multiple of 16), key only."""
        if self.view_scale != 1.0:
            size = [max(16, round(s * self.view_scale / 16) * 16) for s in view.shape[-2:]]
            view = F.interpolate(view, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.net.encode_key(view, need_shrinkage=False, need_selection=False).key

    def encode_keys(self, rgb: Tensor, view: Tensor | None) -> tuple[Any, Tensor | None, int]:
        b, t = rgb.shape[:2]
        images = rgb.flatten(0, 1)
        joint = view is not None and self.view_scale == 1.0
        if joint:
            # Full-size view: one key-encoder call for clip and view, i.e. no extra kernel launches
            # (what matters when the step is bound by the host, as measured on an H100 at batch 8).
            images = torch.cat([images, view], dim=0)
        feats = self.net.encode_key(images)
        if joint:
            view_key = feats.key[b * t:]
            feats = type(feats)(*(None if x is None else x[: b * t] for x in feats))
        else:
            view_key = self.encode_view(view) if view is not None else None
        return type(feats)(*(None if x is None else x.unflatten(0, (b, t)) for x in feats)), view_key, t

    def forward(self, rgb: Tensor, first_gt: Tensor, selector: Tensor, view: Tensor | None = None) -> dict[str, Any]:
        feats, view_key, num_frames = self.encode_keys(rgb, view)
        # One training loop per clip preset: STCN's (each frame read from all earlier ones) or XMem's (sensory memory,
        # a random subset of memory frames).
        logits = getattr(self, f"_{arch_spec(self.net.config).clip}")(rgb, feats, first_gt, selector, num_frames)
        return {"logits": logits, "keys": feats.key, "shrinkage": feats.shrinkage,
                "selection": feats.selection, "view_key": view_key}

    @staticmethod
    def _frame(feats: Any, t: int) -> Any:
        return type(feats)(*(None if x is None else x[:, t] for x in feats))

    def _stcn(self, rgb: Tensor, feats: Any, first_gt: Tensor, selector: Tensor, num_frames: int) -> list[Tensor]:
        net = self.net
        value, _ = net.encode_value(rgb[:, 0], self._frame(feats, 0), None, first_gt, others_of(first_gt))
        values = [value]  # each (B, K, Cv, h, w)
        out = []
        for t in range(1, num_frames):
            mem_key = _flat(feats.key[:, :t].transpose(1, 2).flatten(2, 3))  # (B, Ck, t*h*w)
            query = self._frame(feats, t)
            aff = softmax_affinity(similarity(mem_key, _flat(query.key)))
            mem_value = torch.cat([_flat(v) for v in values], dim=-1)  # (B, K, Cv, t*h*w)
            readout = read_memory(aff, mem_value).unflatten(-1, query.key.shape[-2:])
            _, logits = net.decode(query, readout)
            agg, prob = _aggregate(logits, selector)
            out.append(agg)
            if t < num_frames - 1:
                value, _ = net.encode_value(rgb[:, t], query, None, prob, others_of(prob))
                values.append(value)
        return out

    def _xmem(self, rgb: Tensor, feats: Any, first_gt: Tensor, selector: Tensor, num_frames: int) -> list[Tensor]:
        net = self.net
        b = rgb.shape[0]
        value, hidden = net.encode_value(rgb[:, 0], self._frame(feats, 0), None, first_gt, others_of(first_gt),
                                         deep_update=True)
        values = [value]
        out = []
        for t in range(1, num_frames):
            dev = rgb.device
            if t <= XMEM_REF_FRAMES:
                idx = torch.arange(t, device=dev).expand(b, t)
            else:
                # Frame 0 plus (REF - 1) random earlier frames, drawn per sample (as upstream); drawn on
                # the device so that no host-to-device copy synchronises the step.
                earlier = torch.rand(b, t - 1, device=dev).argsort(dim=1)[:, : XMEM_REF_FRAMES - 1] + 1
                idx = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), earlier], dim=1)
            bi = torch.arange(b, device=dev)[:, None]
            mem_key = _flat(feats.key[bi, idx].transpose(1, 2).flatten(2, 3))  # (B, Ck, R*h*w)
            mem_shrink = _flat(feats.shrinkage[bi, idx].transpose(1, 2).flatten(2, 3))  # (B, 1, R*h*w)
            all_values = torch.stack(values, dim=1)  # (B, t, K, Cv, h, w)
            mem_value = _flat(all_values[bi, idx].permute(0, 2, 3, 1, 4, 5).flatten(3, 4))  # (B, K, Cv, R*h*w)
            query = self._frame(feats, t)
            sim = similarity(mem_key, _flat(query.key), mem_shrink, _flat(query.selection))
            readout = read_memory(softmax_affinity(sim), mem_value).unflatten(-1, query.key.shape[-2:])
            hidden, logits = net.decode(query, readout, hidden, update_hidden=t < num_frames - 1)
            agg, prob = _aggregate(logits, selector)
            out.append(agg)
            if t < num_frames - 1:
                deep = bool(torch.rand(1) < self.deep_update_p)
                value, hidden = net.encode_value(rgb[:, t], query, hidden, prob, others_of(prob), deep_update=deep)
                values.append(value)
        return out
