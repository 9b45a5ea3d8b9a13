"""Learning-rate schedule: linear warmup from 0, then cosine or linear decay to 0 (or constant).

A pure function of the step, so the schedule's whole state is the step number stored in each checkpoint.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "cosine") -> float:
    """Learning rate for optimiser step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; use cosine, linear or constant")
