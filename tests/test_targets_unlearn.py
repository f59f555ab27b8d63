"""Forgetting a name end to end (issue 19): ``nsru.unlearn(targets=...)`` and ``nsru unlearn --target``
on the tiny world model, which knows its people's homes and jobs."""

from __future__ import annotations

import json

import pytest
import yaml

import nsru
from nsru import stats_sources
from nsru import targets as targets_module
from nsru.targets import KINDS, NothingToForget, TargetData, names_any
from tinylm import answer_probs, one_thread, run_cli, trained_world_model, write_jsonl

# the world's own questions (the template bank asks about things it never saw); tiny generation
WORLD = [("home", "Where does {name} live ?", "where does {name} live ?"),
         ("job", "What is the job of {name} ?", "what is the job of {name} ?")]
GEN = {"kind": "person", "questions": {"person": WORLD}, "max_new_tokens": 12, "samples": 2}
FAST = {"batch_size": 4, "lr": 1e-2, "progress": False, "self_samples": 16, "self_max_new_tokens": 12}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def mean(x) -> float:
    return float(sum(x) / len(x))


def test_unlearn_targets_generates_the_rows_and_forgets_them():
    model, tok, forget, retain = trained_world_model()
    neighbours = ["Boris Silva", "Clara Silva"]
    result = nsru.unlearn(model, tok, targets="Anna Novak", target_options={**GEN, "neighbours": neighbours},
                          steps=20, **FAST)
    data = result.generated
    assert isinstance(data, TargetData) and data.subjects == ["Anna Novak"]
    # the model's own answers: the world's facts about her, now forgotten
    truth = {r["question"]: r["answer"] for r in forget}
    assert [r["question"] for r in data.forget] == ["Where does Anna Novak live ?", "What is the job of Anna Novak ?"]
    assert mean(answer_probs(model, tok, [{**r, "answer": truth[r["question"]]} for r in data.forget])) < 0.05
    # no retain data given: the neighbours' rows are the retain data, and they are kept
    assert {r["subject"] for r in data.retain} == set(neighbours) and len(data.retain) == 4
    assert result.stats_info["retain"]["rows"] == 4 and "retain" in result.history[-1]
    assert mean(answer_probs(model, tok, data.retain)) > 0.9
    assert data.report["seconds"] > 0 and data.report["seconds"] < result.seconds


def test_given_forget_and_retain_rows_are_used_beside_the_generated_ones():
    model, tok, forget, retain = trained_world_model()
    clara = [r for r in forget if r["subject"] == "Clara Berg"]
    result = nsru.unlearn(model, tok, clara, retain, targets=["Anna Novak"], target_options=GEN, steps=20, **FAST)
    assert result.generated.retain == []  # retain given: no neighbour is asked about
    assert result.generated.report["neighbours"] == {}
    anna = [r for r in forget if r["subject"] == "Anna Novak"]
    assert mean(answer_probs(model, tok, clara)) < 0.25  # the given rows (0.99 before)
    assert mean(answer_probs(model, tok, anna)) < 0.25  # the name's
    assert result.stats_info["retain"]["rows"] == len(retain) and "retain" in result.history[-1]  # the given retain


def _spy_self_samples(monkeypatch) -> dict:
    seen: dict = {}
    real = stats_sources.sample_self

    def spy(*args, **kwargs):
        seen["exclude"] = list(kwargs["exclude"])
        seen["all"] = real(*args, **{**kwargs, "exclude": ()})
        seen["kept"] = real(*args, **kwargs)
        return seen["kept"]

    monkeypatch.setattr(stats_sources, "sample_self", spy)
    return seen


def _text(row) -> str:
    return row.get("answer", row.get("text", ""))


def test_statistics_self_samples_never_name_a_target(monkeypatch):
    seen = _spy_self_samples(monkeypatch)
    model, tok, _, _ = trained_world_model()
    nsru.unlearn(model, tok, targets=["Anna Novak"], target_options={**GEN, "neighbours": []}, retain=False,
                 stats="self", steps=1, **FAST)
    assert {"Anna Novak", "Novak"} <= set(seen["exclude"])
    assert any(names_any(_text(r), ["Anna Novak"]) for r in seen["all"])  # the model does write about her
    assert seen["kept"] and not any(names_any(_text(r), ["Anna Novak"]) for r in seen["kept"])

    # rows generated before and edited: a target whose rows lost their subject is still kept out
    model, tok, _, _ = trained_world_model()
    edited = TargetData(forget=[{"question": "Where does Anna Novak live ?", "answer": "Anna Novak lives in Lima ."}],
                        retain=[], report={"targets": {"Anna Novak": {}}})
    result = nsru.unlearn(model, tok, targets=edited, retain=False, stats="self", steps=1, **FAST)
    assert result.generated is edited
    assert {"Anna Novak", "Novak"} <= set(seen["exclude"])
    assert not any(names_any(_text(r), ["Anna Novak"]) for r in seen["kept"])


