"""Frontiers of the real scenario (nsru.bench.frontier): one run_real folder per budget, the
curves and the Pareto set read back from them, the budget syntax."""

import json

import pytest

from nsru.bench import frontier
from test_real_scenario import _facts
from tinylm import one_thread, trained_world_model


def _point(steps, lr, forget, kept, general=0.9):
    return {"steps": steps, "lr": lr, "seeds": 1, "forget_acc": forget, "neighbour_same_kind_acc": kept,
            "general_acc": general}


def test_pareto_keeps_only_the_runs_no_other_run_beats_on_both_axes():
    curves = {
        "before": [_point(0, 0.0, 1.0, 1.0)],  # never a candidate
        "a": [_point(20, 1e-3, 0.6, 0.95), _point(20, 1e-2, 0.3, 0.80)],
        "b": [_point(20, 1e-3, 0.6, 0.90),  # beaten by a's first point: as much forgotten, less kept
              _point(20, 1e-2, 0.2, 0.70)],
    }
    got = {(p["method"], p["lr"]) for p in frontier.pareto(curves)}
    assert got == {("a", 1e-3), ("a", 1e-2), ("b", 1e-2)}
    # judged by the audited figure, b's strong point forgets least; the runs without one are left out
    curves["b"][1]["audited_forget_acc"] = 0.1
    curves["a"][1]["audited_forget_acc"] = 0.5
    got = {(p["method"], p["lr"]) for p in frontier.pareto(curves, forget="audited_forget_acc")}
    assert got == {("a", 1e-2), ("b", 1e-2)}
    curves["b"][1]["audited_forget_acc"] = 0.6  # now a's forgets more and keeps more
    assert {(p["method"], p["lr"]) for p in frontier.pareto(curves, forget="audited_forget_acc")} == {("a", 1e-2)}


def test_budgets_parse_and_bad_ones_say_what_was_expected():
    assert frontier.parse_budgets("20x1e-3, 40x1e-2") == [(20, 1e-3), (40, 1e-2)]
    for bad in ("20", "x1e-3", "0x1e-3", "20x0", "20xfast", ""):
        with pytest.raises(ValueError, match="STEPSxLR|no budget"):
            frontier.parse_budgets(bad)
    assert frontier.budget_tag(20, 1e-3) == "steps20_lr0.001"


def test_a_frontier_runs_each_budget_in_its_folder_and_reports_every_method_per_budget(tmp_path):
    facts = _facts()
    load = lambda: trained_world_model()[:2]  # noqa: E731
    common = dict(seeds=1, names=["nsru[retain]", "lora (nsru-no-project)"], batch_size=4, options={"layers": "1"},
                  facts=facts, load=load, log=lambda *a: None)
    with one_thread():
        # two processes sharing the folder, one budget each: the report is built from both
        frontier.run_frontier(tmp_path, [(20, 1e-2)], **common)
        result = frontier.run_frontier(tmp_path, [(2, 1e-3)], **common)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["steps20_lr0.01", "steps2_lr0.001"]
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["forget_measure"] == "forget_acc"  # no audit asked for
    for name in ("nsru[retain]", "lora (nsru-no-project)"):
        points = saved["curves"][name]
        assert [(p["steps"], p["lr"]) for p in points] == [(2, 1e-3), (20, 1e-2)]  # weakest first
        assert all(p["seeds"] == 1 and 0 <= p["forget_acc"] <= 1 for p in points)
    assert len(saved["curves"]["before"]) == 1 and saved["curves"]["before"][0]["forget_acc"] == 1.0
    # 20 steps at 1e-2 forget what 2 steps at 1e-3 barely touch (the budgets reached their runs)
    assert saved["curves"]["nsru[retain]"][1]["forget_acc"] < saved["curves"]["nsru[retain]"][0]["forget_acc"]
    table = (tmp_path / "frontier.md").read_text()
    assert "| nsru[retain] 2x0.001 | 1 |" in table and "| lora (nsru-no-project) 20x0.01 | 1 |" in table
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert {k for k in saved["pareto"]} == set(frontier.KEPT)
    # --report rebuilds the same report from the folders alone
    (tmp_path / "frontier.json").unlink()
    assert frontier.main(["--out", str(tmp_path), "--report"]) == 0
    assert json.loads((tmp_path / "frontier.json").read_text()) == saved


def test_runs_without_their_budget_are_refused_by_name(tmp_path):
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "runs.jsonl").write_text("")
    with pytest.raises(ValueError, match="orphan: runs.jsonl without meta.json"):
        frontier.collect(tmp_path)
    with pytest.raises(ValueError, match="no finished run"):
        frontier.frontier_report(tmp_path / "empty", log=lambda *a: None)
