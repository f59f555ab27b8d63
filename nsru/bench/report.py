"""The benchmarks' reports: per-seed records to means and standard deviations, Markdown tables, plots.

* :func:`aggregate` — one row of ``{key: mean, key_std: sample standard deviation}`` from the
  records of several seeds (the ``x`` / ``x_std`` of every ``results.json``);
* :func:`markdown_table` — a Markdown table of such rows, ``mean ± std`` per cell;
* :func:`style`, :func:`pyplot`, :func:`save` — one look for every plot: a colour per model, a marker
  per kind of model (reference, NSRU, NSRU ablation, baseline), the same file format.

Used by the offline demo (:mod:`nsru.bench.demo`), the real-model scenario (:mod:`nsru.bench.real`)
and ``benchmarks/sweep_defaults.py``; each keeps only its columns and its figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["aggregate", "markdown_table", "number", "style", "pyplot", "save", "PALETTE"]

Format = str | Callable[[float], str]  # a str.format pattern ("{:.3f}") or a function of the value


def aggregate(records: Sequence[Mapping], keys: Sequence[str], std: bool = True, keep_missing: bool = False) -> dict:
    """Mean of each of ``keys`` over the ``records`` that have it (not ``None``) and, with ``std``
    and two or more of them, the sample standard deviation as ``<key>_std``. A key no record has
    is left out, or kept as ``None`` with ``keep_missing``."""
    row = {}
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if not values:
            if keep_missing:
                row[key] = None
            continue
        row[key] = statistics.fmean(values)
        if std and len(values) > 1:
            row[f"{key}_std"] = statistics.stdev(values)
    return row


def number(value: float) -> str:
    """The default cell: three decimals, three significant digits from 1000 on."""
    return f"{value:.3g}" if value >= 1000 else f"{value:.3f}"


def markdown_table(rows: Mapping[str, Mapping], columns: Sequence[str], first: str = "model",
                   formats: Mapping[str, Format] | None = None, default: Format = number, std_format: Format = "{:.2g}",
                   missing: str = "–") -> str:
    """A Markdown table: a line per ``rows`` entry (its name first), a cell per column.

    A cell is the value in ``formats[column]`` (``default`` for the other columns) followed by
    `` ± <column>_std`` in ``std_format`` where the row has a standard deviation; ``missing`` where
    the row has no value. A format is a ``str.format`` pattern or a function of the value."""
    formats = formats or {}
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append(missing)
                continue
            text = _format(formats.get(column, default), value)
            if row.get(f"{column}_std") is not None:
                text += " ± " + _format(std_format, row[f"{column}_std"])
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(fmt: Format, value: float) -> str:
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


# Colours by model, all distinct (tab10, then five more).
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan", "black", "gold", "navy", "lime", "magenta")


def style(name: str, i: int, references: Sequence[str] = (), palette: Sequence = PALETTE,
          sizes: tuple[float, float] = (14, 8)) -> dict:
    """The look of model ``name``, the ``i``-th of a plot: a colour of ``palette``, and a marker by
    kind — a square for the ``references`` (the models before unlearning), a large star for NSRU
    (``nsru``, ``nsru[<statistics>]``), a diamond for its ablations (``nsru-no-*``), a circle for
    the baselines. ``sizes``: the star's and the others' marker sizes. Returns ``{"color",
    "marker", "markersize"}``."""
    if name in references:
        marker = "s"
    elif name == "nsru" or name.startswith("nsru["):
        marker = "*"
    elif name.startswith("nsru-"):
        marker = "D"
    else:
        marker = "o"
    return {"color": palette[i % len(palette)], "marker": marker, "markersize": sizes[0] if marker == "*" else sizes[1]}


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> Path:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
