"""Frontiers of the real-knowledge scenario: every method at several budgets, not one point each.

One operating point says little: a method that forgets less may simply have been given less. Here
each method of :mod:`nsru.bench.real` runs at every budget of :data:`BUDGETS` (steps × learning
rate), and the report draws, per method, forget accuracy against what was kept (same-kind
neighbours, general facts). A method is better where its curve lies nearer the corner of nothing
remembered and everything kept; :func:`pareto` names the runs no other run beats on both.

``python -m nsru.bench.frontier --out DIR [--seeds N] [--methods a,b] [--budgets 20x1e-3,40x1e-2]
[--audit]``: the runs go to ``DIR/<budget>/`` (a :func:`nsru.bench.real.run_real` folder each, so
several processes may share ``DIR`` with different budgets), the report to ``DIR/frontier.json``,
``frontier.md`` and ``frontier.png``; ``--report`` only rebuilds the report from what is there.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from nsru.bench import real, report

# (steps, learning rate), weakest first; the scenario's own budget (20, 1e-2) among them.
BUDGETS = ((20, 1e-3), (20, 3e-3), (20, 1e-2), (40, 1e-2))
KEPT = ("neighbour_same_kind_acc", "general_acc")  # the x axes: what each run kept
REPORTED = ("forget_acc", "audited_forget_acc", "neighbour_acc", "neighbour_same_kind_acc", "general_acc",
            "retain_false_refusal", "neighbour_same_kind_false_refusal", "general_false_refusal", "ppl_ratio",
            "seconds")


def budget_tag(steps: int, lr: float) -> str:
    """The folder of one budget: ``steps20_lr0.001``."""
    return f"steps{steps}_lr{lr:g}"


def parse_budgets(text: str) -> list[tuple[int, float]]:
    """``"20x1e-3,40x1e-2"`` -> ``[(20, 0.001), (40, 0.01)]``; a one-line error for anything else."""
    budgets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        steps, sep, lr = part.partition("x")
        try:
            budget = (int(steps), float(lr))
        except ValueError:
            budget = None
        if not sep or budget is None or budget[0] < 1 or not budget[1] > 0:
            raise ValueError(f"budget {part!r}: expected STEPSxLR with steps >= 1 and lr > 0, e.g. 20x1e-3")
        budgets.append(budget)
    if not budgets:
        raise ValueError(f"no budget in {text!r}: expected e.g. 20x1e-3,40x1e-2")
    return budgets


def run_frontier(out, budgets: Sequence[tuple[int, float]] = BUDGETS, seeds=1, names=None, audit: bool = False,
                 log=print, **run_options) -> dict:
    """Run :func:`nsru.bench.real.run_real` once per budget into ``out/<budget>/`` and write the
    report (:func:`frontier_report`). ``run_options``: further :func:`run_real` arguments."""
    out = Path(out)
    for steps, lr in budgets:
        log(f"budget: {steps} steps at lr {lr:g}")
        real.run_real(out / budget_tag(steps, lr), seeds=seeds, names=names, steps=steps, lr=lr, audit=audit, log=log,
                      **run_options)
    return frontier_report(out, log=log)


def collect(out) -> dict[str, list[dict]]:
    """Every finished run under ``out/*/runs.jsonl``, by method: its budget (``steps``, ``lr``, read
    from the folder's ``meta.json``), seed and metrics; the runs of one method at one budget
    averaged over their seeds (``seeds`` counts them), weakest budget first."""
    grouped: dict[tuple[str, int, float], list[dict]] = {}
    for runs in sorted(Path(out).glob("*/runs.jsonl")):
        meta_path = runs.parent / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{runs.parent}: runs.jsonl without meta.json; cannot tell its budget")
        config = json.loads(meta_path.read_text())["config"]
        steps, lr = int(config["steps"]), float(config["lr"])
        for line in runs.read_text().splitlines():
            run = json.loads(line)
            name = run["name"]
            group = grouped.setdefault((name, steps if name != "before" else 0, lr if name != "before" else 0.0), [])
            if run["seed"] not in {r["seed"] for r in group}:
                group.append(run)
    curves: dict[str, list[dict]] = {}
    for (name, steps, lr), records in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1] * kv[0][2])):
        row = report.aggregate(records, REPORTED)
        curves.setdefault(name, []).append({"steps": steps, "lr": lr, "seeds": len(records), **row})
    return curves


