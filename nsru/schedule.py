"""The learning-rate schedule: transformers' schedulers (``get_scheduler``) under the config's names.

``linear``, ``cosine`` and ``constant`` all start with a linear warm-up of
:func:`warmup_steps` steps; ``constant`` is transformers' ``constant_with_warmup``. transformers'
convention is the warm-up factor ``step / warmup`` for optimizer step ``step`` (0-based), so the
first step of a warm-up runs at LR 0; from the end of the warm-up on the factor is
``(steps - step) / (steps - warmup)`` (linear), ``½(1 + cos(π · progress))`` (cosine) or 1.
The trainer steps the scheduler once after each optimizer step and keeps its state in checkpoints.
"""

from __future__ import annotations

import torch

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def warmup_steps(cfg) -> int:
    """``cfg.warmup_steps`` as a number of steps: below 1 it is a fraction of ``cfg.steps`` (rounded)."""
    warm = cfg.warmup_steps
    return int(round(warm * cfg.steps)) if warm < 1 else int(warm)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """``cfg.schedule`` over ``cfg.steps`` steps with :func:`warmup_steps`; sets the first step's LR
    in ``optimizer`` (its ``lr`` is the peak)."""
    # Imported here: transformers.optimization imports peft when it is installed, which added
    # 4.4 s to `import nsru` (measured, 2-core machine) for programs that never train.
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[cfg.schedule], optimizer, num_warmup_steps=warmup_steps(cfg),
                         num_training_steps=cfg.steps)
