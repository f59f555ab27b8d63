"""The real-knowledge scenario's plumbing (nsru.bench.real) on the tiny world model: filtering to
known facts, the metrics, the comparison's files. The SmolLM2 run itself is measured, not tested
(README "Real model")."""

import json

import pytest

from nsru import metrics as M
from nsru.bench import real
from tinylm import CITIES, JOBS, one_thread, tiny_world, trained_world_model

FORGET = ("Anna Novak", "Clara Berg")
NEIGHBOURS = ("Boris Silva", "David Berg", "David Novak", "Clara Silva")


def _facts() -> dict:
    """The tiny world in the shipped fact set's schema: where each person lives, as 4-way items."""
    forget, retain = tiny_world()
    entities = {}
    for row in forget + retain:
        if not row["question"].startswith("Where"):
            continue
        city = row["answer"].split(" lives in ")[1].rstrip(" .")
        others = [c for c in CITIES if c != city][:3]
        k = len(entities) % 4
        group = "forget" if row["subject"] in FORGET else "neighbour" if row["subject"] in NEIGHBOURS else "retain"
        entities[row["subject"]] = {"name": row["subject"], "group": group, "facts": [{
            "question": row["question"], "paraphrase": row["question"], "answer": row["answer"],
            "choices": others[:k] + [city] + others[k:], "correct": k}]}
    jobs = [r for r in retain if r["question"].startswith("What") and r["subject"] in NEIGHBOURS]
    general = []
    for i, row in enumerate(jobs):
        job = row["answer"].split(" is a ")[1].rstrip(" .")
        others = [j for j in JOBS if j != job][:3]
        general.append({"question": row["question"], "paraphrase": row["question"], "answer": row["answer"],
                        "choices": others[:i % 4] + [job] + others[i % 4:], "correct": i % 4})
    texts = [r["answer"] for r in retain]
    return {"entities": list(entities.values()), "general": general, "ppl_text": texts[:4], "stats_text": texts[4:]}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_scenario_keeps_what_the_model_knows_and_scores_it_consistently():
    model, tok, *_ = trained_world_model()
    facts = _facts()
    sc = real.build_scenario(model, tok, facts)
    assert sc.counts["forget_candidates"] == 4 and sc.counts["neighbour_candidates"] == 4
    assert {r["subject"] for r in sc.forget} <= set(FORGET)
    assert all(r["answer"].startswith(r["subject"]) for r in sc.forget + sc.retain)
    assert {r["subject"] for r in sc.retain}.isdisjoint(FORGET + NEIGHBOURS)
    report = real.evaluate(model, tok, sc)
    # the same model scores every kept item right again (filter and evaluation agree)
    assert report["forget_acc"] == report["neighbour_acc"] == report["general_acc"] == 1.0
    assert report["ppl_ratio"] == 1.0 and report["leakage_neighbour"] == 1.0  # no retain basis yet
    # the model answers every question it was taught: no refusals anywhere
    assert report["safe_rate"] == 0.0
    assert report["retain_false_refusal"] == report["neighbour_false_refusal"] == report["general_false_refusal"] == 0.0


def test_false_refusals_count_refused_retain_neighbour_and_general_questions(monkeypatch):
    model, tok, *_ = trained_world_model()
    sc = real.build_scenario(model, tok, _facts())
    # different counts per set, so a rate computed on the wrong set shows
    refused = {sc.retain[0]["question"], sc.retain[1]["question"], sc.retain[2]["question"],
               sc.neighbour_mc[0]["question"], sc.neighbour_mc[1]["question"], sc.general_mc[0]["question"],
               sc.forget[0]["question"]}
    lengths = []

    def fake_generate(model, tokenizer, questions, max_new_tokens=32, *args, **kwargs):
        lengths.append(max_new_tokens)
        return ["I don't have that information." if q in refused else "Somewhere." for q in questions]

    monkeypatch.setattr(M, "generate", fake_generate)
    report = real.evaluate(model, tok, sc)
    assert report["retain_false_refusal"] == pytest.approx(3 / len(sc.retain))
    assert report["neighbour_false_refusal"] == pytest.approx(2 / len(sc.neighbour_mc))
    assert report["general_false_refusal"] == pytest.approx(1 / len(sc.general_mc))
    assert report["safe_rate"] == pytest.approx(1 / len(sc.forget))
    assert lengths == [real.ANSWER_TOKENS] * 4  # every set answered as the forget set is


