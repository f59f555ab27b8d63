"""Grouped ``second_moment_`` (the C++ op) vs a per-module torch ``addmm_`` loop, on the CPU.

Eight modules, 4096 tokens, fp32 statistics, fp32 and bf16 inputs; the module widths are either
one width for all eight (512, 1024 or 2048) or the mixed set 512-2048. The loop is what a user
would write: ``C.addmm_(x.float().T, x.float())`` per module. Target (issue 4): the grouped call
>= 1.5x faster at width >= 1024, with no more peak memory.

Speeds are ratios measured in one run, interleaved round by round, summarised as the median of
the per-round ratios (the machine is shared and noisy). Peak memory is the growth of the resident
set of a fresh process at its peak during the call, after the inputs exist::

    python benchmarks/bench_second_moment.py          # prints, appends to benchmarks/results/second_moment_cpu.jsonl
    python -m pytest benchmarks/bench_second_moment.py  # pytest-benchmark timings, plus the ratios with -s
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TOKENS = 4096
WIDTHS = {
    "512": [512] * 8,
    "1024": [1024] * 8,
    "2048": [2048] * 8,
    "mixed": [512, 768, 1024, 1024, 1536, 1536, 2048, 2048],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 1.5
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_record import RESULTS_DIR, append_run, run_header  # noqa: E402

RESULTS = RESULTS_DIR / "second_moment_cpu.jsonl"


def make_case(widths: list[int], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(TOKENS, d, generator=g).to(dtype) for d in widths]
    moments = [torch.zeros(d, d) for d in widths]
    return moments, inputs


def grouped(moments, inputs) -> None:
    from nsru.ops import second_moment_

    second_moment_(moments, inputs)


def loop(moments, inputs) -> None:
    for c, x in zip(moments, inputs):
        x = x.to(c.dtype)
        c.addmm_(x.T, x)


IMPLS = {"loop": loop, "grouped": grouped}


def interleaved(widths, dtype, rounds: int, warmup: int = 1) -> dict:
    moments, inputs = make_case(widths, dtype)
    for _ in range(warmup):
        for fn in IMPLS.values():
            fn(moments, inputs)
    wall = {name: [] for name in IMPLS}
    for _ in range(rounds):
        for name, fn in IMPLS.items():
            start = time.perf_counter()
            fn(moments, inputs)
            wall[name].append(time.perf_counter() - start)
    return {
        "loop_median_s": statistics.median(wall["loop"]),
        "grouped_median_s": statistics.median(wall["grouped"]),
        "speedup_median_of_rounds": statistics.median(b / t for t, b in zip(wall["grouped"], wall["loop"])),
        "speedup_of_mins": min(wall["loop"]) / min(wall["grouped"]),
    }


_PEAK_SNIPPET = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_second_moment import IMPLS, WIDTHS, DTYPES, make_case
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
torch.set_num_threads({threads})
moments, inputs = make_case(WIDTHS[{widths!r}], DTYPES[{dtype!r}])
IMPLS["grouped"](moments[:1], inputs[:1])  # load the extension and BLAS before measuring
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
before = kib("VmRSS:")
IMPLS[{impl!r}](moments, inputs)
print((kib("VmHWM:") - before) * 1024)
"""


def peak_growth(impl: str, widths: str, dtype: str, threads: int) -> int:
    """Bytes by which the call raises the resident set of a fresh process at its peak.

    Large blocks are served by mmap (fixed threshold), so freed temporaries leave the resident set
    and the peak (VmHWM, reset just before the call) shows each implementation's own transients.
    """
    root = str(Path(__file__).resolve().parent.parent)
    code = _PEAK_SNIPPET.format(root=root, impl=impl, widths=widths, dtype=dtype, threads=threads)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def measure(rounds: int, threads: int, cases: list[tuple[str, str]], memory: bool = True) -> dict:
    torch.set_num_threads(threads)
    result = {
        **run_header(),
        "threads": threads,
        "tokens": TOKENS,
        "rounds": rounds,
        "load_average_before": os.getloadavg()[0],
        "cases": {},
    }
    for widths, dtype in cases:
        row = interleaved(WIDTHS[widths], DTYPES[dtype], rounds)
        row["widths"] = WIDTHS[widths]
        if memory:
            row["peak_growth_loop_bytes"] = peak_growth("loop", widths, dtype, threads)
            row["peak_growth_grouped_bytes"] = peak_growth("grouped", widths, dtype, threads)
        result["cases"][f"{widths}/{dtype}"] = row
    result["load_average_after"] = os.getloadavg()[0]
    return result


def print_table(result: dict) -> None:
    print(
        f"second_moment_: 8 modules, {result['tokens']} tokens, fp32 statistics, threads={result['threads']}, "
        f"rounds={result['rounds']}, load average {result['load_average_before']:.1f} -> "
        f"{result['load_average_after']:.1f}; target >= {TARGET}x at width >= 1024"
    )
    for name, row in result["cases"].items():
        mem = ""
        if "peak_growth_loop_bytes" in row:
            mem = (
                f"   peak +{row['peak_growth_loop_bytes'] / 2**20:6.1f} MiB (loop) "
                f"+{row['peak_growth_grouped_bytes'] / 2**20:6.1f} MiB (grouped)"
            )
        print(
            f"  {name:11s} loop {row['loop_median_s'] * 1e3:8.1f} ms  grouped {row['grouped_median_s'] * 1e3:8.1f} ms  "
            f"speedup {row['speedup_median_of_rounds']:.2f}x (median of rounds), {row['speedup_of_mins']:.2f}x (of minima)"
            + mem
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    cases = [(w, d) for d in args.dtypes for w in args.widths]
    result = measure(args.rounds, args.threads, cases, memory=not args.no_memory)
    print_table(result)
    if not args.no_save:
        append_run(RESULTS, result)
    return 0


# ---------------------------------------------------------------- under pytest (pytest-benchmark)

try:
    import pytest
except ImportError:  # pragma: no cover - running as a script
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module", autouse=True)
    def _threads():
        before = torch.get_num_threads()
        torch.set_num_threads(int(os.environ.get("NSRU_BENCH_THREADS", "2")))
        yield
        torch.set_num_threads(before)

    @pytest.mark.parametrize("impl", list(IMPLS))
    @pytest.mark.parametrize("widths", ["1024", "mixed"])
    @pytest.mark.parametrize("dtype", list(DTYPES))
    def test_second_moment(benchmark, impl, widths, dtype):
        benchmark.group = f"second_moment_ {widths} {dtype}"
        moments, inputs = make_case(WIDTHS[widths], DTYPES[dtype])
        benchmark.pedantic(IMPLS[impl], args=(moments, inputs), rounds=3, warmup_rounds=1, iterations=1)

    @pytest.mark.parametrize("dtype", list(DTYPES))
    def test_second_moment_speedup(dtype):
        """Interleaved speedup of the grouped call at width 1024 (printed with -s)."""
        row = interleaved(WIDTHS["1024"], DTYPES[dtype], rounds=3)
        print(f"\nsecond_moment_ 8x1024 {dtype}: grouped {row['speedup_median_of_rounds']:.2f}x the addmm_ loop")


if __name__ == "__main__":
    sys.exit(main())
