"""Segmentation losses as upstream STCN / XMem train with them.

Both act on soft-aggregated logits ``(B, K+1, H, W)`` (``corrvos.imageops.aggregate``, background
first) and a class map ``(B, H, W)`` with values in ``0..K``. A boolean selector ``(B, K)`` says which
object channels exist in each sample: upstream slices the channels ``[0 : n_obj + 1]`` per sample;
masking the missing channels out of the softmax is the same thing and also allows gaps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Aggregated logits are bounded by |log(1e-7)| ~ 16, so this is exp(-inf) in practice while
# staying finite in every dtype (a true -inf would turn a mislabelled pixel into an inf loss).
_MASKED_LOGIT = -1e4


def _channel_mask(selector: Tensor | None, logits: Tensor) -> Tensor | None:
    if selector is None:
        return None
    bg = torch.ones_like(selector[:, :1], dtype=torch.bool)
    return torch.cat([bg, selector.bool()], dim=1)  # (B, K+1)


def masked_logits(logits: Tensor, selector: Tensor | None) -> Tensor:
    """Push the logits of absent objects to a very negative value so the softmax ignores them."""
    mask = _channel_mask(selector, logits)
    if mask is None:
        return logits
    return logits.masked_fill(~mask[:, :, None, None], _MASKED_LOGIT)


def bootstrapped_ce(logits: Tensor, target: Tensor, p: float, selector: Tensor | None = None) -> Tensor:
    """Cross-entropy averaged over the hardest ``p`` fraction of pixels of each sample, then over samples.

    Args:
        logits: ``(B, K+1, H, W)`` aggregated logits.
        target: ``(B, H, W)`` long class indices (0 = background).
        p: fraction of pixels kept (1.0 = plain CE), see ``schedule.bootstrap_p``.
        selector: optional ``(B, K)`` bool/0-1 tensor of existing objects.
    """
    logits = masked_logits(logits.float(), selector)
    pixel_loss = F.cross_entropy(logits, target.long(), reduction="none").flatten(1)  # (B, HW)
    if p >= 1.0:
        return pixel_loss.mean()
    k = max(1, int(pixel_loss.shape[1] * p))
    hardest, _ = torch.topk(pixel_loss, k, dim=1, sorted=False)
    return hardest.mean()


def dice_loss(logits: Tensor, target: Tensor, selector: Tensor | None = None) -> Tensor:
    """XMem's Dice loss: per object ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)``, averaged over objects.

    ``p`` is the softmax of the aggregated logits (object channels only) and ``g`` the object's
    binary ground truth; absent objects (selector 0) are left out of the average.
    """
    logits = masked_logits(logits.float(), selector)
    num_obj = logits.shape[1] - 1
    prob = torch.softmax(logits, dim=1)[:, 1:].flatten(2)  # (B, K, HW)
    gt = F.one_hot(target.long(), num_obj + 1)[..., 1:].flatten(1, 2).transpose(1, 2).to(prob.dtype)
    numerator = 2 * (prob * gt).sum(-1) + 1
    denominator = prob.sum(-1) + gt.sum(-1) + 1
    per_object = 1 - numerator / denominator  # (B, K)
    if selector is None:
        return per_object.mean()
    valid = selector.bool()
    return (per_object * valid).sum() / valid.sum().clamp(min=1)
