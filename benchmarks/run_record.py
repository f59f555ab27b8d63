"""How the CPU benchmarks keep their runs: one JSON line per run in ``benchmarks/results/``,
stamped with the time, the machine and the torch build, so results accumulate and stay comparable."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def run_header() -> dict:
    """When and where a run happened (its load average is added by each benchmark, before and after)."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
    }


def append_run(path: Path, record: dict) -> None:
    """Append ``record`` as one JSON line to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
