"""NSRULinear vs nn.Linear vs PEFT LoRA on the CPU: forward and forward+backward.

The shape is a Llama MLP projection scaled to two cores: M = 2048 tokens, K = 1024, N = 2816,
rank 16, fp32, two threads. ``nn.Linear`` is frozen (the physical floor: its GEMM, and in the
backward the dX GEMM that any layer inside a network must compute). NSRULinear runs the torch
reference path of ``nsru.ops.lowrank_linear`` with a retain basis of K/2 columns; PEFT LoRA is
``peft``'s ``lora.Linear`` with the same rank and alpha.

The machine is shared and noisy, so speeds are ratios measured in one run, interleaved round by
round (each round times every layer once), and summarised as the median of the per-round ratios::

    python benchmarks/bench_layer.py                 # prints ratios, appends to benchmarks/results/layer_cpu.jsonl
    python -m pytest benchmarks/bench_layer.py       # the same layers under pytest-benchmark, plus the ratios
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

SHAPE = {"tokens": 2048, "in_features": 1024, "out_features": 2816, "rank": 16, "alpha": 32}
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_record import RESULTS_DIR, append_run, run_header  # noqa: E402

RESULTS = RESULTS_DIR / "layer_cpu.jsonl"
TARGETS = {"forward": 1.05, "forward+backward": 1.10}  # NSRULinear / nn.Linear, issue 3


def build_layers(bias: bool = True, basis_fraction: float = 0.5, seed: int = 0) -> dict[str, nn.Module]:
    """The three layers over one frozen ``nn.Linear`` (each gets its own copy), in fp32 on the CPU."""
    import nsru

    torch.manual_seed(seed)
    k, n, r = SHAPE["in_features"], SHAPE["out_features"], SHAPE["rank"]
    linear = nn.Linear(k, n, bias=bias).requires_grad_(False)

    layer = nsru.NSRULinear.from_linear(copy_linear(linear), r=r, alpha=SHAPE["alpha"])
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)  # a trained-looking B (zeros would be no different in cost)
    basis = torch.linalg.qr(torch.randn(k, int(k * basis_fraction)))[0]
    layer.set_retain_basis(basis)
    return {"nn.Linear": linear, "NSRULinear": layer, "PEFT LoRA": peft_lora(copy_linear(linear), r, SHAPE["alpha"])}


def copy_linear(linear: nn.Linear) -> nn.Linear:
    """A frozen copy of ``linear`` on its device, in its dtype."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.load_state_dict(linear.state_dict())
    return out.requires_grad_(False)


def peft_lora(linear: nn.Linear, rank: int, alpha: int) -> nn.Module:
    """PEFT's lora.Linear around ``linear`` as users get it from get_peft_model (adapters upcast to
    fp32), with a non-zero B so that its cost is a trained layer's."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = linear
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0.0, 0.02)
    return lora


def forward_step(module: nn.Module, x: torch.Tensor):
    """A callable running ``module`` on ``x`` without autograd."""

    def step():
        with torch.no_grad():
            return module(x)

    return step


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """A callable running forward and backward of ``module`` (dX always computed, as inside a
    network), with the gradients cleared first so that no accumulation is timed."""
    xg = x.detach().clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        xg.grad = None
        for p in params:
            p.grad = None
        module(xg).backward(dy)

    return step


def step_fns(layers: dict[str, nn.Module], backward: bool, seed: int = 1) -> dict[str, callable]:
    """One callable per layer: a forward, or a forward and backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE["tokens"], SHAPE["in_features"], generator=g)
    dy = torch.randn(SHAPE["tokens"], SHAPE["out_features"], generator=g)
    return {name: train_step(m, x, dy) if backward else forward_step(m, x) for name, m in layers.items()}


def interleaved_ratios(fns: dict[str, callable], rounds: int, warmup: int = 2, baseline: str = "nn.Linear") -> dict:
    """Time every callable once per round, in turn; per layer: medians, minima and ratios to ``baseline``.

    Wall-clock time is what the targets are stated in. Process CPU time (all threads) is reported
    beside it: on a shared machine a descheduled thread stalls the wall clock of every parallel
    region but adds no CPU time, so the CPU-time ratio is the steadier measure of the work done.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {}
    for name in fns:
        out[name] = {
            "median_s": statistics.median(wall[name]),
            "min_s": min(wall[name]),
            "ratio_median_of_rounds": statistics.median(t / b for t, b in zip(wall[name], wall[baseline])),
            "ratio_of_mins": min(wall[name]) / min(wall[baseline]),
            "cpu_ratio_median_of_rounds": statistics.median(t / b for t, b in zip(cpu[name], cpu[baseline])),
        }
    return out


def measure(rounds: int = 15, threads: int = 2, bias: bool = True) -> dict:
    torch.set_num_threads(threads)
    layers = build_layers(bias=bias)
    result = {
        **run_header(),
        "load_average_before": os.getloadavg()[0],
        "threads": threads,
        "rounds": rounds,
        "shape": dict(SHAPE, dtype="float32", bias=bias, basis_columns=layers["NSRULinear"].k),
    }
    for mode in ("forward", "forward+backward"):
        result[mode] = interleaved_ratios(step_fns(layers, backward=mode != "forward"), rounds)
    result["load_average_after"] = os.getloadavg()[0]
    return result


def print_table(result: dict) -> None:
    shape = result["shape"]
    print(
        f"M={shape['tokens']} K={shape['in_features']} N={shape['out_features']} r={shape['rank']} fp32 "
        f"bias={shape['bias']} threads={result['threads']} rounds={result['rounds']} "
        f"load average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f}"
    )
    for mode in ("forward", "forward+backward"):
        for name, row in result[mode].items():
            print(
                f"  {mode:17s} {name:11s} median {row['median_s'] * 1e3:8.2f} ms   x nn.Linear: "
                f"{row['ratio_median_of_rounds']:.3f} (median of rounds), {row['ratio_of_mins']:.3f} (of minima), "
                f"{row['cpu_ratio_median_of_rounds']:.3f} (CPU time)"
            )
        print(f"  {mode:17s} target for NSRULinear: <= {TARGETS[mode]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NSRULinear vs nn.Linear vs PEFT LoRA on the CPU")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bias", action="store_true", help="Llama-style projection without a bias")
    parser.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.threads, bias=not args.no_bias)
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

    @pytest.fixture(scope="module")
    def layers():
        torch.set_num_threads(int(os.environ.get("NSRU_BENCH_THREADS", "2")))
        return build_layers()

    @pytest.mark.parametrize("mode", ["forward", "forward+backward"])
    @pytest.mark.parametrize("name", ["nn.Linear", "NSRULinear", "PEFT LoRA"])
    def test_layer(benchmark, layers, name, mode):
        benchmark.group = f"layer {mode}"
        fn = step_fns(layers, backward=mode != "forward")[name]
        benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)

    def test_layer_ratios(layers):
        """Interleaved ratios in one run (what the issue's targets are stated in); printed with -s."""
        for mode in ("forward", "forward+backward"):
            ratios = interleaved_ratios(step_fns(layers, backward=mode != "forward"), rounds=10)
            print(f"\n{mode}: " + ", ".join(f"{k} {v['ratio_median_of_rounds']:.3f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    sys.exit(main())
