"""The real-knowledge scenario's plumbing (nsru.bench.real) on the tiny world model: filtering to
known facts, the metrics, the neighbours of the forget targets' kind, the audit, the comparison's
files. The SmolLM2 run itself is measured, not tested (README "Real model")."""

import json

import pytest

from nsru import metrics as M
from nsru.bench import real
from tinylm import CITIES, JOBS, one_thread, tiny_world, trained_world_model

FORGET = ("Anna Novak", "Clara Berg")
NEIGHBOURS = ("Boris Silva", "David Berg", "David Novak", "Clara Silva")


def _facts() -> dict:
    """The tiny world in the shipped fact set's schema: where each person lives, as 4-way items
    (forget and neighbour facts with a reverse and a cloze item, as version 2 has them)."""
    forget, retain = tiny_world()
    entities = {}
    for row in forget + retain:
        if not row["question"].startswith("Where"):
            continue
        city = row["answer"].split(" lives in ")[1].rstrip(" .")
        others = [c for c in CITIES if c != city][:3]
        k = len(entities) % 4
        group = "forget" if row["subject"] in FORGET else "neighbour" if row["subject"] in NEIGHBOURS else "retain"
        fact = {"question": row["question"], "paraphrase": row["question"], "answer": row["answer"],
                "choices": others[:k] + [city] + others[k:], "correct": k}
        if group != "retain":
            people = [p for p in FORGET + NEIGHBOURS if p != row["subject"]][:3]
            fact["reverse"] = {"question": f"Who lives in {city} ?", "choices": people[:k] + [row["subject"]] + people[k:],
                               "correct": k}
            fact["cloze"] = {"prompt": f"{row['subject']} lives in", "choices": fact["choices"], "correct": k}
        entities[row["subject"]] = {"name": row["subject"], "group": group, "facts": [fact]}
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


def test_neighbours_of_the_forget_targets_kind_are_scored_beside_the_first_neighbours():
    """neighbour_acc keeps the first fact set's neighbours (entities without added_in), so old runs
    stay comparable; neighbour_same_kind_acc is every neighbour of a forget target's kind."""
    model, tok, *_ = trained_world_model()
    facts = _facts()
    kinds = {"Anna Novak": "pilot", "Clara Berg": "pilot", "Boris Silva": "pilot", "David Berg": "poet",
             "David Novak": "pilot", "Clara Silva": "poet"}
    for e in facts["entities"]:
        e["kind"] = kinds.get(e["name"], "baker")
        if e["group"] == "forget":
            e["neighbour_kind"] = "pilot"
    facts["entities"][-1] = {**facts["entities"][-1], "group": "neighbour", "kind": "pilot", "added_in": 2}
    added = facts["entities"][-1]["name"]
    sc = real.build_scenario(model, tok, facts)
    assert sc.counts["neighbour_candidates"] == 4  # the added one is not among them
    assert sc.counts["neighbour_same_kind_candidates"] == 3  # Boris Silva, David Novak and the added one
    assert {r["question"] for r in sc.neighbour_same_kind_mc} <= {
        f"Where does {n} live ?" for n in ("Boris Silva", "David Novak", added)}
    report = real.evaluate(model, tok, sc)
    assert report["neighbour_same_kind_acc"] == report["neighbour_acc"] == 1.0
    assert report["neighbour_same_kind_false_refusal"] == 0.0
    assert "neighbour_same_kind_acc" not in real.evaluate(model, tok, real.build_scenario(model, tok, _facts()))


