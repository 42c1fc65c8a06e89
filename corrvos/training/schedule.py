"""Iteration-dependent schedules of training: loss weights, bootstrapping ratio, max-skip curriculum.

All functions are pure functions of the iteration number, so that a resumed run computes exactly
what an uninterrupted run would have computed.
"""
from __future__ import annotations

from collections.abc import Sequence

# Upstream STCN/XMem bootstrapped cross-entropy: plain CE before 20K iterations, then the hardest
# top-p pixels with p falling linearly 1.0 -> 0.15 until 70K, 0.15 afterwards.
BOOTSTRAP_START = 20_000
BOOTSTRAP_END = 70_000
BOOTSTRAP_FINAL_P = 0.15

# Paper Eq. 12: alpha in [0, 0.2] warmed up linearly; beta fixed.
ALPHA_MAX = 0.2
BETA = 0.5


def bootstrap_p(iteration: int, scale: float = 1.0, final_p: float = BOOTSTRAP_FINAL_P) -> float:
    """Fraction of hardest pixels the bootstrapped CE averages over at ``iteration``.

    ``scale`` multiplies the upstream thresholds (20K, 70K) so that a short run (e.g. 15K
    iterations with ``scale=0.1``) goes through the same curriculum. ``p == 1`` means plain CE.
    """
    start, end = BOOTSTRAP_START * scale, BOOTSTRAP_END * scale
    if iteration < start:
        return 1.0
    if iteration >= end or end <= start:
        return final_p
    frac = (iteration - start) / (end - start)
    return 1.0 - frac * (1.0 - final_p)


def correspondence_alpha(iteration: int, warmup_iters: int, alpha_max: float = ALPHA_MAX, start: int = 0) -> float:
    """Weight alpha of the correspondence losses in Eq. 12: 0 until ``start``, then linear to ``alpha_max``.

    The paper only says "linear warm-up" to 0.2; the number of warm-up iterations is ours to choose
    (``warmup_iters``; 0 means alpha_max from the first iteration on).
    """
    if iteration < start:
        return 0.0
    if warmup_iters <= 0:
        return alpha_max
    return alpha_max * min(1.0, (iteration - start) / warmup_iters)


def max_skip_at(iteration: int, total_iters: int, initial: int, values: Sequence[int], fractions: Sequence[float]) -> int:
    """Max-skip curriculum: ``initial`` until the first fraction of ``total_iters``, then ``values[i]``.

    Upstream XMem checks the fractions every iteration (as here); STCN only at epoch boundaries,
    which with our infinite sampler has no meaning, so both use the per-iteration rule.
    """
    skip = initial
    for value, frac in zip(values, fractions):
        if iteration >= frac * total_iters:
            skip = value
    return skip
