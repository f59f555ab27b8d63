"""The ``nsru`` command line (also ``python -m nsru``).

    nsru unlearn  --model PATH --forget FILE [--retain FILE] --out DIR [--config YAML] [key=value ...]
    nsru eval     --model PATH [--adapter DIR] [--forget FILE] [--retain FILE] [--mc FILE] ... [--out DIR]
    nsru subspace --model PATH --retain FILE --out DIR [key=value ...]
    nsru merge    --model PATH --adapter DIR --out DIR
    nsru export   --adapter DIR --out DIR
    nsru demo     [--scenario tofu|real] [--quick] [--seeds N] ...

One module per command (``nsru/cli/<command>.py``: ``add_parser`` and ``run``); what they share is
in :mod:`nsru.cli.common`, the run folder in :mod:`nsru.cli.rundir`. Building the parser imports
neither torch nor transformers, so ``--help`` and rejected options answer at once. Every command takes
``--threads N`` (:mod:`nsru.threads`), applied here before the command runs. Rejected input
is one line on stderr and exit status 2; a failure during the work is one line and exit status 1
(``NSRU_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys

from nsru.cli import demo, evaluate, export, merge, subspace, unlearn
from nsru.cli.common import UsageError, parse_overrides
from nsru.threads import ENV as THREADS_ENV
from nsru.threads import resolve_threads, use_threads

COMMANDS = (unlearn, evaluate, subspace, merge, export, demo)
WITH_OPTIONS = {unlearn.NAME, subspace.NAME}  # commands that take key=value options


def build_parser() -> argparse.ArgumentParser:
    from nsru import __version__

    parser = argparse.ArgumentParser(
        prog="nsru", description="Null-space constrained, response-specified unlearning of causal language models.",
        epilog="`nsru COMMAND --help` explains a command and its options. Environment: NSRU_CACHE (cache folder), "
               f"NSRU_BACKEND (reference | triton | auto), {THREADS_ENV} (torch CPU threads of every command, "
               "as --threads; default 1), NSRU_TRACEBACK=1 (tracebacks instead of one-line errors).")
    parser.add_argument("--version", action="version", version=f"nsru {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        p = module.add_parser(sub)
        if p.usage:  # the command wrote its own usage line: name the shared option there too
            p.usage += " [--threads N]"
        p.add_argument("--threads", metavar="N",
                       help=f"torch CPU threads (default: ${THREADS_ENV}, else $OMP_NUM_THREADS, else 1, which ran "
                            "3-14x faster than 2 on a busy 2-core machine; for a big model on an idle machine "
                            "without a GPU, give its physical cores)")
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    name = args.command
    try:
        if name in WITH_OPTIONS:
            overrides = parse_overrides(extra)
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see nsru {name} --help)")
        else:
            overrides = {}
        try:
            threads = resolve_threads(args.threads)
        except ValueError as e:
            raise UsageError(str(e)) from None
        with use_threads(threads):
            return args.run(args, overrides)
    except UsageError as e:
        print(f"nsru {name}: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
    except KeyboardInterrupt:
        print(f"nsru {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError, ArithmeticError) as e:
        if os.environ.get("NSRU_TRACEBACK", "0") not in ("", "0"):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"nsru {name}: error: {type(e).__name__}: {' '.join(message.split())} "
              "(NSRU_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