def test_the_real_scenario_audits_every_model_against_the_model_before(tmp_path):
    model, tok, forget, retain = trained_world_model()
    sc = real.build_scenario(model, tok, _facts())
    assert [f["subject"] for f in sc.forget_facts] == list(FORGET) and all("cloze" in f for f in sc.forget_facts)
    options = real.audit_options("1", relearn={"strong": (3, 1e-2)}, quant=("int4", "int4_base"), group_size=32)
    before = real.evaluate(model, tok, sc, audit=options)
    assert all(before[f"{p}_acc"] in (1.0, None) for p in ("forward", "paraphrase", "reverse", "cloze", "role_play"))
    assert before["audit"]["skipped"] == {"quant_int4_base": "the model has no adapters: its 4-bit base is quant_int4"}
    from nsru import unlearn

    unlearn(model, tok, sc.forget, sc.retain, steps=20, lr=1e-2, batch_size=4, layers="1", progress=False, seed=0)
    after = real.evaluate(model, tok, sc, before_ppl=before["ppl"], audit={**options, "before": before["audit"]})
    assert after["audit"]["known"] == before["audit"]["known"]
    assert after["forward_acc"] < 1.0 and after["quant_int4_base_acc"] is not None
    assert after["audited_forget_acc"] == after[after["worst_probe"] + "_acc"] >= after["forward_acc"]
    assert "retain_false_refusal" in after and "audit" not in real.evaluate(model, tok, sc)


def test_the_table_shows_the_audit_only_for_runs_that_have_it():
    plain = {"before": {"forget_acc": 1.0, "seconds": 0.0}}
    assert real.table(plain).splitlines()[0] == "| method | " + " | ".join(real.KEYS) + " |"
    audited = {"before": {"forget_acc": 1.0, "audited_forget_acc": 1.0, "worst_probe": "forward", "seconds": 0.0},
               "nsru": {"forget_acc": 0.4, "audited_forget_acc": 0.7, "audited_forget_acc_std": 0.1,
                        "worst_probe": "quant_int4", "neighbour_same_kind_acc": 0.8, "seconds": 3.0}}
    lines = real.table(audited).splitlines()
    assert lines[0].startswith("| method | forget_acc | audited_forget_acc | worst_probe | safe_rate | neighbour_acc | "
                               "neighbour_same_kind_acc | general_acc |")
    assert lines[3].startswith("| nsru | 0.400 | 0.700 ± 0.1 | quant_int4 | – | – | 0.800 |")
    runs = [{"forget_acc": 0.4, "worst_probe": "cloze", "cloze_acc": 0.5}, {"forget_acc": 0.5, "worst_probe": "quant_int4",
                                                                           "cloze_acc": 0.3},
            {"forget_acc": 0.6, "worst_probe": "cloze", "cloze_acc": 0.7}]
    row = real._aggregate(runs)
    assert row["worst_probe"] == "cloze" and row["cloze_acc"] == pytest.approx(0.5)
    assert real._aggregate(runs[:2])["worst_probe"] == "cloze/quant_int4"


