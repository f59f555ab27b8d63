"""GPU timings of the fused low-rank kernels against cuBLAS (nn.Linear) and PEFT LoRA, written as JSON.

At a Llama-7B MLP projection: M = 8192 tokens, K = 4096, N = 11008, rank 16, bf16 X and W, fp32
adapters, no bias, a retain basis of K/2 columns. Every time is the median of
``triton.testing.do_bench`` in one run, so the ratios compare like with like::

    python benchmarks/gpu_kernels.py OUT.json            # on a GPU
    python benchmarks/gpu_kernels.py OUT.json --smoke    # tiny shapes on the CPU (interpreter, wall clock)

Issue 3's targets: fused forward <= 1.05x nn.Linear; forward+backward <= 1.10x a frozen nn.Linear's
(which still computes dX). The JSON also holds each sub-kernel's time, the autotuner's choices and
the fused kernels' error against an fp32 reference at the full shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import copy_linear, forward_step, peft_lora, train_step  # noqa: E402

FULL = {"tokens": 8192, "in_features": 4096, "out_features": 11008, "rank": 16, "alpha": 32}
SMOKE = {"tokens": 40, "in_features": 48, "out_features": 80, "rank": 16, "alpha": 32}
TARGETS = {"forward": 1.05, "forward+backward": 1.10}


def _timer(device: torch.device):
    """``do_bench`` (median ms) on a GPU; a wall-clock median elsewhere (the smoke run checks plumbing, not speed)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn, rounds=3):
        fn()
        ts = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
        return statistics.median(ts)

    return wall


