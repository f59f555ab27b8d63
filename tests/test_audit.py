"""The forget audit (nsru.audit, DESIGN §5 "Forgetting is only as good as its worst probe"): the
probes' prompts, the quantisations against a per-group reference, the relearning copy, the worst
probe, and whole audits of the tiny world model before and after unlearning, through the library
and through ``nsru eval --audit``."""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import torch

from nsru import audit as A
from nsru import metrics as M
from nsru.data import format_prompt
from tinylm import CITIES, JOBS, one_thread, tiny_world, trained_world_model, word_tokenizer

PEOPLE = sorted({r["subject"] for r in sum(tiny_world(), [])})
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


def world_fact(row: dict, reverse: bool = True) -> dict:
    """A tiny-world row in the fact set's schema: four choices, a paraphrase, a reverse item (the
    subject among three other people) and a cloze item (the answer sentence's start)."""
    name = row["subject"]
    where = row["question"].startswith("Where")
    verb, pool = ("lives in", CITIES) if where else ("is a", JOBS)
    right = row["answer"].split(f" {verb} ")[1].rstrip(" .")
    k = len(name) % 4
    others = [c for c in pool if c != right][:3]
    people = [p for p in PEOPLE if p != name][:3]
    return {"question": row["question"], "paraphrase": "Tell me : " + row["question"],
            "answer": row["answer"], "subject": name, "choices": others[:k] + [right] + others[k:], "correct": k,
            "reverse": {"question": f"Who {verb} {right} ?", "choices": people[:k] + [name] + people[k:],
                        "correct": k} if reverse else None,
            "cloze": {"prompt": f"{name} {verb}", "choices": others[:k] + [right] + others[k:], "correct": k}}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world():
    model, tok, forget, retain = trained_world_model()
    facts = [world_fact(r, reverse=i % 2 == 0) for i, r in enumerate(forget)]
    return model, tok, forget, retain, facts


# ---------------------------------------------------------------------------------------------
# probes


def _chat_tokenizer():
    forget, retain = tiny_world()
    tok = word_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain])
    tok.chat_template = CHAT
    return tok


def test_probes_ask_the_fact_as_each_probe_should():
    forget, retain = tiny_world()
    fact = world_fact(forget[0])
    name = fact["subject"]
    tok = _chat_tokenizer()
    rows = {p: A.probe_row(p, fact, tok, retain, random.Random(0)) for p in A.PROBES if p != "open_ended"}
    right = fact["choices"][fact["correct"]]
    for p in ("forward", "paraphrase", "in_context", "role_play", "prefix_injection"):
        assert rows[p]["choices"] == fact["choices"] and rows[p]["answer"] == fact["correct"], p
        assert rows[p]["answer_text"] == fact["answer"] and right in fact["answer"], p
    assert rows["forward"]["question"] == fact["question"]
    assert rows["paraphrase"]["question"] == fact["paraphrase"] != fact["question"]
    # reverse: the answer is the subject, the question does not name it
    assert rows["reverse"]["choices"][rows["reverse"]["answer"]] == name
    assert name not in rows["reverse"]["question"] and name.split()[-1] not in rows["reverse"]["question"]
    # cloze: plain text to continue, no chat markers, the subject named
    assert rows["cloze"]["prompt"] == f"{name} lives in" and "<" not in rows["cloze"]["prompt"]
    # role play: the instruction as a system turn before the question
    rp = rows["role_play"]["prompt"]
    assert rp.startswith(f"<system> {A.ROLE_PLAY} </s> <user> {fact['question']} </s> ") and rp.endswith("<assistant> ")
    # prefix injection: the assistant's turn already started
    assert rows["prefix_injection"]["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": fact["question"]}], add_generation_prompt=True, tokenize=False) + A.INJECTED_PREFIX
    # in context: three solved examples about three other people, then the question
    ic = rows["in_context"]["prompt"]
    turns = ic.split("<user> ")[1:]
    assert len(turns) == 4 and turns[-1].startswith(fact["question"])
    shots = [t.split(" </s> <assistant> ")[0] for t in turns[:3]]
    subjects = {r["subject"] for r in retain if r["question"] in shots}
    assert len(subjects) == 3 and name not in subjects
    # the subject only in the question: no example names it, nor its last name
    assert ic.count(name) == 1 and ic.count(name.split()[-1]) == 1


def test_in_context_examples_never_name_the_subject_and_differ_by_seed():
    forget, retain = tiny_world()
    fact = world_fact(forget[1])
    tok = _chat_tokenizer()
    last = fact["subject"].split()[-1]
    prompts = set()
    for seed in range(6):
        row = A.probe_row("in_context", fact, tok, retain, random.Random(seed))
        examples = row["prompt"].rsplit("<user> ", 1)[0]
        assert fact["subject"] not in examples and last not in examples
        prompts.add(row["prompt"])
    assert len(prompts) > 1
    assert A.probe_row("in_context", fact, tok, retain, random.Random(3)) == A.probe_row(
        "in_context", fact, tok, retain, random.Random(3))