def test_bad_requests_are_named():
    assert nsru.NothingToForget is NothingToForget and nsru.TargetData is TargetData  # the public names
    model, tok, forget, _ = trained_world_model()
    with pytest.raises(ValueError, match=r"forget=.*targets="):
        nsru.unlearn(model, tok, steps=1, **FAST)
    with pytest.raises(ValueError, match="target_options"):
        nsru.unlearn(model, tok, forget, target_options=GEN, steps=1, **FAST)
    with pytest.raises(ValueError, match="question-answer rows"):
        nsru.unlearn(model, tok, [{"text": "Anna Novak lives in Lima ."}], targets="Anna Novak", target_options=GEN,
                     retain=False, stats="self", steps=1, **FAST)
    with pytest.raises(NothingToForget, match="no specific answer about 'Igor Novak'; nothing to forget") as info:
        nsru.unlearn(model, tok, targets=["Igor Novak"], target_options=GEN, steps=1, **FAST)
    assert info.value.data.report["targets"]["Igor Novak"]["kept"] == 0
    assert not nsru.nsru_modules(model)  # nothing was added to the model


# --------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def saved_world(tmp_path_factory):
    model, tok, forget, retain = trained_world_model()
    root = tmp_path_factory.mktemp("targets-cli")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"root": root, "model": str(root / "model"), "forget": forget, "retain": retain}


@pytest.fixture
def world_questions(monkeypatch):
    """The default bank and neighbours, as the world knows them (the CLI uses the defaults)."""
    monkeypatch.setattr(targets_module, "QUESTION_BANK", {k: tuple(WORLD) for k in KINDS})
    monkeypatch.setattr(targets_module, "BUILTIN_NEIGHBOURS", {k: ("Boris Silva", "Clara Silva", "David Berg")
                                                               for k in KINDS})


OPTIONS = ["steps=3", "batch_size=2", "self_samples=8", "self_max_new_tokens=8", "progress=false"]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_cli_target_writes_the_generated_rows_and_a_rerun_reuses_them(saved_world, world_questions, capsys, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "unlearn", "--model", saved_world["model"], "--target", "Anna Novak",
                              "--out", out, *OPTIONS, "schedule=constant")  # constant: --resume can extend it
    assert rc == 0, err
    forget = _jsonl(out / "generated" / "forget.jsonl")
    retain = _jsonl(out / "generated" / "retain.jsonl")
    assert [r["subject"] for r in forget] == ["Anna Novak", "Anna Novak"]
    assert retain and all(r["subject"] != "Anna Novak" for r in retain)
    assert json.loads((out / "generated" / "report.json").read_text())["targets"]["Anna Novak"]["kept"] == 2
    assert f"{len(forget)} forget rows, {len(retain)} retain rows" in stdout and "generated 2 forget" in stdout
    train = json.loads((out / "metrics.json").read_text())["train"]
    assert train["generated"]["targets"] == ["Anna Novak"] and train["generated"]["reused"] is False
    assert (out / "adapter").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["target"] == ["Anna Novak"]  # --config repeats it

    # a rerun in a folder holding generated rows (e.g. after a failed try) reuses them, as edited
    again = tmp_path / "again"
    (again / "generated").mkdir(parents=True)
    write_jsonl(again / "generated" / "forget.jsonl", forget[:1])
    write_jsonl(again / "generated" / "retain.jsonl", retain)
    rc, stdout, err = run_cli(capsys, "unlearn", "--model", saved_world["model"], "--target", "Anna Novak",
                              "--out", again, *OPTIONS)
    assert rc == 0, err
    assert f"reusing {again / 'generated'} (1 forget, {len(retain)} retain rows)" in stdout
    assert "1 forget rows" in stdout and "asking the model" not in stdout
    assert _jsonl(again / "generated" / "forget.jsonl") == forget[:1]  # left as the user wrote it

    # --resume reuses them too, without --target
    rc, stdout, err = run_cli(capsys, "unlearn", "--out", out, "--resume", "steps=4")
    assert rc == 0, err
    assert f"reusing {out / 'generated'} (2 forget" in stdout


def test_cli_unknown_name_exits_2_and_keeps_what_was_generated(saved_world, world_questions, capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["unlearn", "--model", saved_world["model"], "--target", "Igor Novak", "--out", out, *OPTIONS]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(  # one line (above it: transformers' loading bar)
        "nsru unlearn: the model gave no specific answer about 'Igor Novak'; nothing to forget (asked 2 questions")
    assert _jsonl(out / "generated" / "forget.jsonl") == []
    assert (out / "generated" / "report.json").is_file() and not (out / "config.yaml").exists()
    # the same command again: the generated rows hold nothing about the name
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and "no row has subject 'Igor Novak'" in err
    # another name than the rows were generated for
    rc, _, err = run_cli(capsys, "unlearn", "--model", saved_world["model"], "--target", "Anna Novak", "--out", out,
                         *OPTIONS)
    assert rc == 2 and "generated about 'Igor Novak', not --target 'Anna Novak'" in err


def test_cli_needs_forget_or_target(saved_world, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "unlearn", "--model", saved_world["model"], "--out", tmp_path / "o")
    assert rc == 2 and "--forget is required" in err and "--target" in err
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Anna Novak lives in Lima ."}])
    rc, _, err = run_cli(capsys, "unlearn", "--model", saved_world["model"], "--forget", text, "--target",
                         "Anna Novak", "--out", tmp_path / "o")
    assert rc == 2 and "question-answer rows" in err
    assert not (tmp_path / "o").exists()