def pareto(curves: dict[str, list[dict]], kept: str = KEPT[0], forget: str = "forget_acc") -> list[dict]:
    """The runs (method, steps, lr) that no other run beats: none forgets at least as much by
    ``forget`` *and* keeps at least as much of ``kept``, and one of the two strictly more (the
    unlearned runs that have both figures; the model before is not a candidate)."""
    points = [(name, p) for name, ps in curves.items() if name != "before" for p in ps
              if p.get(kept) is not None and p.get(forget) is not None]

    def beats(a: dict, b: dict) -> bool:
        return (a[forget] <= b[forget] and a[kept] >= b[kept]) and (a[forget] < b[forget] or a[kept] > b[kept])

    return [{"method": name, "steps": p["steps"], "lr": p["lr"], forget: p[forget], kept: p[kept]}
            for name, p in points if not any(beats(q, p) for _, q in points if q is not p)]


def frontier_report(out, log=print) -> dict:
    """``frontier.json`` (every method's points and the Pareto set per kept measure),
    ``frontier.md`` and ``frontier.png`` under ``out``."""
    out = Path(out)
    curves = collect(out)
    if not any(name != "before" for name in curves):
        raise ValueError(f"{out}: no finished run under {out}/*/runs.jsonl")
    # the audited figure where every run has one, else the forward probe: one measure for every point
    audited = all(p.get("audited_forget_acc") is not None for name, ps in curves.items() for p in ps)
    measure = "audited_forget_acc" if audited else "forget_acc"
    result = {"curves": curves, "forget_measure": measure,
              "pareto": {kept: pareto(curves, kept, measure) for kept in KEPT}}
    text = table(curves)
    (out / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "frontier.md").write_text(text + "\n")
    plot(curves, out / "frontier.png", measure)
    log("\n" + text)
    for kept, points in result["pareto"].items():
        log(f"not beaten on forgetting and {kept}: " + ", ".join(
            f"{p['method']} ({p['steps']}x{p['lr']:g})" for p in points))
    return result


def table(curves: dict[str, list[dict]]) -> str:
    """A Markdown table, a line per method and budget (mean ± standard deviation over seeds)."""
    rows = {("before" if name == "before" else f"{name} {p['steps']}x{p['lr']:g}"): p
            for name, ps in curves.items() for p in ps}
    columns = [k for k in REPORTED if any(r.get(k) is not None for r in rows.values())]
    return report.markdown_table(rows, ["seeds", *columns], "method, steps x lr",
                                 {"seeds": "{:.0f}", "seconds": "{:.0f}"})


def plot(curves: dict[str, list[dict]], path, forget_measure: str = "forget_acc") -> Path:
    """Forget accuracy against each kept measure: a line per method through its budgets (the
    weakest budget's marker hollow), the model before as its reference marker."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(KEPT), figsize=(11, 4.5), sharey=True)
    for ax, kept in zip(axes, KEPT):
        for i, (name, points) in enumerate(curves.items()):
            points = [p for p in points if p.get(kept) is not None and p.get(forget_measure) is not None]
            if not points:
                continue
            style = report.style(name, i, ("before",))
            xs, ys = [p[kept] for p in points], [p[forget_measure] for p in points]
            ax.plot(xs, ys, marker=style["marker"], color=style["color"], markersize=style["markersize"],
                    label=name, linewidth=1.2)
            ax.plot(xs[:1], ys[:1], marker=style["marker"], color="white", markersize=style["markersize"] * 0.5,
                    linestyle="none")
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{kept.replace('_acc', '').replace('_', ' ')} kept (accuracy; 1 before)")
        ax.set_xlim(-0.02, 1.05)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{forget_measure.replace('_acc', '').replace('_', ' ')} accuracy (chance 0.25, 1 before)")
    axes[0].set_ylim(-0.02, 1.05)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: forgetting against keeping, each method at several budgets "
                 "(hollow: weakest)")
    fig.tight_layout()
    return report.save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nsru.bench.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the runs and the report")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method and budget (default 1)")
    p.add_argument("--methods", default=None, help="comma-separated variants of the real scenario (default: all)")
    p.add_argument("--budgets", default=None,
                   help="comma-separated STEPSxLR (default: " + ",".join(f"{s}x{lr:g}" for s, lr in BUDGETS) + ")")
    p.add_argument("--audit", action="store_true", help="audit every model (about 10 min a model on a CPU)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the runs in --out")
    args = p.parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets) if args.budgets else list(BUDGETS)
    except ValueError as e:
        p.error(str(e))
    if not args.report:
        names = [n.strip() for n in args.methods.split(",")] if args.methods else None
        run_frontier(args.out, budgets, seeds=args.seeds, names=names, audit=args.audit)
        return 0
    frontier_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
