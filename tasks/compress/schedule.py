"""Learning-rate schedules for the training stages: warm-up, then constant, linear or cosine decay.

A short distillation reaches a given quality in fewer steps with a higher peak learning rate that ramps up
(Adam's early moment estimates are noisy, so a high rate from step 0 shakes the copied layers loose) and
decays towards zero (the last steps refine instead of bouncing around the minimum). The factor is a pure
function of the step, so a run resumed from a checkpoint sets the same rate as one never interrupted, with
no scheduler state to save.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, total: int, *, warmup: float, kind: ScheduleKind) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Args:
        step: the step about to run.
        total: steps in the run.
        warmup: fraction of ``total`` over which the rate rises linearly from near 0 to the peak.
        kind: what follows the warm-up: ``constant`` (the peak), ``linear`` or ``cosine`` decay to 0.
    """
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / (warm + 1)  # never exactly 0: step 0 would otherwise be wasted
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, peak: float, step: int, total: int, *, warmup: float,
           kind: ScheduleKind) -> float:
    """Set every parameter group's rate for ``step``; returns it."""
    lr = peak * lr_factor(step, total, warmup=warmup, kind=kind)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
