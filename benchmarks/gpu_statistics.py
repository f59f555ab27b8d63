"""GPU check of the statistics ops: the CUDA ``second_moment_`` against its reference and against a
per-module ``addmm_`` loop, and ``subspace_update`` (batched eigh) against the per-module reference.

    python benchmarks/gpu_statistics.py OUT.json [--smoke]

Called by ``benchmarks/gpu_check.sh`` (60 s limit, including CUDA start-up). Writes one JSON
object: the device, whether ``nsru._C`` has its CUDA kernel, the correctness checks (max error
relative to the largest entry, upper triangle) and the timings (median of ``do_bench`` or CUDA
events) with the speedup of the grouped call over the loop. Without a GPU (or with ``--smoke``)
it runs the same steps on the CPU at small sizes so the script itself can be tested anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nsru.ops import second_moment_, second_moment_reference_, subspace_update, subspace_update_reference  # noqa: E402
from nsru.ops.backend import extension_available, extension_has_device  # noqa: E402

TOKENS = 4096
CASES = {"1024": [1024] * 8, "2048": [2048] * 8, "mixed": [512, 768, 1024, 1024, 1536, 1536, 2048, 2048]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timer(device: torch.device):
    """A function ``fn -> median seconds``: triton's do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass

        def events(fn, reps=20):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        return events

    def wall(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return wall


def loop(moments, inputs) -> None:
    for c, x in zip(moments, inputs):
        x = x.reshape(-1, c.shape[0]).to(c.dtype)
        c.addmm_(x.T, x)


def check_correctness(device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    widths = [1, 7, 64, 300, 1025, 2048]
    out = {}
    for in_name, in_dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        for c_dtype in (torch.float32, torch.float64):
            for masked in (False, True):
                xs = [torch.randn(3, 171, d, generator=g).to(in_dtype) for d in widths]
                ms = [torch.rand(3, 171, generator=g) > 0.3 for _ in widths] if masked else None
                got = [torch.zeros(d, d, dtype=c_dtype, device=device) for d in widths]
                want = [torch.zeros(d, d, dtype=torch.float64) for d in widths]
                second_moment_(got, [x.to(device) for x in xs], [m.to(device) for m in ms] if ms else None)
                second_moment_reference_(want, xs, ms)
                err = max(
                    float((torch.triu(a.double().cpu()) - torch.triu(b)).abs().max() / b.abs().max().clamp_min(1))
                    for a, b in zip(got, want)
                )
                out[f"{in_name}->{str(c_dtype)[6:]}{'/masked' if masked else ''}"] = err
    tol = {"float32": 1e-5, "float64": 1e-12}
    out["ok"] = all(v <= tol[k.split("->")[1].split("/")[0]] for k, v in out.items())
    return out


def time_second_moment(device: torch.device, smoke: bool) -> dict:
    bench = timer(device)
    tokens = 256 if smoke else TOKENS
    cases = {"mixed": [64, 96, 128]} if smoke else CASES
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    for case, widths in cases.items():
        for name, dtype in DTYPES.items():
            xs = [torch.randn(tokens, d, device=device, generator=g).to(dtype) for d in widths]
            cs = [torch.zeros(d, d, device=device) for d in widths]
            t_loop = bench(lambda: loop(cs, xs))
            t_grouped = bench(lambda: second_moment_(cs, xs))
            flops = sum(2 * tokens * d * d for d in widths)
            out[f"{case}/{name}"] = {
                "widths": widths,
                "tokens": tokens,
                "loop_s": t_loop,
                "grouped_s": t_grouped,
                "speedup": t_loop / t_grouped,
                "loop_tflops_full_product": flops / t_loop / 1e12,
            }
            del xs, cs
    return out


def _wall(device: torch.device, fn, reps: int = 2) -> float:
    """Median wall-clock seconds of ``fn`` (synchronised): for calls too long for do_bench's repeats."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_subspace_update(device: torch.device, smoke: bool) -> dict:
    widths = [64] * 4 + [96] * 2 if smoke else [1024] * 8 + [2816] * 2  # two Llama-ish layers
    g = torch.Generator(device=device).manual_seed(1)
    moments = []
    for d in widths:
        x = torch.randn(2 * d, d, device=device, generator=g)
        moments.append(x.T @ x)
    got = subspace_update(moments, "energy=0.9")
    want = subspace_update_reference(moments, "energy=0.9")
    same_ranks = [a.k for a in got] == [b.k for b in want]
    t_batched = _wall(device, lambda: subspace_update(moments, "energy=0.9"))
    t_reference = _wall(device, lambda: subspace_update_reference(moments, "energy=0.9"))
    return {
        "widths": widths,
        "same_ranks_as_reference": same_ranks,
        "batched_s": t_batched,
        "reference_s": t_reference,
        "speedup": t_reference / t_batched,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="small sizes (implied without a GPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke or not cuda
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smoke": smoke,
        "extension": extension_available(),
        "extension_has_device_kernel": extension_has_device(device),
    }
    status = 0
    for name, step in (
        ("correctness", lambda: check_correctness(device)),
        ("second_moment", lambda: time_second_moment(device, smoke)),
        ("subspace_update", lambda: time_subspace_update(device, smoke)),
    ):
        start = time.perf_counter()
        try:
            result[name] = step()
        except Exception:  # keep the other steps' results; report the failure
            result[name] = {"error": traceback.format_exc()}
            status = 1
        result[f"{name}_wall_s"] = time.perf_counter() - start
        print(name, json.dumps(result[name], indent=None)[:2000], flush=True)
    if result.get("correctness", {}).get("ok") is False:
        status = 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
