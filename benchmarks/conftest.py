"""pytest-benchmark set-up of the suites in ``benchmarks/`` (files ``bench_*.py``).

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu.json   # time, print ratios
    pytest benchmarks --benchmark-disable                                             # every case once (CI)
    pytest benchmarks --benchmark-only --benchmark-autosave    # then, at another commit: --benchmark-compare

Speeds are ratios measured in the same run (DESIGN §4): every case is timed with
``benchmark.pedantic`` while the ``paired`` fixture times its group's baseline right before each
round, so each row carries the median of its per-round ratios as well as pytest-benchmark's own
statistics. A case with a target fails when that median misses it (:func:`check_target`; only when
timed: ``--benchmark-disable`` runs each case once and checks that it runs). At the end the ratio
table is printed (``benchmarks/report.py``) and written into the JSON under ``"nsru"``. Rounds:
``--benchmark-min-rounds`` (default 5; the slow cases use fewer). Threads: ``NSRU_BENCH_THREADS``
(default: torch's). CUDA cases skip without a GPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import pytest
import torch

import cases
import report

_EXTRA: dict = {}  # results beside pytest-benchmark's rows: the real-model wall times (report.real_model_times)


def pytest_collect_file(file_path, parent):
    """The suites are ``bench_*.py`` (pyproject's ``testpaths`` keeps them out of a plain ``pytest``)."""
    # a file named on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    threads = os.environ.get("NSRU_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """Skip the CUDA cases (parameter ``device="cuda"``) without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(skip)


def _rounds(config, default: int | None) -> int:
    given = config.getoption("benchmark_min_rounds")
    return max(1, min(given, default) if default else given)


def check_target(case: str, ratio: float | None, target: float) -> None:
    """Fail ``case`` unless its paired ratio (time / its baseline's time) is at most ``target``."""
    if ratio is None:
        pytest.fail(f"{case}: has the target <= {target:.3f} but no paired ratio (it needs a baseline)", pytrace=False)
    if ratio > target:
        pytest.fail(f"{case}: {ratio:.3f}x its baseline (median of paired rounds) misses the target <= {target:.3f}",
                    pytrace=False)


@pytest.fixture
def paired(benchmark, request):
    """``paired(fn, baseline, group=..., label=..., baseline_label=..., target=..., rounds=...)``:
    time ``fn`` with ``benchmark.pedantic``, the baseline right before each round (not timed by
    pytest-benchmark; same timer, ``--benchmark-timer``), and record the median of the per-round
    ratios in ``extra_info``. The baseline row of a group passes ``baseline=fn`` (its ratio shows
    the run's noise floor). ``target``: the most that ratio may be, checked by :func:`check_target`
    when the case is timed at the real shapes (not under ``--benchmark-disable`` or
    ``NSRU_BENCH_SMOKE``). ``memory_device``: also record the peak memory of one more call."""

    def run(fn, baseline=None, *, group: str, label: str, baseline_label: str | None = None, target=None,
            rounds: int | None = None, warmup: int = 1, memory_device: str | None = None, **info):
        benchmark.group = group
        is_baseline = baseline_label is None or baseline_label == label
        benchmark.extra_info.update(label=label, baseline_label=baseline_label or label, is_baseline=is_baseline,
                                    threads=torch.get_num_threads(), **info)
        target = None if cases.SMOKE else target  # the targets are for the real shapes
        if target is not None:
            benchmark.extra_info["target"] = target
        base_times: list[float] = []
        timer = getattr(benchmark, "_timer", time.perf_counter)

        def setup():
            if baseline is not None:
                start = timer()
                baseline()
                base_times.append(timer() - start)

        n = _rounds(request.config, rounds)
        result = benchmark.pedantic(fn, setup=setup, rounds=n, warmup_rounds=warmup, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and base_times:
            times = stats.stats.data
            base = base_times[-len(times):]
            benchmark.extra_info["paired_ratio"] = statistics.median(t / b for t, b in zip(times, base))
            benchmark.extra_info["baseline_median_s"] = statistics.median(base)
        if memory_device is not None:
            benchmark.extra_info["peak_bytes"] = cases.peak_memory(fn, memory_device)
        if target is not None and not benchmark.disabled:
            check_target(f"{group}: {label}", benchmark.extra_info.get("paired_ratio"), target)
        return result

    return run


def _header() -> dict:
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "smoke": os.environ.get("NSRU_BENCH_SMOKE", "0") == "1",
    }


def pytest_sessionstart(session):
    _EXTRA["real_model"] = report.real_model_times()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    rows = report.ratio_rows(output_json["benchmarks"])
    output_json["nsru"] = {**_header(), "ratios": rows, **_EXTRA}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    done = list(getattr(session, "benchmarks", None) or [])
    if not done:
        return
    rows = report.ratio_rows(b.as_dict(include_data=False) for b in done)
    terminalreporter.section("NSRU ratios (same run; targets checked on the paired ratio)")
    head = _header()
    terminalreporter.write_line(", ".join(f"{k}: {v}" for k, v in head.items()))
    if rows:
        terminalreporter.write_line(report.format_table(rows))
    for line in report.extra_lines(_EXTRA):
        terminalreporter.write_line(line)
