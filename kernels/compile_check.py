"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

The interpreter checks what the kernels compute, not whether they compile: block shapes, dtypes
of ``tl.dot`` operands and shared-memory needs are only checked by the real compiler. This module
runs Triton's compiler (and the ``ptxas`` bundled with it) for a target such as sm_90, so a CPU
machine catches what would otherwise only fail on the GPU, and reports shared memory and whether
the GEMMs got Hopper's ``wgmma``::

    python -m nsru.kernels.compile_check            # a few configurations, sm_90
    python -m nsru.kernels.compile_check --all      # every autotuning configuration

It must run without ``TRITON_INTERPRET=1`` (interpreted functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _jit_function(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    # what Triton assumes of a launch with aligned pointers and sizes that are multiples of 16
    unaligned = {"scaling", "scale", "R", "M_BUCKET"}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in constexprs and name not in unaligned
    }
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    tma = "cp.async.bulk.tensor" in ptx
    return {
        "kernel": fn.__name__,
        "dtypes": sorted({t for t in types.values() if t.startswith("*")}),
        "constexprs": {k: str(v) for k, v in constexprs.items() if k.isupper()},
        "shared_bytes": compiled.metadata.shared,
        "mma": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none",
        "tma": tma,
        "seconds": round(time.perf_counter() - start, 2),
    }


def check(arch: int = 90, every_config: bool = False) -> list[dict]:
    """Compile each kernel for ``sm_<arch>``; raise on the first failure. Returns one row per compile."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    import triton.language as tl

    from nsru.kernels import lowrank_linear as lk
    from nsru.kernels import project_rows as pk

    rows = []
    gemm_lists = {
        ("bf16", "tf32"): lk._GEMM_16BIT,
        ("fp16", "tf32"): lk._GEMM_16BIT,
        ("fp32", "tf32"): lk._GEMM_TF32,
        ("fp32", "ieee"): lk._GEMM_F32_IEEE,
    }
    quick = {("bf16", "tf32"), ("fp32", "tf32")}
    for (dtype, precision), configs in gemm_lists.items():
        if not every_config:
            if (dtype, precision) not in quick:
                continue
            configs = configs[:1]
        for config in configs:
            # forward (X, W row-major) and backward (dY row-major, W read as Wᵀ) orientations
            for unit_strides in (("stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_yn"),
                                 ("stride_xk", "stride_wn", "stride_sr", "stride_bn", "stride_yn")):  # fmt: skip
                types = {
                    "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                    "s_ptr": "*fp32", "b_ptr": "*fp32", "scaling": "fp32",
                }  # fmt: skip
                constexprs = dict.fromkeys(unit_strides, 1)
                constexprs.update(
                    HAS_BIAS=unit_strides[1] == "stride_wk",
                    LOWRANK_BF16=dtype == "bf16",
                    MAIN_PRECISION=precision,
                    BLOCK_R=128 if every_config else 16,
                    EVEN_K=True,
                    EVEN_MNK=unit_strides[1] == "stride_wk",  # the masked main loop in the other orientation
                    **config.kwargs,
                )
                rows.append(_compile(lk._fused_lowrank_gemm_kernel, types, constexprs, arch, config.num_warps, config.num_stages))
    # the TMA variant of the fused GEMM, both orientations
    for dtype, configs in (("bf16", lk._GEMM_16BIT), ("fp32", lk._GEMM_TF32)):
        for config in configs if every_config else configs[:1]:
            bm, bn, bk = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            for w_kn in (False, True):
                w_block = (bk, bn) if w_kn else (bn, bk)
                types = {
                    "x_desc": f"tensordesc<{dtype}[{bm}, {bk}]>",
                    "w_desc": f"tensordesc<{dtype}[{w_block[0]}, {w_block[1]}]>",
                    "y_desc": f"tensordesc<{dtype}[{bm}, {bn}]>",
                    "bias_ptr": f"*{dtype}", "s_ptr": "*fp32", "b_ptr": "*fp32", "scaling": "fp32",
                }  # fmt: skip
                constexprs = dict(stride_sr=1, stride_bn=1, stride_bias=1, HAS_BIAS=not w_kn, LOWRANK_BF16=dtype == "bf16",
                                  MAIN_PRECISION="tf32", W_KN=w_kn, BLOCK_R=16, **config.kwargs)  # fmt: skip
                rows.append(_compile(lk._fused_lowrank_gemm_tma_kernel, types, constexprs, arch, config.num_warps, config.num_stages))
    skinny = lk._skinny_configs()
    for dtype in ("bf16", "fp32"):
        for config in skinny if every_config else skinny[:1]:
            types = {"p_ptr": f"*{dtype}", "q_ptr": "*fp32", "out_ptr": "*fp32", "scale": "fp32"}
            constexprs = dict(stride_pk=1, stride_qk=1, stride_or=1, PRECISION=lk._ADAPTER_PRECISION, BLOCK_R=16,
                              EVEN_K=True, **config.kwargs)  # fmt: skip
            rows.append(_compile(lk._skinny_gemm_kernel, types, constexprs, arch, config.num_warps, config.num_stages))
    for g_dtype in (tl.float32, tl.bfloat16) if every_config else (tl.float32,):
        constexprs = dict(TABLE_COLUMNS=pk._TABLE_COLUMNS, G_DTYPE=g_dtype, U_DTYPE=tl.float32, BLOCK_R=pk.BLOCK_ROWS,
                          BLOCK_B=pk.BLOCK_BASIS, BLOCK_C=pk.BLOCK_COLUMNS)  # fmt: skip
        rows.append(_compile(pk._project_rows_kernel, {"table_ptr": "*i64"}, constexprs, arch, pk.NUM_WARPS, 2))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: Hopper)")
    parser.add_argument("--all", action="store_true", help="every autotuning configuration (slow: minutes)")
    args = parser.parse_args(argv)
    for row in check(args.arch, args.all):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
