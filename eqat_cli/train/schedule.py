"""Learning-rate schedules of both trainers, as multipliers of the peak learning rate.

Pure functions of the step (no state), so a resumed run sets exactly the learning rate an
uninterrupted one would. Block-AP: :func:`linear` (eqat's default recipe, SignRound's) or
:func:`cosine` to ``lr / min_lr_factor`` (the paper's, ``lr/20``). E2E-QP: :func:`warmup_cosine`
(linear warmup over :func:`warmup_steps`, then cosine to 0, as transformers' Trainer).
"""

from __future__ import annotations

import math


def linear(step: int, total: int) -> float:
    """``1`` at step 0, falling linearly to ``1/total`` at the last step (0 after it)."""
    return 1.0 - step / total


def cosine(step: int, total: int, floor: float) -> float:
    """Cosine from ``1`` at step 0 to ``floor`` at the last step ``total - 1``."""
    if total <= 1:
        return 1.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / (total - 1)))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup ``(step + 1) / warmup``, then cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(ratio: float, total: int) -> int:
    """Warmup steps for a warmup ``ratio`` of ``total`` steps, rounded up (transformers' Trainer,
    the paper's scripts)."""
    return math.ceil(ratio * total)
