"""The ``nsru`` command line.

    nsru demo [--quick] [--seeds N] [--out DIR] [--cache DIR] [--steps N] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from nsru.bench.demo import METHODS, run_demo

    methods = METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        from nsru.methods import get_method

        for m in methods:
            get_method(m)  # a clear error for an unknown name before anything runs
    if args.seeds < 1:
        print("nsru demo: --seeds must be at least 1", file=sys.stderr)
        return 2
    run_demo(out=args.out, seeds=args.seeds, quick=args.quick, methods=methods, cache=args.cache, steps=args.steps,
             lr=args.lr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsru", description="Null-space constrained, response-specified unlearning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="NSRU vs baselines vs ablations on the offline TOFU/WMDP-style world",
        description="Builds (or loads from the cache) the tiny target models, runs NSRU, the baselines and the "
                    "ablations in a TOFU-style and a WMDP-style scenario, prints a table, and writes results.json "
                    "and a forget-quality vs model-utility plot.",
    )
    demo.add_argument("--quick", action="store_true", help="fewer unlearning steps (about 90 s)")
    demo.add_argument("--seeds", type=int, default=1, help="seeds per method (means and *_std in results.json)")
    demo.add_argument("--out", default="nsru-demo", help="output directory (default: ./nsru-demo)")
    demo.add_argument("--cache", default=None, help="model cache (default: $NSRU_CACHE or ~/.cache/nsru)")
    demo.add_argument("--steps", type=int, default=None, help="unlearning steps per run (default 60; --quick 20)")
    demo.add_argument("--lr", type=float, default=None, help="unlearning learning rate for every method")
    demo.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
