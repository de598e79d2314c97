"""Per-step learning-rate schedules on the fractional epoch (official misc.py semantics).

``epoch`` is fractional: ``global_step / steps_per_epoch``, so the LR moves every step.
"""
from __future__ import annotations

import math


def warmup_cosine_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Tokenizer stages: linear warmup 0 -> lr over ``warmup_epochs``, then half-cosine to ``min_lr`` at ``epochs``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant_then_linear_lr(epoch: float, lr: float, end_lr: float, decay_start: float, epochs: float) -> float:
    """DiT: constant ``lr`` until ``decay_start``, then linear to ``end_lr`` at ``epochs`` (held after)."""
    if epoch <= decay_start:
        return lr
    span = max(epochs - decay_start, 1e-12)
    progress = min((epoch - decay_start) / span, 1.0)
    return lr + (end_lr - lr) * progress


def lr_at(schedule, epoch: float) -> float:
    """The stage's schedule (a :class:`rectok_fast.training.config.ScheduleConfig`) at fractional ``epoch``."""
    if schedule.kind == "constant_linear":
        return constant_then_linear_lr(epoch, schedule.lr, schedule.end_lr, schedule.decay_start_epoch, schedule.epochs)
    if schedule.kind == "warmup_cosine":
        return warmup_cosine_lr(epoch, schedule.lr, schedule.min_lr, schedule.warmup_epochs, schedule.epochs)
    raise ValueError(f"unknown schedule kind {schedule.kind!r}")