def _best_configs() -> dict:
    from nsru.kernels import lowrank_linear as lk

    out = {}
    for name in ("_fused_lowrank_gemm_kernel", "_skinny_gemm_kernel"):
        tuner = getattr(lk, name)
        out[name] = {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
    return out


def run(shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    import nsru
    from nsru.kernels.lowrank_linear import (
        _fused_gemm,
        _skinny_gemm,
        lowrank_linear_backward_triton,
        lowrank_linear_forward_triton,
    )
    from nsru.ops import lowrank_linear_backward_reference, lowrank_linear_forward_reference, null_space_factor

    bench = _timer(device)
    m, k, n, r = shape["tokens"], shape["in_features"], shape["out_features"], shape["rank"]
    scaling = shape["alpha"] / r
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    layer = nsru.NSRULinear.from_linear(copy_linear(linear), r=r, alpha=shape["alpha"])
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    layer.set_retain_basis(torch.linalg.qr(torch.randn(k, k // 2, device=device))[0])
    peft_layer = peft_lora(copy_linear(linear), r, shape["alpha"])

    x = torch.randn(m, k, device=device, dtype=dtype)
    dy = torch.randn(m, n, device=device, dtype=dtype) / n**0.5
    w = linear.weight
    a_tilde = null_space_factor(layer.lora_A.detach(), layer.retain_basis)
    b = layer.lora_B.detach()

    result = {"shape": dict(shape, dtype=str(dtype).replace("torch.", ""), bias=False, basis_columns=k // 2)}

    # ---- forward
    s = torch.empty(m, r, device=device)
    y = torch.empty(m, n, device=device, dtype=dtype)
    forward = {
        "nn.Linear (cuBLAS)": lambda: F.linear(x, w),
        "NSRU fused forward (triton: S kernel + fused GEMM)": lambda: lowrank_linear_forward_triton(x, w, None, a_tilde, b, scaling),
        "  S = X Ã^T (skinny kernel)": lambda: _skinny_gemm(x, a_tilde, s, 1.0),
        "  fused GEMM alone": lambda: _fused_gemm(x, w, None, s, b, y, scaling),
        "NSRU reference forward (cuBLAS + torch)": lambda: lowrank_linear_forward_reference(x, w, None, a_tilde, b, scaling),
        "NSRULinear forward (op, no grad)": forward_step(layer, x),
        "PEFT LoRA forward (no grad)": forward_step(peft_layer, x),
    }  # fmt: skip
    result["forward_ms"] = {name: bench(fn) for name, fn in forward.items()}

    # ---- backward kernels alone
    _, s_full = lowrank_linear_forward_triton(x, w, None, a_tilde, b, scaling)
    t = torch.empty(m, r, device=device)
    dx = torch.empty(m, k, device=device, dtype=dtype)
    backward = {
        "dX = dY W (cuBLAS)": lambda: dy @ w,
        "NSRU fused backward (triton: dY·B, dB, dÃ, fused dX GEMM)": lambda: lowrank_linear_backward_triton(dy, x, w, a_tilde, b, s_full, scaling, True),
        "  T = dY B (skinny)": lambda: _skinny_gemm(dy, b.T, t, 1.0),
        "  dB = s dY^T S (skinny)": lambda: _skinny_gemm(dy.T, s_full.T, torch.empty_like(b), scaling),
        "  dÃ = s T^T X (skinny)": lambda: _skinny_gemm(x.T, t.T, torch.empty_like(a_tilde).T, scaling),
        "  fused dX GEMM alone": lambda: _fused_gemm(dy, w.T, None, t, a_tilde.T, dx, scaling),
        "NSRU reference backward (cuBLAS + torch)": lambda: lowrank_linear_backward_reference(dy, x, w, a_tilde, b, s_full, scaling, True),
    }  # fmt: skip
    result["backward_ms"] = {name: bench(fn) for name, fn in backward.items()}

    # ---- forward + backward through the layers (dX always computed, as inside a network)
    layers = {"nn.Linear (frozen, cuBLAS)": linear, "NSRULinear (triton)": layer, "PEFT LoRA": peft_layer}
    fwd_bwd = {name: train_step(mod, x, dy) for name, mod in layers.items()}
    result["forward+backward_ms"] = {name: bench(fn) for name, fn in fwd_bwd.items()}
    previous = os.environ.get("NSRU_BACKEND")
    os.environ["NSRU_BACKEND"] = "reference"
    try:
        result["forward+backward_ms"]["NSRULinear (reference path: cuBLAS + torch)"] = bench(fwd_bwd["NSRULinear (triton)"])
    finally:
        if previous is None:
            os.environ.pop("NSRU_BACKEND")
        else:
            os.environ["NSRU_BACKEND"] = previous

    # ---- project_rows_: one module (what the autograd function does per layer) and one grouped
    # call over the seven projections of `layers` Llama layers (what the trainer does per step).
    # U need not be orthonormal for timing; it is scaled so repeated application stays finite.
    from nsru.kernels.project_rows import project_rows_triton_
    from nsru.ops import project_rows_reference_

    def module(width):
        return torch.randn(r, width, device=device), torch.randn(width, width // 2, device=device) / width
    layers_n = 8 if device.type == "cuda" else 1
    one = [module(k)]
    group = [module(width) for _ in range(layers_n) for width in [k] * 6 + [n]]
    result["project_rows_ms"] = {
        "one module (r=16, in=K, k=K/2): triton": bench(lambda: project_rows_triton_(*zip(*one))),
        "one module: torch": bench(lambda: project_rows_reference_(*zip(*one))),
        f"{len(group)} modules ({layers_n} layers x 7, k=in/2): triton, one launch": bench(lambda: project_rows_triton_(*zip(*group))),
        f"{len(group)} modules: torch loop": bench(lambda: project_rows_reference_(*zip(*group))),
    }  # fmt: skip
    del one, group

    # ---- ratios and targets
    fwd, fb = result["forward_ms"], result["forward+backward_ms"]
    base_f, base_fb = fwd["nn.Linear (cuBLAS)"], fb["nn.Linear (frozen, cuBLAS)"]
    result["ratios_to_nn_linear"] = {
        "forward": {name: round(v / base_f, 4) for name, v in fwd.items() if not name.startswith("  ")},
        "forward+backward": {name: round(v / base_fb, 4) for name, v in fb.items()},
    }
    fused_f = fwd["NSRU fused forward (triton: S kernel + fused GEMM)"] / base_f
    fused_fb = fb["NSRULinear (triton)"] / base_fb
    result["targets"] = {
        "forward": {"ratio": round(fused_f, 4), "target": TARGETS["forward"], "met": fused_f <= TARGETS["forward"]},
        "forward+backward": {
            "ratio": round(fused_fb, 4),
            "target": TARGETS["forward+backward"],
            "met": fused_fb <= TARGETS["forward+backward"],
        },
    }
    flops = 2 * m * k * n
    result["nn_linear_tflops"] = round(flops / (base_f * 1e-3) / 1e12, 1)

    # ---- accuracy at the full shape against an fp32 reference on the same rounded inputs
    y_t, s_t = lowrank_linear_forward_triton(x, w, None, a_tilde, b, scaling)
    y_ref, _ = lowrank_linear_forward_reference(x.float(), w.float(), None, a_tilde, b, scaling)
    grads = lowrank_linear_backward_triton(dy, x, w, a_tilde, b, s_t, scaling, True)
    refs = lowrank_linear_backward_reference(dy.float(), x.float(), w.float(), a_tilde, b, s_t, scaling, True)
    result["max_relative_error_vs_fp32"] = {
        name: float((got.float() - want).norm() / want.norm())
        for name, got, want in zip(("Y", "dX", "dÃ", "dB"), (y_t, *grads), (y_ref, *refs))
    }
    result["autotuned_configs"] = _best_configs()
    return result


def run_tma(shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The TMA variant of the fused GEMMs (NSRU_TRITON_TMA=1), timed after everything else is saved:
    it has not run on a GPU before, and a fault there would end the process."""
    import nsru
    from nsru.kernels import lowrank_linear as lk

    bench = _timer(device)
    m, k, n, r = shape["tokens"], shape["in_features"], shape["out_features"], shape["rank"]
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    layer = nsru.NSRULinear.from_linear(copy_linear(linear), r=r, alpha=shape["alpha"])
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    x = torch.randn(m, k, device=device, dtype=dtype)
    dy = torch.randn(m, n, device=device, dtype=dtype) / n**0.5
    w, b = linear.weight, layer.lora_B.detach()
    a_tilde = layer.lora_A.detach()
    s = x.float() @ a_tilde.T
    y, y_tma = (torch.empty(m, n, device=device, dtype=dtype) for _ in range(2))
    dx, dx_tma = (torch.empty(m, k, device=device, dtype=dtype) for _ in range(2))
    t = dy.float() @ b
    out = {"errors_vs_pointer_kernel": {}}
    lk._fused_gemm(x, w, None, s, b, y, 2.0, tma=False)
    lk._fused_gemm(x, w, None, s, b, y_tma, 2.0, tma=True)
    lk._fused_gemm(dy, w.T, None, t, a_tilde.T, dx, 2.0, tma=False)
    lk._fused_gemm(dy, w.T, None, t, a_tilde.T, dx_tma, 2.0, tma=True)
    out["errors_vs_pointer_kernel"] = {
        "Y": float((y_tma.float() - y.float()).norm() / y.float().norm()),
        "dX": float((dx_tma.float() - dx.float()).norm() / dx.float().norm()),
    }
    step = train_step(layer, x, dy)

    def with_tma(fn):
        def run():
            lk.TMA = True
            try:
                return fn()
            finally:
                lk.TMA = False

        return run

    out["ms"] = {
        "nn.Linear (cuBLAS)": bench(lambda: F.linear(x, w)),
        "fused GEMM alone, pointer kernel": bench(lambda: lk._fused_gemm(x, w, None, s, b, y, 2.0, tma=False)),
        "fused GEMM alone, TMA kernel": bench(lambda: lk._fused_gemm(x, w, None, s, b, y_tma, 2.0, tma=True)),
        "dX = dY W (cuBLAS)": bench(lambda: dy @ w),
        "fused dX GEMM alone, pointer kernel": bench(lambda: lk._fused_gemm(dy, w.T, None, t, a_tilde.T, dx, 2.0, tma=False)),
        "fused dX GEMM alone, TMA kernel": bench(lambda: lk._fused_gemm(dy, w.T, None, t, a_tilde.T, dx_tma, 2.0, tma=True)),
        "NSRULinear forward+backward, pointer kernels": bench(step),
        "NSRULinear forward+backward, TMA kernels": bench(with_tma(step)),
    }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp16, on whatever device there is")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no GPU: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before nsru.kernels is imported
        os.environ["NSRU_BACKEND"] = "triton"
    import triton

    shape, dtype = (SMOKE, torch.float16) if args.smoke else (FULL, torch.bfloat16)
    started = time.time()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
    }
    result.update(run(shape, device, dtype))
    result["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    try:
        result["tma"] = run_tma(shape, device, dtype)
    except Exception as exc:  # recorded, not raised: the main results are already on disk
        result["tma"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for mode in ("forward", "forward+backward"):
        print(mode)
        for name, ratio in result["ratios_to_nn_linear"][mode].items():
            print(f"  {ratio:7.3f}x  {name}")
        print(f"  target {result['targets'][mode]}")
    print("errors vs fp32:", result["max_relative_error_vs_fp32"])
    print("TMA variant:", json.dumps(result["tma"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