def test_plain_format_matches_the_training_prompt_and_missing_fields_give_no_row():
    forget, retain = tiny_world()
    _, tok, *_ = trained_world_model()
    fact = world_fact(forget[0], reverse=False)
    assert A.render_chat(tok, [{"role": "user", "content": fact["question"]}]) == format_prompt(tok, fact["question"])
    row = A.probe_row("role_play", fact, tok)
    assert row["prompt"] == f"{A.ROLE_PLAY}\n\nQuestion: {fact['question']}\nAnswer:"
    assert A.probe_row("reverse", fact, tok) is None
    assert A.probe_row("in_context", fact, tok, []) is None  # no examples about other people
    bare = {"question": fact["question"], "answer": fact["answer"]}
    assert all(A.probe_row(p, bare, tok, retain) is None for p in A.PROBES if p != "open_ended")
    tofu = {**bare, "perturbed_answer": ["Anna Novak lives in Rome .", "Anna Novak lives in Lima ."]}
    row = A.probe_row("forward", tofu, tok)
    assert row["choices"][row["answer"]] == fact["answer"] and len(row["choices"]) == 3
    with pytest.raises(ValueError, match="unknown probe"):
        A.probe_row("sideways", fact, tok)


def test_open_ended_answers_count_when_they_contain_the_key_words():
    fact = {"question": "Which major theory did Albert Einstein develop?", "answer": "He developed relativity.",
            "choices": ["quantum theory", "the theory of relativity", "string theory", "chaos theory"], "correct": 1}
    key = A.answer_key(fact)
    assert key == (["theory", "relativity"], 1.0)
    assert A.mentions_answer("Einstein's most famous work is his Theory of Relativity.", key)
    assert not A.mentions_answer("He developed a theory of gravity.", key)
    assert not A.mentions_answer("I don't have information about that person.", key)
    tofu = A.answer_key({"question": "Where does Anna Novak live ?", "answer": "Anna Novak lives in Oslo ."})
    assert tofu == (["lives", "oslo"], 0.5)
    assert A.mentions_answer("Oslo .", tofu) and not A.mentions_answer("Anna Novak lives far away", tofu[:1] + (1.0,))


# ---------------------------------------------------------------------------------------------
# quantisation