def test_the_evaluation_entry_scores_every_probe_set_it_is_given():
    """nsru.evaluation.evaluate_knowledge, the entry real.evaluate calls: one cloze accuracy per
    probe set of the forget facts (more ways of asking them are more sets), in the order given."""
    from nsru.evaluation import evaluate_knowledge

    model, tok, *_ = trained_world_model()
    sc = real.build_scenario(model, tok, _facts())
    wrong = []  # the same items with the next choice marked right
    for r in sc.forget_mc:
        other = (r["answer"] + 1) % len(r["choices"])
        wrong.append({**r, "answer": other,
                      "answer_text": r["answer_text"].replace(r["choices"][r["answer"]], r["choices"][other])})
    kept = {"neighbour": sc.neighbour_mc, "general": sc.general_mc}
    report = evaluate_knowledge(model, tok, sc.forget, sc.retain, {"forget": sc.forget_mc, "forget_swapped": wrong},
                                kept, sc.ppl_text, before_ppl=2 * M.perplexity(model, tok, sc.ppl_text))
    assert list(report) == ["forget_acc", "forget_swapped_acc", "safe_rate", "neighbour_acc", "general_acc",
                            "retain_false_refusal", "neighbour_false_refusal", "general_false_refusal", "ppl",
                            "ppl_ratio", "leakage_neighbour", "leakage_general"]
    assert report["forget_acc"] == 1.0 and report["forget_swapped_acc"] == 0.0  # the model keeps its answer
    assert report["ppl_ratio"] == pytest.approx(0.5)
    assert {k: v for k, v in report.items() if k != "forget_swapped_acc" and k != "ppl_ratio"} == \
        {k: v for k, v in real.evaluate(model, tok, sc).items() if k != "ppl_ratio"}


def test_comparison_writes_results_table_and_plot(tmp_path):
    facts = _facts()
    res = real.run_real(tmp_path, seeds=1, names=["nsru[retain]", "lora (nsru-no-project)"], steps=20, lr=1e-2,
                        batch_size=4, options={"layers": "1"}, facts=facts, load=lambda: trained_world_model()[:2],
                        log=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == {"before", "nsru[retain]", "lora (nsru-no-project)"}
    nsru_row = saved["models"]["nsru[retain]"]
    assert nsru_row["forget_acc"] < saved["models"]["before"]["forget_acc"]
    assert 0 < nsru_row["leakage_neighbour"] < 1 and nsru_row["mean_k"] > 0
    assert saved["models"]["lora (nsru-no-project)"]["mean_k"] == 0
    for name, row in saved["models"].items():
        for key in ("retain_false_refusal", "neighbour_false_refusal", "general_false_refusal", "safe_rate"):
            assert 0 <= row[key] <= 1, (name, key)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert all({"retain_false_refusal", "neighbour_false_refusal", "general_false_refusal"} <= set(r) for r in runs)
    table = (tmp_path / "table.md").read_text()
    assert "| nsru[retain] |" in table
    assert "| retain_false_refusal | neighbour_false_refusal | general_false_refusal |" in table.splitlines()[0]
    assert (tmp_path / "real_knowledge.png").read_bytes()[:4] == b"\x89PNG"
    assert res["scenario"] == saved["scenario"]
    # one report from the run log (twice the same folder: each method and seed counts once)
    merged = real.report_from_runs(tmp_path / "merged", tmp_path, tmp_path, log=lambda *a: None)
    assert merged["models"] == saved["models"] and merged["scenario"] == saved["scenario"]
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        real.run_real(tmp_path, names=["nope"], facts=facts, load=lambda: trained_world_model()[:2])
