"""The Triton kernels compile for Hopper (sm_90) with Triton's own compiler, on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts them
(dot shapes and dtypes, shared memory of every tile) and that the GEMMs get Hopper's wgmma. It runs
in a subprocess because the test session has ``TRITON_INTERPRET=1`` set.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(_PTXAS), reason="this Triton build has no bundled ptxas")

SHARED_MEMORY_PER_BLOCK = 227 * 1024  # sm_90's opt-in maximum


def _compile_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "nsru.kernels.compile_check", *args],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [ast.literal_eval(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _check_rows(rows):
    assert rows
    for row in rows:
        assert row["shared_bytes"] <= SHARED_MEMORY_PER_BLOCK, row
        if row["kernel"].startswith("_fused_lowrank_gemm") and row["constexprs"]["MAIN_PRECISION"] != "ieee":
            assert row["mma"] == "wgmma", row
        if row["kernel"] == "_fused_lowrank_gemm_tma_kernel":
            assert row["tma"], row  # the loads and the store go through the tensor memory accelerator


def test_kernels_compile_for_hopper():
    rows = _compile_check()
    _check_rows(rows)
    assert {row["kernel"] for row in rows} == {
        "_fused_lowrank_gemm_kernel",
        "_fused_lowrank_gemm_tma_kernel",
        "_skinny_gemm_kernel",
        "_project_rows_kernel",
    }


@pytest.mark.slow
def test_every_autotuning_config_compiles_for_hopper():
    _check_rows(_compile_check("--all"))