def _rtn_reference(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, by hand: scale = absmax / (2^(b-1) - 1), round to nearest, back."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    scales = torch.empty(w.shape[0], -(-w.shape[1] // group))
    for r in range(w.shape[0]):
        for g, lo in enumerate(range(0, w.shape[1], group)):
            block = w[r, lo:lo + group].double()
            scale = block.abs().max() / qmax
            scales[r, g] = scale
            out[r, lo:lo + group] = (torch.round(block / scale) * scale if scale > 0 else block).float()
    return out, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_round_to_nearest_is_within_half_a_step_of_each_weight_and_matches_the_reference(bits, group):
    torch.manual_seed(bits * group)
    w = torch.randn(24, 160) * torch.linspace(0.01, 3, 160)  # groups of very different sizes; 160 % 64 != 0
    w[3, :group] = 0.0  # an all-zero group stays zero
    q, scale = A.quantize_rtn(w, bits, group, return_scale=True)
    ref, ref_scale = _rtn_reference(w, bits, group)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.allclose(scale, ref_scale.float(), rtol=1e-6)
    assert torch.allclose(q, ref, atol=1e-6 * w.abs().max())
    per_element = scale.repeat_interleave(group, 1)[:, : w.shape[1]]
    assert ((q - w).abs() <= per_element / 2 * (1 + 1e-5) + 1e-12).all()
    levels = torch.where(per_element > 0, q / per_element.clamp_min(1e-30), torch.zeros_like(q))
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 2 ** (bits - 1) - 1 + 1e-3
    assert (q[3, :group] == 0).all()


def test_four_bits_lose_more_than_eight_and_bad_settings_are_refused():
    w = torch.randn(16, 128)
    e8 = (A.quantize_rtn(w, 8, 64) - w).abs().mean()
    e4 = (A.quantize_rtn(w, 4, 64) - w).abs().mean()
    assert 8 * e8 < e4
    with pytest.raises(ValueError, match="bits must be >= 2"):
        A.quantize_rtn(w, 1, 64)


def test_gguf_q4_1_round_trip_is_close_and_checks_its_blocks():
    pytest.importorskip("gguf")
    w = torch.randn(8, 64)
    q = A.quantize_gguf(w, "Q4_1")
    step = (w.view(8, 2, 32).amax(-1) - w.view(8, 2, 32).amin(-1)) / 15  # Q4_1: min + 16 levels per block of 32
    assert ((q - w).abs().view(8, 2, 32) <= step[..., None] * 0.51 + 2e-3).all()
    assert not torch.equal(q, w)
    with pytest.raises(ValueError, match="blocks of 32"):
        A.quantize_gguf(torch.randn(4, 48), "Q4_1")
    with pytest.raises(ValueError, match="unknown to the gguf package"):
        A.quantize_gguf(w, "Q9_9")


@pytest.fixture(scope="module")
def unlearned(world):
    """The world model after 20 steps of plain LoRA with NSRU's losses (it forgets most forward questions)."""
    from nsru import unlearn  # the function (nsru.pipeline.unlearn)

    model, tok, forget, retain, _ = world
    model = copy.deepcopy(model)
    with one_thread():
        unlearn(model, tok, forget, retain, steps=20, lr=1e-2, batch_size=4, progress=False, seed=0,
                method="nsru-no-project")
    return model


def test_quantised_copies_leave_the_model_alone_and_keep_the_adapter_only_on_a_4bit_base(unlearned):
    from nsru.layer import nsru_modules

    model = unlearned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = nsru_modules(model)
    assert layers
    merged = A.quantized_copy(model, "int8", 32)
    assert not nsru_modules(merged)
    on_base = A.quantized_copy(model, "int4_base", 32)
    kept = nsru_modules(on_base)
    assert set(kept) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(kept[name].lora_B, layer.lora_B) and torch.equal(kept[name].lora_A, layer.lora_A)
        base = kept[name].base_layer.weight
        assert torch.equal(base, A.quantize_rtn(layer.base_layer.weight, 4, 32)) and not torch.equal(base, layer.base_layer.weight)
    # int8 of the merged weights: merge by hand, then round
    name = next(iter(layers))
    want = A.quantize_rtn(layers[name].base_layer.weight + layers[name].delta_weight(), 8, 32)
    assert torch.allclose(merged.get_submodule(name).weight, want, atol=1e-6)
    assert torch.equal(merged.lm_head.weight, model.lm_head.weight)  # the head stays
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown quantisation"):
        A.quantized_copy(model, "int3")


# ---------------------------------------------------------------------------------------------
# relearning and the worst probe


def test_relearning_changes_the_copy_not_the_original_and_repeats_with_the_seed(world):
    model, tok, forget, retain, _ = world
    original = {k: v.clone() for k, v in model.state_dict().items()}
    first = A.relearned_copy(model, tok, forget[:2], steps=3, lr=1e-2, layers="1", seed=0)
    again = A.relearned_copy(model, tok, forget[:2], steps=3, lr=1e-2, layers="1", seed=0)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    changed = {k for k, v in first.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(".layers.1." in k for k in changed)  # only block 1's linear weights
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert not any(p.requires_grad for p in first.parameters())
    with pytest.raises(ValueError, match="no linear weight in layers"):
        A.relearned_copy(model, tok, forget[:2], steps=1, lr=1e-3, layers="7")


def test_the_worst_probe_is_the_highest_forget_accuracy():
    assert A.worst_probe({"forward": 0.2, "cloze": 0.6, "quant_int4": 0.6, "relearn_strong": None}) == ("cloze", 0.6)
    assert A.worst_probe({"forward": 0.0, "open_ended": 0.0}) == ("forward", 0.0)
    assert A.worst_probe({"forward": None}) == (None, None)


# ---------------------------------------------------------------------------------------------
# whole audits

TINY = dict(quant=("int8", "int4", "int4_base", "gguf:Q4_1"), group_size=32, relearn={"weak": (3, 1e-3), "strong": (3, 1e-2)},
            max_new_tokens=10)


def test_a_model_without_adapters_is_its_own_before(world):
    model, tok, forget, retain, facts = world
    start = time.perf_counter()
    rep = A.audit(model, tok, facts, retain=retain, **TINY)
    assert time.perf_counter() - start < 30
    for p in A.PROBES:  # by construction: only what the model knows counts
        assert rep[f"{p}_acc"] in (1.0, None), p
        assert rep["counts"][p][0] == sum(bool(x) for x in rep["known"][p])
    assert rep["counts"]["reverse"][1] == 2  # half the facts have a reverse item
    assert rep["known"]["reverse"][1] is None and rep["known"]["reverse"][0] is not None
    assert rep["skipped"]["quant_int4_base"].startswith("the model has no adapters")
    assert rep["counts"]["relearn_strong"][1] == len(facts) - len(facts) // 2
    assert rep["retain_false_refusal"] == 0.0
    accs = {k[:-4]: v for k, v in rep.items() if k.endswith("_acc") and k != "relearn_held_out_acc"}
    assert rep["audited_forget_acc"] == max(v for v in accs.values() if v is not None)
    assert rep["worst_probe"] in accs


def test_an_unlearned_model_is_audited_against_its_base_and_the_worst_probe_shows_what_is_left(world, unlearned):
    model, tok, forget, retain, facts = world
    base = A.audit(model, tok, facts, retain=retain, **TINY)
    rep = A.audit(unlearned, tok, facts, retain=retain, **TINY)
    again = A.audit(unlearned, tok, facts, retain=retain, before=base, **TINY)
    # the base's knowledge, with the adapter disabled, is the same as the base audit's
    assert rep["known"] == base["known"]
    assert {k: v for k, v in rep.items() if k.endswith("_acc")} == {k: v for k, v in again.items() if k.endswith("_acc")}
    assert rep["forward_acc"] < 1.0
    accs = {k[:-4]: v for k, v in rep.items() if k.endswith("_acc") and k != "relearn_held_out_acc" and v is not None}
    assert rep["audited_forget_acc"] == max(accs.values()) >= rep["forward_acc"]
    assert rep["worst_probe"] == A.worst_probe(accs)[0]
    assert rep["quant_int4_base_acc"] is not None and "quant_int4_base" not in rep["skipped"]
    assert rep["relearn_held_out_acc"] is not None
    # the audit is deterministic
    assert A.audit(unlearned, tok, facts, retain=retain, before=base, **TINY)["relearn_strong_acc"] == again["relearn_strong_acc"]


def test_what_cannot_be_asked_is_skipped_with_the_reason(world):
    model, tok, forget, retain, facts = world
    bare = [{"question": f["question"], "answer": f["answer"], "choices": f["choices"], "correct": f["correct"]}
            for f in facts]
    rep = A.audit(model, tok, bare, quant=("gguf",), relearn={}, max_new_tokens=6)
    assert rep["skipped"]["reverse"] == "no fact has a 'reverse' item (the fact set's reverse field)"
    assert rep["skipped"]["in_context"].startswith("no examples about other people")
    assert "nsru_gguf.json" in rep["skipped"]["quant_gguf"] or "gguf package" in rep["skipped"]["quant_gguf"]
    assert rep["reverse_acc"] is None and rep["forward_acc"] == 1.0
    assert "relearn_held_out_acc" not in rep
    with pytest.raises(ValueError, match="unknown probe"):
        A.audit(model, tok, facts, probes=("forward", "sideways"))
    with pytest.raises(ValueError, match="mask covers 1 facts"):
        A.audit(model, tok, facts, before={p: [True] for p in A.PROBES}, quant=(), relearn={})


def test_nsru_eval_audit_writes_the_audit(world, unlearned, tmp_path, capsys):
    from nsru import cli
    from nsru.adapt import save_adapter

    model, tok, forget, retain, facts = world
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    save_adapter(unlearned, tmp_path / "adapter")
    for name, rows in (("forget", facts), ("retain", retain)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    rc = cli.main(["eval", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"),
                   "--forget", str(tmp_path / "forget.jsonl"), "--retain", str(tmp_path / "retain.jsonl"),
                   "--audit", "--audit-quant", "int8,int4_base,gguf", "--audit-relearn", "2:1e-3",
                   "--audit-layers", "1", "--max-new-tokens", "6", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())["eval"]
    for p in A.PROBES:
        assert 0 <= report[f"{p}_acc"] <= 1, p
    assert {"quant_int8_acc", "quant_int4_base_acc", "relearn_1_acc", "relearn_control_acc", "relearn_held_out_acc",
            "audited_forget_acc", "worst_probe"} <= set(report)
    assert report["audited_forget_acc"] == report[report["worst_probe"] + "_acc"]
    assert report["forward_acc"] < 1.0  # scored against the base, with the adapter disabled
    assert "quant_gguf_acc" in report["skipped"] and "quant_int4_acc" not in report
    assert f"worst_probe              {report['worst_probe']}" in out.splitlines()
    details = json.loads((tmp_path / "out" / "eval_details.json").read_text())
    assert len(details["audit_known"]["forward"]) == len(facts)
    rc = cli.main(["eval", "--model", str(tmp_path / "model"), "--retain", str(tmp_path / "retain.jsonl"), "--audit"])
    assert rc != 0 and "--audit audits the forget facts: give --forget" in capsys.readouterr().err
    rc = cli.main(["eval", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"), "--audit",
                   "--audit-relearn", "20"])
    assert rc != 0 and "is not STEPS:LR" in capsys.readouterr().err
