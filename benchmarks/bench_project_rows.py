"""Grouped ``project_rows_`` (one call for every module) vs a per-module loop of the torch reference.

The case is what the trainer projects after each step: the ``lora_A`` rows (r = 16) of every
projection of 4 Llama layers at a quarter of 7B's width on the CPU (8 full-width layers on CUDA),
each against a retain basis of half its width. On the CPU both sides run the same torch GEMMs (the
grouped op loops inside), so the ratio shows the cost of the op's dispatch; on CUDA the grouped
call is one Triton launch (``NSRU_BACKEND=triton`` forces it; ``auto`` takes it when the group
fills the GPU, see ``nsru/ops/project_rows.py``).

    pytest benchmarks/bench_project_rows.py --benchmark-only
"""

from __future__ import annotations

import pytest

import cases


def _grouped(grads, bases) -> None:
    from nsru.ops import project_rows_

    project_rows_(grads, bases)


def _loop(grads, bases) -> None:
    from nsru.ops import project_rows_reference_

    for g, u in zip(grads, bases):
        project_rows_reference_([g], [u])


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_project_rows(paired, device, impl):
    grads, bases = cases.project_rows_case(device)
    fns = {
        "loop": cases.synced(lambda: _loop(grads, bases), device),
        "grouped": cases.synced(lambda: _grouped(grads, bases), device),
    }
    paired(
        fns[impl], fns["loop"],
        group=f"project_rows_ {device} ({len(grads)} modules, r=16, k=in/2)",
        label=impl, baseline_label="loop",
    )  # fmt: skip
