"""Learning-rate schedule: linear warmup from 0, then cosine or linear decay to 0 (or constant).

A pure function of the step, so the schedule's whole state is the step number stored in each checkpoint.
The warm-up is a fraction of the run (`warmup_ratio`, 5% by default) unless a number of steps is given, and
always shorter than the run, so that the learning rate asked for is reached however short the run.
"""

from __future__ import annotations

import math

DEFAULT_WARMUP_RATIO = 0.05


def warmup_steps(total: int, warmup: int | None = None, ratio: float = DEFAULT_WARMUP_RATIO) -> int:
    """Warm-up steps of a `total`-step run: `warmup` if given, else ceil(ratio * total); at most total - 1.

    With w warm-up steps the learning rate peaks on step w (1-based), so w < total leaves at least one step
    at the peak: a 40-step run at the default ratio warms up for 2 steps, a 1000-step run for 50."""
    steps = math.ceil(ratio * total - 1e-9) if warmup is None else warmup
    return max(0, min(steps, total - 1))


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "cosine") -> float:
    """Learning rate for optimiser step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * ((step + 1) / warmup)  # exactly base_lr on the last warm-up step
    if kind == "constant":
        return base_lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
