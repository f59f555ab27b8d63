"""nsru.bench.report: the per-seed aggregate, the Markdown table and the plot style every benchmark
report shares (the demo, the real-model scenario and the defaults sweep)."""

import statistics

import pytest

from nsru.bench import report


def test_aggregate_means_sample_std_and_missing_values():
    records = [{"a": 1.0, "b": 2.0, "c": None}, {"a": 2.0, "b": None}, {"a": 4.0, "d": 7.0}]
    row = report.aggregate(records, ("a", "b", "c", "d"))
    assert row == {"a": pytest.approx(7 / 3), "a_std": pytest.approx(statistics.stdev([1.0, 2.0, 4.0])), "b": 2.0,
                   "d": 7.0}  # one value: no std; no value: left out
    assert report.aggregate(records, ("a", "c"), std=False, keep_missing=True) == {"a": pytest.approx(7 / 3), "c": None}
    assert list(report.aggregate(records, ("d", "a"))) == ["d", "a", "a_std"]  # in the order of the keys


def test_markdown_table_formats_per_column_with_std_and_missing_cells():
    rows = {"before": {"x": 0.5, "secs": 12.345, "big": 1234.5},
            "nsru": {"x": 0.25, "x_std": 0.0123, "secs": 3.0, "secs_std": 1.5}}
    text = report.markdown_table(rows, ("x", "big", "secs"), "method", {"secs": "{:.1f}"})
    assert text.splitlines() == [
        "| method | x | big | secs |",
        "|---|---|---|---|",
        "| before | 0.500 | 1.23e+03 | 12.3 |",
        "| nsru | 0.250 ± 0.012 | – | 3.0 ± 1.5 |",
    ]
    custom = report.markdown_table(rows, ("x",), formats={"x": lambda v: f"{v:.0%}"}, std_format="{:.3f}", missing="")
    assert custom.splitlines()[0] == "| model | x |"
    assert custom.splitlines()[3] == "| nsru | 25% ± 0.012 |"
    assert report.markdown_table(rows, ("big",), default="{:.1f}", missing="").splitlines()[2:] == [
        "| before | 1234.5 |", "| nsru |  |"]


def test_style_marks_references_nsru_its_ablations_and_baselines():
    names = ["finetuned", "nsru", "nsru[retain+self]", "nsru-no-safe", "graddiff", "lora (nsru-no-project)"]
    styles = [report.style(n, i, references=("finetuned",)) for i, n in enumerate(names)]
    assert [s["marker"] for s in styles] == ["s", "*", "*", "D", "o", "o"]
    assert [s["markersize"] for s in styles] == [8, 14, 14, 8, 8, 8]
    assert len({s["color"] for s in styles}) == len(names)
    small = report.style("nsru", 17, palette=("red", "blue"), sizes=(11, 7))
    assert small == {"color": "blue", "marker": "*", "markersize": 11}


def test_save_writes_a_png_and_closes_the_figure(tmp_path):
    plt = report.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = report.save(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
