"""nsru.metrics: each metric against a hand computation on a tiny random Llama and a tiny world;
nsru.evaluation's TOFU- and WMDP-style entries against the metrics they are made of."""

import math

import pytest
import torch
import torch.nn.functional as F

from nsru import evaluation as E
from nsru import metrics as M
from nsru.bench.models import ModelConfig, _llama, build_tokenizer
from nsru.bench.world import make_world
from nsru.data import encode_qa


@pytest.fixture(scope="module")
def world():
    return make_world(seed=1, n_people=20, n_entities=3)


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(world, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    m = _llama(cfg, tok, seed=0)
    m.eval()
    return m


def _nll_one(model, tok, q, a):
    enc = encode_qa(tok, q, a)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor(enc["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    mask = labels[1:] != -100
    return F.cross_entropy(logits[mask], labels[1:][mask]).item()


def test_probability_matches_unbatched_computation(model, tok, world):
    rows = world.split("forget10")[:7]
    got = M.probability(model, tok, rows, batch_size=3)
    want = [math.exp(-_nll_one(model, tok, r["question"], r["answer"])) for r in rows]
    assert got["values"] == pytest.approx(want, rel=1e-4)
    assert got["mean"] == pytest.approx(sum(want) / len(want), rel=1e-4)
    para = M.probability(model, tok, rows, field="paraphrased_answer", batch_size=64)
    assert para["values"][0] == pytest.approx(math.exp(-_nll_one(model, tok, rows[0]["question"], rows[0]["paraphrased_answer"])), rel=1e-4)


def test_truth_ratio_definition(model, tok, world):
    rows = world.split("forget10")[:4]
    tr = M.truth_ratio(model, tok, rows, batch_size=5)
    for row, value in zip(rows, tr["values"]):
        p_true = math.exp(-_nll_one(model, tok, row["question"], row["paraphrased_answer"]))
        nll_false = [_nll_one(model, tok, row["question"], p) for p in row["perturbed_answer"]]
        p_false = math.exp(-sum(nll_false) / len(nll_false))
        assert value == pytest.approx(p_false / p_true, rel=1e-3)
    v = tr["values"]
    assert tr["closer_to_1"] == pytest.approx(sum(min(x, 1 / x) for x in v) / len(v))
    assert tr["true_better"] == pytest.approx(sum(max(0, 1 - x) for x in v) / len(v))


def test_batched_generation_matches_one_at_a_time(model, tok, world):
    questions = [r["question"] for r in world.split("forget10")[:5]]
    batched = M.generate(model, tok, questions, max_new_tokens=6, batch_size=5)
    single = [M.generate(model, tok, [q], max_new_tokens=6, batch_size=1)[0] for q in questions]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_rouge_and_safe_rate_on_given_generations(model, tok, world):
    rows = world.split("forget01")[:3]
    gens = [rows[0]["answer"], "nothing at all", "I'm sorry, but I can't help with that."]
    r = M.rouge_recall(model, tok, rows, generations=gens)
    assert r["values"][0] == pytest.approx(1.0)
    assert r["values"][1] == 0.0
    s = M.safe_rate(model, tok, rows, generations=gens)
    assert s["values"] == [False, False, True]
    assert s["rate"] == pytest.approx(1 / 3)
    custom = M.safe_rate(model, tok, rows, generations=gens, is_safe=lambda t: t.startswith("nothing"))
    assert custom["values"] == [False, True, False]


def test_mc_accuracy_is_the_argmax_of_letter_loglik(model, tok, world):
    rows = world.mc("benign")[:6]
    res = M.mc_accuracy(model, tok, rows, batch_size=4)
    letter_ids = [tok(" " + L, add_special_tokens=False)["input_ids"][0] for L in "ABCD"]
    for row, ll, pred, ok in zip(rows, res["loglik"], res["preds"], res["values"]):
        ids = torch.tensor([tok(M.format_mc(row["question"], row["choices"]))["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        assert ll == pytest.approx(logp[letter_ids].tolist(), abs=1e-4)
        assert pred == int(logp[letter_ids].argmax())
        assert ok == (pred == row["answer"])
    assert res["acc"] == pytest.approx(sum(res["values"]) / len(rows))
    # answers given as letters work too
    as_letters = [dict(r, answer="ABCD"[r["answer"]]) for r in rows]
    assert M.mc_accuracy(model, tok, as_letters)["preds"] == res["preds"]
    with pytest.raises(ValueError, match="row 0"):
        M.mc_accuracy(model, tok, [dict(rows[0], answer=7)])


def test_evaluate_wmdp(model, tok, world):
    hazard, benign = world.mc("hazard")[:4], world.mc("benign")[:6]
    rep = E.evaluate_wmdp(model, tok, hazard, {"a": benign[:2], "b": benign[2:]}, progress=False)
    assert rep["hazard_acc"] == M.mc_accuracy(model, tok, hazard)["acc"]
    assert rep["benign_acc"] == pytest.approx(M.mc_accuracy(model, tok, benign)["acc"])
    assert set(rep) == {"hazard_acc", "benign_acc", "a_acc", "b_acc"}
    # one set of rows, or either side alone
    assert E.evaluate_wmdp(model, tok, hazard, benign, progress=False) == {k: rep[k] for k in ("hazard_acc", "benign_acc")}
    assert E.evaluate_wmdp(model, tok, None, {"a": benign[:2]}, progress=False) == {"a_acc": rep["a_acc"],
                                                                                    "benign_acc": rep["a_acc"]}
    assert E.evaluate_wmdp(model, tok, hazard, progress=False) == {"hazard_acc": rep["hazard_acc"]}
    with pytest.raises(ValueError, match="no hazardous or benign rows"):
        E.evaluate_wmdp(model, tok, None)


def test_forget_quality_and_model_utility():
    a = [0.1, 0.5, 0.9, 1.3, 0.7]
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    assert M.forget_quality([0.01] * 30, [5.0] * 30) < 1e-6
    assert M.model_utility([0.5, 0.5]) == pytest.approx(0.5)
    assert M.model_utility({"a": 1.0, "b": 0.5}) == pytest.approx(2 / 3)
    assert M.model_utility([0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        M.forget_quality([], a)


def test_evaluate_tofu_report(model, tok, world):
    forget = world.split("forget10")[:6]
    retain = world.split("retain_perturbed")[:6]
    general = {"world_facts": world.split("world_facts")[:6]}
    ref = E.evaluate_tofu(model, tok, forget, retain, general, max_new_tokens=4, progress=False)
    assert ref["forget_quality"] is None
    assert ref["skipped"] == {"forget_quality": "no retain-model truth ratios given (retain_tr_values)"}
    rep = E.evaluate_tofu(model, tok, forget, retain, general, retain_tr_values=ref["forget_tr_values"],
                          max_new_tokens=4, progress=False)
    assert rep["forget_quality"] == pytest.approx(1.0)  # same model, same truth ratios
    assert rep["skipped"] == {}
    parts = [rep[f"{s}_{k}"] for s in ("retain", "world_facts") for k in ("prob", "rouge", "truth_ratio")]
    assert rep["model_utility"] == pytest.approx(M.model_utility(parts))
    assert rep["forget_prob"] == pytest.approx(M.probability(model, tok, forget)["mean"])
    assert rep["forget_truth_ratio"] == pytest.approx(M.truth_ratio(model, tok, forget)["closer_to_1"])
    gens = M.generate(model, tok, [r["question"] for r in forget], max_new_tokens=4)
    assert rep["forget_generations"] == gens
    assert rep["forget_rouge"] == pytest.approx(M.rouge_recall(model, tok, forget, generations=gens)["mean"])
    assert rep["safe_rate"] == M.safe_rate(model, tok, forget, generations=gens)["rate"]


def test_bad_rows_are_named(model, tok):
    with pytest.raises(ValueError, match="row 1 has no field 'answer'"):
        M.probability(model, tok, [{"question": "q?", "answer": "a"}, {"question": "q?"}])
    with pytest.raises(ValueError, match="empty"):
        M.truth_ratio(model, tok, [])


def test_cloze_accuracy_picks_the_most_likely_answer(model, tok, world):
    rows = world.split("forget10")[:5]
    mc = []
    for i, r in enumerate(rows):
        # the row's answer sentence with its subject swapped for other people: the subject is the "choice"
        subject = r["subject"]
        others = sorted({p["subject"] for p in world.split("retain90")} - {subject})[:3]
        mc.append({"question": r["question"], "choices": others[:i % 4] + [subject] + others[i % 4:],
                   "answer": i % 4, "answer_text": r["answer"]})
    got = M.cloze_accuracy(model, tok, mc, batch_size=3)
    for row, pred in zip(mc, got["preds"]):
        lengths = [sum(1 for l in encode_qa(tok, row["question"], row["answer_text"].replace(row["choices"][row["answer"]], c))["labels"] if l != -100)
                   for c in row["choices"]]
        totals = [-_nll_one(model, tok, row["question"], row["answer_text"].replace(row["choices"][row["answer"]], c)) * n
                  for c, n in zip(row["choices"], lengths)]
        assert pred == max(range(4), key=totals.__getitem__)
        want, _ = M.answer_logprob(model, tok, [row["question"]] * 4,
                                   [row["answer_text"].replace(row["choices"][row["answer"]], c) for c in row["choices"]])
        assert got["loglik"][mc.index(row)] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert got["acc"] == pytest.approx(sum(p == r["answer"] for p, r in zip(got["preds"], mc)) / len(mc))
    # without answer_text the bare choices are scored
    bare = M.cloze_accuracy(model, tok, [{k: v for k, v in r.items() if k != "answer_text"} for r in mc])
    assert len(bare["preds"]) == len(mc)
    with pytest.raises(ValueError, match="does not contain the right choice"):
        M.cloze_accuracy(model, tok, [{**mc[0], "answer_text": "nothing here"}])
    with pytest.raises(ValueError, match="not an index"):
        M.cloze_accuracy(model, tok, [{**mc[0], "answer": 7}])


def test_cloze_accuracy_scores_prompt_rows_as_plain_continuations(model, tok, world):
    """A row with ``prompt`` (the audit's few-shot, role-play, pre-filled and cloze probes): each
    choice is the summed log-probability of its tokens after the prompt as written — after a
    space unless the prompt ends in whitespace, no eos — and such rows mix with question rows."""
    rows = world.split("forget10")[:3]
    subjects = [r["subject"] for r in rows]
    prompts = [{"prompt": f"Question: {r['question']}\nAnswer: Sure, here it is:", "choices": subjects,
                "answer": i} for i, r in enumerate(rows)]
    prompts.append({"prompt": "The weather today is\n", "choices": ["sunny", "rain"], "answer": 0})
    question = {"question": rows[0]["question"], "choices": subjects, "answer": 0}
    got = M.cloze_accuracy(model, tok, [*prompts, question], batch_size=8)
    for row, scores in zip(prompts, got["loglik"]):
        ids = list(tok(row["prompt"])["input_ids"])
        sep = "" if row["prompt"].endswith("\n") else " "
        for choice, score in zip(row["choices"], scores):
            cont = list(tok(sep + choice, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1].log_softmax(-1)
            assert score == pytest.approx(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()), abs=1e-4)
    assert got["loglik"][-1] == pytest.approx(M.cloze_accuracy(model, tok, [question])["loglik"][0], abs=1e-4)
    with pytest.raises(ValueError, match="row 0 has neither 'question' nor 'prompt'"):
        M.cloze_accuracy(model, tok, [{"choices": ["a", "b"], "answer": 0}])


def test_perplexity_is_exp_of_mean_token_nll(model, tok):
    from nsru.data import encode_text

    texts = ["Alpha beta gamma delta.", "A much longer sentence about the weather and rivers and trains."]
    total, count = 0.0, 0
    for t in texts:
        enc = encode_text(tok, t)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert M.perplexity(model, tok, texts, batch_size=1) == pytest.approx(math.exp(total / count), rel=1e-4)
    assert M.perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# false refusals and skipped metrics


def _unspaced(text):
    """The test tokenizer of tinylm decodes "I'm" as "I ' m"; undo that before detecting refusals."""
    return M.is_safe_response(text.replace(" ' ", "'"))


def test_false_refusal_rate_on_given_generations(model, tok, world):
    rows = world.split("retain90")[:4]
    gens = ["I don't have that information.", rows[1]["answer"], "I'm sorry, but I can't help.", "Paris."]
    got = M.false_refusal_rate(model, tok, rows, generations=gens)
    assert got["values"] == [True, False, True, False] and got["rate"] == pytest.approx(0.5)
    assert got["generations"] == gens
    # the same computation as safe_rate, under the name that says which way is good
    assert got == M.safe_rate(model, tok, rows, generations=gens)
    assert M.false_refusal_rate(model, tok, rows, generations=gens, is_safe=lambda t: t == "Paris.")["rate"] == 0.25
    with pytest.raises(ValueError, match="false_refusal_rate: 3 generations for 4 rows"):
        M.false_refusal_rate(model, tok, rows, generations=gens[:3])
    with pytest.raises(ValueError, match="false_refusal_rate: the set is empty"):
        M.false_refusal_rate(model, tok, [])


def test_false_refusal_rate_counts_the_greedy_refusals_of_a_trained_model():
    """A tiny model trained to answer the world's people and to refuse unknown ones: asked about
    six known people and four unknown ones, it refuses exactly the four."""
    from tinylm import one_thread, trained_world_model, unknown_people_rows

    trained, wtok, _, retain = trained_world_model()
    rows = retain[:6] + unknown_people_rows()[:4]
    with one_thread():
        got = M.false_refusal_rate(trained, wtok, rows, is_safe=_unspaced, max_new_tokens=16, batch_size=4)
    assert got["values"] == [False] * 6 + [True] * 4, got["generations"]
    assert got["rate"] == pytest.approx(0.4)


def test_evaluate_qa_scores_refusals_from_its_one_generation_pass(model, tok, world, monkeypatch):
    rows = world.split("retain_perturbed")[:4]
    canned = ["I don't know.", rows[1]["answer"], rows[2]["answer"], "I cannot say."]
    calls = []

    def fake_generate(model, tokenizer, questions, *args, **kwargs):
        calls.append(list(questions))
        return canned[:len(questions)]

    monkeypatch.setattr(M, "generate", fake_generate)
    kept = M.evaluate_qa(model, tok, rows, forget=False)
    assert len(calls) == 1  # ROUGE and the refusal rate share the greedy answers
    assert kept["false_refusal"] == pytest.approx(0.5) and "safe_rate" not in kept
    assert kept["refusal_values"] == [True, False, False, True]
    assert kept["rouge_values"][1] == pytest.approx(1.0) and kept["skipped"] == {}
    forgot = M.evaluate_qa(model, tok, rows, forget=True)
    assert forgot["safe_rate"] == pytest.approx(0.5) and "false_refusal" not in forgot
    assert len(calls) == 2


def test_evaluate_qa_names_a_truth_ratio_it_cannot_compute(model, tok, world):
    rows = world.split("retain_perturbed")[:3]
    bare = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    rep = M.evaluate_qa(model, tok, bare, max_new_tokens=2)
    assert "truth_ratio" not in rep and "tr_values" not in rep
    assert rep["skipped"] == {"truth_ratio": "rows have no paraphrased_answer and perturbed_answer"}
    mixed = M.evaluate_qa(model, tok, [bare[0], *rows[1:]], max_new_tokens=2)
    assert mixed["skipped"] == {"truth_ratio": "1 of 3 rows (first: row 0) have no paraphrased_answer and "
                                               "perturbed_answer"}


def test_evaluate_tofu_reports_false_refusals_and_what_it_skipped(model, tok, world, monkeypatch):
    forget = world.split("forget10")[:4]
    retain = world.split("retain_perturbed")[:4]
    facts = [{"question": r["question"], "answer": r["answer"]} for r in world.split("world_facts")[:5]]
    refused = {forget[0]["question"], retain[0]["question"], retain[3]["question"], *[r["question"] for r in facts[:4]]}

    def fake_generate(model, tokenizer, questions, *args, **kwargs):
        return ["I'm sorry, I don't know." if q in refused else "Oslo." for q in questions]

    monkeypatch.setattr(M, "generate", fake_generate)
    rep = E.evaluate_tofu(model, tok, forget, retain, {"world_facts": facts}, progress=False)
    assert rep["safe_rate"] == pytest.approx(0.25)
    assert rep["retain_false_refusal"] == pytest.approx(0.5)
    assert rep["world_facts_false_refusal"] == pytest.approx(0.8)
    # the world facts have no perturbed answers: their truth ratio is skipped, and so is forget quality
    assert rep["skipped"] == {
        "world_facts_truth_ratio": "rows have no paraphrased_answer and perturbed_answer",
        "forget_quality": "no retain-model truth ratios given (retain_tr_values)",
    }
    assert "world_facts_truth_ratio" not in rep
    parts = [rep[k] for k in ("retain_prob", "retain_rouge", "retain_truth_ratio", "world_facts_prob",
                              "world_facts_rouge")]
    assert rep["model_utility"] == pytest.approx(M.model_utility(parts))
    bare_forget = [{"question": r["question"], "answer": r["answer"]} for r in forget]
    rep = E.evaluate_tofu(model, tok, bare_forget, retain, retain_tr_values=[0.5] * 4, progress=False)
    assert rep["forget_quality"] is None and rep["forget_truth_ratio"] is None
    assert rep["skipped"] == {
        "forget_truth_ratio": "rows have no paraphrased_answer and perturbed_answer",
        "forget_quality": "no forget truth ratios: rows have no paraphrased_answer and perturbed_answer",
    }


# ----------------------------------------------------------------------------------------------
# what the entries compute on request


def test_evaluate_qa_computes_only_the_measures_asked_for(model, tok, world, monkeypatch):
    rows = world.split("retain_perturbed")[:4]
    full = M.evaluate_qa(model, tok, rows, max_new_tokens=3)
    calls = []
    real_generate = M.generate
    monkeypatch.setattr(M, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    prob = M.evaluate_qa(model, tok, rows, max_new_tokens=3, measures=("prob",))
    assert calls == [] and prob == {"prob": full["prob"], "prob_values": full["prob_values"], "skipped": {}}
    refusals = M.evaluate_qa(model, tok, rows, max_new_tokens=3, measures=("false_refusal", "truth_ratio"))
    assert len(calls) == 1
    assert {k: refusals[k] for k in ("false_refusal", "refusal_values", "generations", "truth_ratio", "tr_values")} \
        == {k: full[k] for k in ("false_refusal", "refusal_values", "generations", "truth_ratio", "tr_values")}
    assert "prob" not in refusals and "rouge" not in refusals
    with pytest.raises(ValueError, match="unknown measure 'bleu'; choose from prob, rouge"):
        M.evaluate_qa(model, tok, rows, measures=("bleu",))


def test_evaluate_tofu_on_part_of_the_sets_with_safe_targets_and_details(model, tok, world):
    forget = world.split("forget10")[:4]
    retain = world.split("retain_perturbed")[:4]
    targets = [f"I don't know who {r['subject']} is." for r in forget]
    details = {}
    rep = E.evaluate_tofu(model, tok, forget, retain, safe_targets=targets, measures=("prob", "safe_rate"),
                          max_new_tokens=3, progress=False, details=details)
    assert set(rep) == {"forget_prob", "safe_rate", "safe_prob", "retain_prob", "model_utility", "forget_generations",
                        "skipped"}
    safe_rows = [{"question": r["question"], "answer": t} for r, t in zip(forget, targets)]
    assert rep["safe_prob"] == M.probability(model, tok, safe_rows)["mean"]
    assert rep["model_utility"] == rep["retain_prob"] == M.probability(model, tok, retain)["mean"]
    assert set(details) == {"forget_generations", "forget_refusals"}
    assert details["forget_generations"] == rep["forget_generations"]
    with pytest.raises(ValueError, match="3 safe targets for 4 forget rows"):
        E.evaluate_tofu(model, tok, forget, retain, safe_targets=targets[:3], progress=False)
    # the forget set alone: nothing to keep, so no utility, named in skipped
    alone = E.evaluate_tofu(model, tok, forget, None, max_new_tokens=2, progress=False)
    why = "no retain or general questions given"
    assert alone["skipped"]["false_refusal"] == alone["skipped"]["model_utility"] == why
    assert "model_utility" not in alone
    # kept sets alone: no forget keys at all
    kept = E.evaluate_tofu(model, tok, None, retain, max_new_tokens=2, progress=False, details=details)
    assert not [k for k in kept if k.startswith("forget") or k == "safe_rate"] and kept["skipped"] == {}
    assert {"retain_generations", "retain_refusals"} <= set(details)
    with pytest.raises(ValueError, match="no forget, retain or general rows"):
        E.evaluate_tofu(model, tok, None, None)


def test_mean_leakage_is_one_without_a_basis_and_the_subspace_leakage_with_one(model, tok, world):
    import copy
    import statistics

    from nsru.adapt import apply_nsru
    from nsru.data import input_batches, pad_token_id
    from nsru.subspace import leakage

    rows = [{"question": r["question"], "answer": r["answer"]} for r in world.split("world_facts")[:6]]
    assert M.mean_leakage(model, tok, rows) == 1.0  # no adapters at all
    adapted = copy.deepcopy(model)
    layers = apply_nsru(adapted, target_modules=["q_proj", "v_proj"], r=2)
    assert M.mean_leakage(adapted, tok, rows) == 1.0  # adapters without a retain basis
    gen = torch.Generator().manual_seed(0)
    for layer in layers.values():
        layer.set_retain_basis(torch.linalg.qr(torch.randn(layer.in_features, 4, generator=gen))[0])
    want = leakage(adapted, input_batches([encode_qa(tok, r["question"], r["answer"]) for r in rows],
                                          pad_token_id(tok)), progress=False)
    got = M.mean_leakage(adapted, tok, rows)
    assert 0 < got < 1
    assert got == pytest.approx(statistics.fmean(want.values()))

