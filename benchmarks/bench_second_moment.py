"""Grouped ``second_moment_`` (one call for every module) vs a per-module torch ``addmm_`` loop.

The loop is what a user would write: ``C.addmm_(x.float().T, x.float())`` per module. Inputs are
fp32 or bf16, statistics fp32; 2048 tokens on the CPU (the C++ extension), 8192 and Llama-7B
widths on CUDA. Issue 11's target: the grouped call >= 1.5x the loop (time <= 0.67x) at every
width >= 1024, with no more peak memory.

    pytest benchmarks/bench_second_moment.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import cases

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 1 / 1.5


def _grouped(moments, inputs) -> None:
    from nsru.ops import second_moment_

    second_moment_(moments, inputs)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(cases.SECOND_MOMENT_CASES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_second_moment(paired, device, case, dtype, impl):
    moments, inputs = cases.second_moment_inputs(cases.SECOND_MOMENT_CASES[case], DTYPES[dtype], device)
    fns = {
        "loop": cases.synced(lambda: cases.second_moment_loop(moments, inputs), device),
        "grouped": cases.synced(lambda: _grouped(moments, inputs), device),
    }
    widths = "+".join(str(x.shape[-1]) for x in inputs)
    paired(
        fns[impl], fns["loop"],
        group=f"second_moment_ {case} {device} {dtype} ({inputs[0].shape[0]} tokens, widths {widths})",
        label=impl, baseline_label="loop", target=TARGET if impl == "grouped" else None,
        rounds=3, memory_device=device,
    )  # fmt: skip
