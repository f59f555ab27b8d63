"""What ``nsru eval`` reports beyond the forget set: the false-refusal rate on retain and general
questions, and every metric it could not compute, named with the reason (printed and in
metrics.json). In process, on a tiny model trained to answer the world's people and to refuse
people it does not know."""

from __future__ import annotations

import json

import pytest

from nsru import cli
from nsru import metrics as M
from tinylm import one_thread, tofu_rows, trained_world_model, unknown_people_rows, write_jsonl

NO_TR = "rows have no paraphrased_answer and perturbed_answer"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_report")
    model, tok, forget, retain = trained_world_model()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    # The last two are people the model was taught to refuse, in wording the default detector
    # reads as refusals (the others decode as "I ' m sorry", which it does not).
    retain_rows = tofu_rows(retain[:4] + unknown_people_rows()[6:8])
    general_rows = [{"question": r["question"], "answer": r["answer"]} for r in retain[4:8]]
    return {
        "model": str(root / "model"),
        "forget": write_jsonl(root / "forget.json", tofu_rows(forget)),
        "bare_forget": write_jsonl(root / "bare_forget.json", [{"question": r["question"], "answer": r["answer"]}
                                                          for r in forget]),
        "retain": write_jsonl(root / "retain.json", retain_rows),
        "general": write_jsonl(root / "general.json", general_rows),
        "retain_rows": retain_rows,
        "general_rows": general_rows,
        "trained": (model, tok),
    }


def _eval(capsys, *argv) -> tuple[str, str]:
    capsys.readouterr()
    with one_thread():
        rc = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def test_false_refusals_on_retain_and_general_sets_and_what_was_skipped(files, tmp_path, capsys):
    out, _ = _eval(capsys, "--model", files["model"], "--forget", files["forget"], "--retain", files["retain"],
                   "--general", f"facts={files['general']}", "--out", tmp_path, "--max-new-tokens", 16)
    report = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    model, tok = files["trained"]
    with one_thread():
        want_retain = M.false_refusal_rate(model, tok, files["retain_rows"], max_new_tokens=16)
        want_general = M.false_refusal_rate(model, tok, files["general_rows"], max_new_tokens=16)
    assert want_retain["values"] == [False] * 4 + [True] * 2, want_retain["generations"]
    assert report["retain_false_refusal"] == pytest.approx(2 / 6)
    assert report["facts_false_refusal"] == want_general["rate"] == 0.0
    assert report["safe_rate"] == 0.0  # the forget people are answered, not refused
    assert report["skipped"] == {"facts_truth_ratio": NO_TR, "forget_quality": "no --retain-model given"}
    lines = out.splitlines()
    assert any(line.split() == ["retain_false_refusal", "0.3333"] for line in lines), out
    assert any(line.split() == ["facts_false_refusal", "0"] for line in lines), out
    assert "skipped: forget_quality (no --retain-model given)" in lines
    assert f"skipped: facts_truth_ratio ({NO_TR})" in lines
    details = json.loads((tmp_path / "eval_details.json").read_text())
    assert details["retain_refusals"] == want_retain["values"]
    assert details["retain_generations"] == want_retain["generations"]


def test_forget_only_names_every_metric_it_could_not_compute(files, tmp_path, capsys):
    out, _ = _eval(capsys, "--model", files["model"], "--forget", files["bare_forget"], "--out", tmp_path,
                   "--max-new-tokens", 4)
    report = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    nothing_kept = "no --retain or --general questions given"
    assert report["skipped"] == {"forget_truth_ratio": NO_TR, "false_refusal": nothing_kept,
                                 "model_utility": nothing_kept, "forget_quality": "no --retain-model given"}
    assert "forget_truth_ratio" not in report and "forget_quality" not in report
    for key, why in report["skipped"].items():
        assert f"skipped: {key} ({why})" in out.splitlines()


def test_nothing_skipped_with_a_retain_model_and_perturbed_answers(files, tmp_path, capsys):
    out, _ = _eval(capsys, "--model", files["model"], "--forget", files["forget"], "--retain", files["retain"],
                   "--retain-model", files["model"], "--out", tmp_path, "--max-new-tokens", 4)
    report = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert report["skipped"] == {}
    assert report["forget_quality"] == pytest.approx(1.0)  # the model against itself
    assert "retain_false_refusal" in report and "skipped:" not in out
