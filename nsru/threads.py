"""How many CPU threads torch uses: one answer for every command and the benchmarks.

Order: the command's ``--threads N``, then ``$NSRU_THREADS``, then ``$OMP_NUM_THREADS`` (which torch
itself honours, so a user who set it keeps it), then the default: 1 thread.

The default, 1, is measured on a 2-core machine busy with other work (load average 5-7):

* ``nsru unlearn`` 10 steps on the demo's 0.54 M model (self-samples, statistics, leakage,
  training): 57 s on 1 thread, 232 s on 2, 465 s with torch's own default (2); the same losses
  up to the 7th digit;
* ``nsru.unlearn`` in one process, the same run: 27-40 s on 1 thread, 378 s on 2;
* forward + backward of a 20 M-parameter Llama (batch 8 x 64): 2.4-3.1 s on 1 thread, 8.8-11.3 s on 2.

On busy cores OpenMP threads wait for each other at every parallel region (2 threads burnt 5x the
CPU time of 1). No idle machine was at hand; there a second thread can win little on the demo's
matrices (96 x 264) and at most the core count on big ones, so 1 risks a bounded loss where more
threads risked a 3-14x one, and a fixed count keeps runs bit-for-bit repeatable. A big model on
an idle machine without a GPU wants ``--threads`` = its physical cores.

Importing this module does not import torch, so the command line can check ``--threads`` at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ENV", "resolve_threads", "use_threads", "available_cpus"]

ENV = "NSRU_THREADS"
_MAX_PER_CPU = 4  # more threads than this per CPU is a typo, not a setting


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _parse(raw, where: str) -> int:
    limit = _MAX_PER_CPU * available_cpus()
    text = str(raw).strip()
    try:
        n = int(text, 10)
    except ValueError:
        n = None
    if isinstance(raw, bool) or n is None or not 1 <= n <= limit:
        raise ValueError(f"{where} must be a whole number of threads from 1 to {limit} "
                         f"({_MAX_PER_CPU} x the {available_cpus()} CPUs here), got {text!r}")
    return n


def _omp_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when it is a plain positive count (OpenMP also allows lists; those are left to it)."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def resolve_threads(value: int | str | None = None, *, flag: str = "--threads") -> int:
    """The thread count: ``value`` (the command's ``flag``), else ``$NSRU_THREADS``, else
    ``$OMP_NUM_THREADS``, else the measured default (1). An invalid ``value`` or ``$NSRU_THREADS``
    raises ``ValueError`` with one line naming it and what was expected."""
    if value is not None:
        return _parse(value, flag)
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return _parse(env, ENV)
    return _omp_threads() or 1


@contextmanager
def use_threads(n: int) -> Iterator[int]:
    """Within the block, torch uses ``n`` intra-op threads, in this process and in those it starts.

    Sets ``$NSRU_THREADS`` and ``$OMP_NUM_THREADS`` (so every :func:`resolve_threads` inside agrees and a
    torch imported inside starts with ``n``) and, when torch is already imported,
    ``torch.set_num_threads``; all three are restored afterwards. Inter-op threads are left alone:
    eager training does not use that pool, and torch lets a process set it only once.
    """
    n = _parse(n, "threads")
    saved = {k: os.environ.get(k) for k in (ENV, "OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    os.environ[ENV] = os.environ["OMP_NUM_THREADS"] = str(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if before is not None:
            torch.set_num_threads(before)
