"""The learning-rate schedule: a linear warm-up, then linear decay, cosine decay or constant.

The factors are transformers' (``get_scheduler``'s ``linear``, ``cosine`` and
``constant_with_warmup``, bit for bit): the warm-up factor is ``step / warmup`` for optimizer step
``step`` (0-based), so the first step of a warm-up runs at LR 0; after it the factor is
``(steps - step) / (steps - warmup)`` (linear), ``½(1 + cos(π · progress))`` (cosine) or 1.
The trainer steps the scheduler once after each optimizer step and keeps its state in checkpoints.

A resumed run may change ``steps`` (:func:`check_resume` says when it may not). The schedule then
stays continuous: the warm-up keeps its length in steps, and what is left of the decay is spread
over the new remaining steps, starting from the factor the resumed step had, so no step jumps.
A decay that already reached 0 (the run finished) cannot be stretched; that change is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace

import torch

SCHEDULES = ("linear", "cosine", "constant")
FIXED_ON_RESUME = ("lr", "schedule", "warmup_steps")  # what a resumed run cannot change


class ScheduleError(ValueError):
    """Options under which a resumed run cannot continue its checkpoint's schedule."""


def warmup_steps(cfg) -> int:
    """``cfg.warmup_steps`` as a number of steps: below 1 it is a fraction of ``cfg.steps`` (rounded)."""
    warm = cfg.warmup_steps
    return int(round(warm * cfg.steps)) if warm < 1 else int(warm)


class _Factor:
    """The LR factor of optimizer step ``step``. The decay runs from ``progress`` at step
    ``anchor`` to 1 at step ``total`` (a fresh schedule: 0 at the end of the warm-up); its fields
    are plain numbers, so LambdaLR's state dict keeps them."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, int(warmup), int(total)
        self.anchor, self.progress = self.warmup, 0.0

    def done(self, step: int) -> float:
        """How much of the decay lies behind step ``step`` (1: the factor reached 0)."""
        span = float(max(1, self.total - self.anchor))
        return self.progress + (1.0 - self.progress) * (float(step - self.anchor) / span)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":  # written as transformers writes it: the same bits when progress is 0
            left = float(self.total - step) / float(max(1, self.total - self.anchor))
            return max(0.0, (1.0 - self.progress) * left)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.done(step))))

    def retarget(self, step: int, total: int) -> None:
        """End the schedule at ``total`` instead, continuing from step ``step`` without a jump."""
        if total == self.total:
            return
        if self.kind != "constant" and step > self.warmup:
            self.anchor, self.progress = step, self.done(step)
        self.total = int(total)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg.schedule`` over ``cfg.steps`` steps with :func:`warmup_steps`; sets the first step's LR
    in ``optimizer`` (its ``lr`` is the peak)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    factors = [_Factor(cfg.schedule, warmup_steps(cfg), cfg.steps) for _ in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _saved_factor(state: Mapping, cfg) -> _Factor:
    """The schedule a checkpoint's ``trainer_state`` was on at its step. Checkpoints written before
    the schedule kept its own fields (transformers' lambdas, or none) give it from their config."""
    saved = ((state.get("scheduler") or {}).get("lr_lambdas") or [None])[0]
    old = SimpleNamespace(**{"schedule": cfg.schedule, "steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
                             **(state.get("config") or {})})
    factor = _Factor(old.schedule, warmup_steps(old), old.steps)
    if isinstance(saved, Mapping) and "total" in saved:
        factor.__dict__.update(saved)
    return factor


def check_resume(state: Mapping, cfg) -> None:
    """Raise :class:`ScheduleError` when ``cfg`` cannot continue the checkpoint ``state`` (a
    ``trainer_state.json``) on one continuous schedule: another lr, schedule or warm-up, fewer
    steps than are done, or more steps after a decay that already reached 0."""
    old = state.get("config") or {}
    for key in FIXED_ON_RESUME:
        if key in old and old[key] != getattr(cfg, key):
            raise ScheduleError(f"{key}={_shown(getattr(cfg, key))} on resume: the checkpoint's run has "
                                f"{key}={_shown(old[key])}, and a resumed run keeps its learning-rate schedule "
                                "(only steps may change)")
    step = int(state["step"])
    if cfg.steps < step:
        raise ScheduleError(f"steps={cfg.steps} on resume: the checkpoint is at step {step} already")
    factor = _saved_factor(state, cfg)
    if cfg.steps > factor.total and factor.kind != "constant" and step > factor.warmup and factor.done(step) >= 1.0:
        raise ScheduleError(f"steps={cfg.steps} on resume: the run finished its {factor.total} steps and its "
                            f"{factor.kind} schedule brought the learning rate to 0, so more steps would either not "
                            f"train or jump back up; start a new run with steps={cfg.steps} (a schedule=constant run "
                            "can be extended)")


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: Mapping, cfg) -> None:
    """Put ``scheduler`` (and its optimizer's LR) where checkpoint ``state`` left it, on a
    schedule that ends at ``cfg.steps`` (see :func:`check_resume` first). Checkpoints without a
    scheduler state (version 1) are placed by their step."""
    step = int(state["step"])
    saved = state.get("scheduler")
    factors = []
    for _ in scheduler.lr_lambdas:
        factor = _saved_factor(state, cfg)
        factor.retarget(step, cfg.steps)
        factors.append(factor)
    scheduler.lr_lambdas = factors
    if saved is not None:
        scheduler.load_state_dict({**saved, "lr_lambdas": [dict(f.__dict__) for f in factors]})
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, factors)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)

