"""The ratio table of a benchmark run, from pytest-benchmark's JSON (or from the live session).

Every group compares implementations of one thing against a baseline row of the same group
(``extra_info["baseline"]``). Two ratios per row, both from the same run:

* **paired**: the median over rounds of ``time / baseline time``, where each round timed the
  baseline right before the row's own call (``paired`` fixture in ``benchmarks/conftest.py``);
  on a shared, noisy machine this is the steady one, and the one the targets are checked against;
* **of medians**: the row's median over the baseline row's median (the rows ran one after the other).

::

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

REAL_BASELINE = "graddiff"


def _rows(benchmarks: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    return groups


def ratio_rows(benchmarks: Iterable[Mapping]) -> list[dict]:
    """One dict per benchmark: group, label, median seconds, the two ratios, peak memory, target."""
    out = []
    for group, rows in _rows(benchmarks).items():
        base = next((r for r in rows if r["extra_info"].get("is_baseline")), None)
        base_median = base["stats"]["median"] if base else None
        base_peak = base["extra_info"].get("peak_bytes") if base else None
        for r in rows:
            info = r["extra_info"]
            median = r["stats"]["median"]
            peak = info.get("peak_bytes")
            row = {
                "group": group,
                "label": info.get("label", r["name"]),
                "baseline": info.get("baseline_label"),
                "median_s": median,
                "paired": info.get("paired_ratio"),
                "of_medians": median / base_median if base_median else None,
                "peak_bytes": peak,
                # a ratio to less than 1 MiB says nothing
                "peak_ratio": peak / base_peak if peak is not None and base_peak and base_peak >= 2**20 else None,
                "target": info.get("target"),
            }
            ratio = row["paired"] if row["paired"] is not None else row["of_medians"]
            row["met"] = None if row["target"] is None or ratio is None else ratio <= row["target"]
            out.append(row)
    return out


def real_model_times(path: str | os.PathLike | None = None) -> dict:
    """Unlearning wall time per method of the real-model scenario (``nsru/bench/real.py``), read
    from its ``results.json``: ``path``, else ``$NSRU_REAL_RESULTS``, else ``nsru-demo-real/results.json``
    (in the repository or the working directory), else the committed ``benchmarks/results/real_smollm2/``. Not timed by the suite: a run takes many minutes.
    Returns ``{"skipped": reason}`` when there is no such file."""
    root = Path(__file__).resolve().parent.parent
    candidates = [path, os.environ.get("NSRU_REAL_RESULTS"), root / "nsru-demo-real" / "results.json",
                  Path("nsru-demo-real") / "results.json", root / "benchmarks" / "results" / "real_smollm2" / "results.json"]
    found = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        return {"skipped": "no real-model results: run `nsru demo --scenario real` (nsru/bench/real.py) "
                           "or set NSRU_REAL_RESULTS to its results.json"}
    data = json.loads(found.read_text())
    seconds = {name: row["seconds"] for name, row in data.get("models", {}).items() if row.get("seconds")}
    base = seconds.get(REAL_BASELINE)
    return {
        "source": str(found),
        "config": data.get("config", {}),
        "baseline": REAL_BASELINE,
        "methods": {name: {"seconds": s, "ratio": s / base if base else None} for name, s in seconds.items()},
    }


def extra_lines(extra: Mapping | None) -> list[str]:
    """The real-model wall times (see :func:`real_model_times`) as printed lines."""
    real = (extra or {}).get("real_model")
    if not real:
        return []
    if "skipped" in real:
        return [f"real-model unlearning wall time: skipped ({real['skipped']})"]
    lines = [f"real-model unlearning wall time per method (from {real['source']}, {real['config']}; "
             f"ratio to {real['baseline']}):"]
    for name, row in real["methods"].items():
        ratio = "–" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
        lines.append(f"  {name:24s} {row['seconds']:8.1f} s   {ratio}")
    return lines


def _fmt(x, spec=".3f", none="–") -> str:
    return none if x is None else format(x, spec)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["group", "implementation", "median", "× baseline (paired)", "× baseline (medians)", "peak mem", "target", "met"]
    lines = []
    group = None
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = "–"
        if r["peak_bytes"] is not None:
            peak = f"{r['peak_bytes'] / 2**20:.1f} MiB"
            if r["peak_ratio"] is not None:
                peak += f" ({r['peak_ratio']:.2f}×)"
        cells = [
            r["group"],
            r["label"] + (" (baseline)" if r["baseline"] == r["label"] else ""),
            f"{r['median_s'] * 1e3:.1f} ms",
            _fmt(r["paired"]),
            _fmt(r["of_medians"]),
            peak,
            "–" if r["target"] is None else f"≤ {r['target']:.2f}",
            "–" if r["met"] is None else ("yes" if r["met"] else "**no**" if markdown else "NO"),
        ]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            if cells[0] != group:
                group = cells[0]
                lines.append(group)
            lines.append(f"  {cells[1]:44s} {cells[2]:>11s} {cells[3]:>8s} {cells[4]:>8s} {cells[5]:>16s} "
                         f"{cells[6]:>7s} {cells[7]:>4s}")
    if not markdown:
        header = (f"  {'implementation':44s} {'median':>11s} {'paired':>8s} {'medians':>8s} {'peak mem':>16s} "
                  f"{'target':>7s} {'met':>4s}")
        lines = [header, "-" * len(header)] + lines
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ratio table of a pytest-benchmark JSON file")
    parser.add_argument("json", help="file written by --benchmark-json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    info = data.get("nsru", {})
    print(", ".join(f"{k}: {info[k]}" for k in ("machine", "device", "torch", "threads", "load_average") if k in info))
    print(format_table(ratio_rows(data["benchmarks"]), args.markdown))
    info = {**info, "real_model": real_model_times()}  # the newest results, not those found when the suite ran
    for line in extra_lines(info):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