def test_comparison_writes_results_table_and_plot(tmp_path):
    facts = _facts()
    res = real.run_real(tmp_path, seeds=[3], names=["nsru[retain]", "lora (nsru-no-project)"], steps=20, lr=1e-2,
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
    assert [r["seed"] for r in runs] == [None, 3, 3] and saved["config"]["seeds"] == [3]  # the seeds asked for
    table = (tmp_path / "table.md").read_text()
    assert "| nsru[retain] |" in table
    assert "| retain_false_refusal | neighbour_false_refusal | general_false_refusal |" in table.splitlines()[0]
    # the audit (on by default): every model against the model before, the worst probe in the table
    assert "| forget_acc | audited_forget_acc | worst_probe |" in table.splitlines()[0]
    for name, row in saved["models"].items():
        assert row["audited_forget_acc"] >= row["forward_acc"], name  # the worst probe: at least the forward one
        assert row["worst_probe"] and row["relearn_strong_acc"] is not None, name
    assert saved["models"]["before"]["forward_acc"] == 1.0 and saved["config"]["audit"]["relearn_layers"] == "1"
    assert runs[1]["audit"]["known"] == runs[0]["audit"]["known"]
    assert (tmp_path / "real_knowledge.png").read_bytes()[:4] == b"\x89PNG"
    assert res["scenario"] == saved["scenario"]
    # one report from the run log (twice the same folder: each method and seed counts once)
    merged = real.report_from_runs(tmp_path / "merged", tmp_path, tmp_path, log=lambda *a: None)
    assert merged["models"] == saved["models"] and merged["scenario"] == saved["scenario"]
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        real.run_real(tmp_path, names=["nope"], facts=facts, load=lambda: trained_world_model()[:2])


def test_the_targets_variant_is_given_the_names_alone(tmp_path, monkeypatch):
    """nsru[targets]: unlearn sees no forget or retain rows, only the forget names, and every other
    person of the fact set is kept out of the rows the model writes; the generation is reported."""
    import nsru.pipeline
    from nsru.targets import TargetData

    facts = _facts()
    seen = {}

    class Result:
        stats_info = {"self": {"rows": 2, "tokens": 30}}
        history = [{"step": 1}]
        generated = TargetData(forget=[{"question": "q", "answer": "a", "subject": "x"}], retain=[],
                               report={"seconds": 12.5})

        def summary(self):
            return {"mean_k": 3.0}

    def fake_unlearn(model, tok, forget=None, retain=None, **options):
        seen.update(forget=forget, retain=retain, **options)
        return Result()

    monkeypatch.setattr(nsru.pipeline, "unlearn", fake_unlearn)
    real.run_real(tmp_path, seeds=1, names=["nsru[targets]"], facts=facts, load=lambda: trained_world_model()[:2],
                  audit=False, log=lambda *a: None,
                  options={"target_options": {"neighbours_per_target": 6, "avoid": ["Someone Else"]}})
    forget_names = [e["name"] for e in facts["entities"] if e["group"] == "forget"]
    others = {e["name"] for e in facts["entities"]} - set(forget_names)
    assert seen["forget"] is None and seen["retain"] is None and seen["targets"] == forget_names
    assert set(seen["target_options"]["avoid"]) == others | {"Someone Else"} and seen["method"] == "nsru"
    assert seen["target_options"]["neighbours_per_target"] == 6  # the caller's generator options pass through
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["config"]["target_options"]["neighbours_per_target"] == 6  # and are on record
    run = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()][-1]
    assert run["name"] == "nsru[targets]" and run["generation_seconds"] == 12.5 and run["generated_forget_rows"] == 1
    assert run["stats_sources"] == {"self": {"rows": 2, "tokens": 30}} and run["steps_run"] == 1


def test_an_earlier_evaluation_of_the_model_before_is_reused(tmp_path, monkeypatch):
    """before=FOLDER: the model before is not evaluated again; its record is the earlier one, and a
    folder of another scenario or audit is refused, naming what differs."""
    import nsru.pipeline

    class Result:
        generated = None
        stats_info = {"retain": {"rows": 2, "tokens": 30}}
        history = [{"step": 1}, {"step": 2}]

        def summary(self):
            return {"mean_k": 1.0}

    monkeypatch.setattr(nsru.pipeline, "unlearn", lambda *a, **k: Result())
    facts, load = _facts(), lambda: trained_world_model()[:2]
    real.run_real(tmp_path / "first", seeds=1, names=["nsru[retain]"], facts=facts, load=load, audit=False,
                  log=lambda *a: None)
    evaluated = []
    evaluate = real.evaluate
    monkeypatch.setattr(real, "evaluate", lambda *a, **k: evaluated.append(k) or evaluate(*a, **k))
    real.run_real(tmp_path / "second", seeds=1, names=["nsru[retain]"], facts=facts, load=load, audit=False,
                  before=tmp_path / "first", log=lambda *a: None)
    first, second = ([json.loads(line) for line in (tmp_path / d / "runs.jsonl").read_text().splitlines()]
                     for d in ("first", "second"))
    assert len(evaluated) == 1 and evaluated[0]["before_ppl"] == first[0]["ppl"]  # the run only
    assert second[0] == first[0]
    with pytest.raises(ValueError, match="audited with None"):
        real.run_real(tmp_path / "third", seeds=1, names=["nsru[retain]"], facts=facts, load=load,
                      before=tmp_path / "first", log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        real.run_real(tmp_path / "third", seeds=1, names=["nsru[retain]"], facts=facts, load=load, audit=False,
                      before=tmp_path / "nowhere", log=lambda *a: None)
