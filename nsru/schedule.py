"""The learning-rate schedule: linear warm-up, then linear decay, cosine decay or constant."""

from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warm = cfg.warmup_steps
    warm = int(round(warm * cfg.steps)) if warm < 1 else int(warm)
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - warm)
    progress = min(1.0, (step - warm) / span)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)
