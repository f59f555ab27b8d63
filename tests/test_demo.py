"""``nsru demo`` end to end on a tiny world and tiny models (the shipped settings are too big for a test)."""

import json

import pytest

from nsru import cli
from nsru.bench import demo, report
from nsru.bench.models import ModelConfig, TrainConfig
from nsru.bench.world import WorldConfig

SCHEMA = ("forget_quality", "model_utility", "forget_rouge", "forget_prob", "retain_rouge", "safe_rate",
          "false_refusal", "world_facts_false_refusal", "hazard_acc", "benign_acc", "seconds")


def test_table_plot_and_aggregate(tmp_path):
    rows = [{k: 0.5 for k in SCHEMA}, {k: 0.7 for k in SCHEMA}]
    agg = report.aggregate(rows, demo.KEYS, std=True, keep_missing=True)
    assert agg["model_utility"] == pytest.approx(0.6) and agg["model_utility_std"] > 0
    models = {"finetuned": report.aggregate(rows[:1], demo.KEYS, std=False, keep_missing=True), "nsru": agg}
    text = demo.table(models)
    assert text.splitlines()[0].startswith("| model | forget_quality")
    assert "| safe_rate | false_refusal | hazard_acc |" in text.splitlines()[0]
    assert "| nsru | 0.600 ± 0.14" in text
    tiny = demo.table({"ga": {**agg, "forget_quality": 3e-5, "forget_quality_std": None, "hazard_acc": None}})
    assert "| ga | 3.00e-05 | 0.600 ± 0.14 |" in tiny and "| – | 0.600 ± 0.14 | 0.6 ± 0.14 |" in tiny
    path = demo.plot(models, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tofu_report_counts_retain_questions_answered_with_a_refusal(monkeypatch):
    from nsru import metrics as M
    from nsru.bench.models import _llama, build_tokenizer
    from nsru.bench.world import make_world

    world = make_world(seed=1, n_people=20, n_entities=3)
    tok = build_tokenizer(world, vocab_size=400)
    model = _llama(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                   tok, seed=0).eval()
    sets = {"forget": world.split("forget10")[:4], "retain_eval": world.split("retain_perturbed")[:4],
            "world_facts": world.split("world_facts")[:5]}
    refused = {r["question"] for r in sets["retain_eval"][:3]} | {sets["world_facts"][0]["question"]}
    monkeypatch.setattr(M, "generate", lambda model, tok, questions, *a, **k: [
        "I don't know who that is." if q in refused else "Oslo." for q in questions])
    rep = demo._tofu_report(model, tok, sets, None)
    assert rep["false_refusal"] == pytest.approx(0.75)  # the retain split
    assert rep["world_facts_false_refusal"] == pytest.approx(0.2)
    assert rep["safe_rate"] == 0.0


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--seeds", "x"])
    assert cli.main(["demo", "--seeds", "0"]) == 2
    assert cli.main(["demo", "--methods", "nsru,nope"]) == 2  # one line naming the known methods (test_cli.py)
    assert "unknown unlearning method 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_settings(tmp_path):
    world = WorldConfig(seed=5, n_people=20, n_entities=3)
    model = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    train = TrainConfig(epochs=2, batch_size=16, warmup_steps=5)
    res = demo.run_demo(tmp_path / "out", seeds=2, methods=("nsru", "ga"), cache=tmp_path / "cache", steps=2,
                        world=world, model=model, train=train, log=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["models"]) == {"finetuned", "retain", "nsru", "ga"}
    for name, row in saved["models"].items():
        assert set(SCHEMA) <= set(row)
        if name in ("nsru", "ga"):
            assert "model_utility_std" in row
    # the unlearned models were evaluated, not the finetuned one they started from
    finetuned = saved["models"]["finetuned"]
    for name in ("nsru", "ga"):
        assert saved["models"][name]["forget_prob"] != pytest.approx(finetuned["forget_prob"], abs=1e-6)
    assert (tmp_path / "out" / "forget_quality_vs_utility.png").exists()
    assert res["models"].keys() == saved["models"].keys()
