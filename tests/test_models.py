"""Tiny target models: tokenizer, training data, on-disk cache, determinism, and (slow) that the
default models learn the world."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nsru.bench import models as M
from nsru.bench.world import WorldConfig, make_world
from nsru.data import format_prompt

WORLD = WorldConfig(seed=2, n_people=20, n_entities=3)
TINY = M.ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SHORT = M.TrainConfig(epochs=1, batch_size=16, warmup_steps=5)


def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = M.load_tokenizer(WORLD, vocab_size=400, cache=tmp_path)
    assert len(tok) <= 400
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert not getattr(tok, "chat_template", None)
    row = make_world(WORLD).split("forget10")[0]
    text = format_prompt(tok, row["question"]) + " " + row["answer"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # the letters the multiple-choice metric scores are one token each
    assert all(len(tok(" " + L, add_special_tokens=False)["input_ids"]) == 1 for L in "ABCD")
    again = M.load_tokenizer(WORLD, vocab_size=400, cache=tmp_path)
    assert again(text)["input_ids"] == ids
    assert len(list(tmp_path.glob("tokenizer-*"))) == 1


def test_training_sets(tmp_path):
    world = make_world(WORLD)
    tok = M.load_tokenizer(WORLD, vocab_size=400, cache=tmp_path)
    full = M.training_examples(world, tok, "finetuned")
    retain = M.training_examples(world, tok, "retain", "forget10")
    decoded = [tok.decode(e["input_ids"]) for e in retain]
    for name in world.forget_people("forget10"):
        assert not any(name in d for d in decoded), name
    hazard_entities = {r["subject"] for r in world.mc("hazard")}
    assert not any(e in d for e in hazard_entities for d in decoded)
    n_forget = len(world.split("forget10")) + len(world.biographies("forget10"))
    n_hazard = len(world.domain_qa("hazard")) + len(world.corpus("hazard")) + len(world.mc("hazard"))
    assert len(full) - len(retain) == n_forget + n_hazard
    # question-answer examples carry labels only on the answer (and eos)
    ex = full[0]
    answer = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tok.decode(answer, skip_special_tokens=True).strip() == world.split("full")[0]["answer"]
    mc = M.mc_example(tok, world.mc("benign")[0])
    assert tok.decode([l for l in mc["labels"] if l != -100], skip_special_tokens=True).strip() in "ABCD"
    with pytest.raises(ValueError, match="kind"):
        M.training_examples(world, tok, "other")


def test_cache_is_keyed_by_configuration_and_deterministic(tmp_path, monkeypatch):
    model, tok, path = M.finetuned_model(WORLD, TINY, SHORT, cache=tmp_path / "a", progress=False)
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    meta = json.loads((path / "nsru_target.json").read_text())
    assert meta["spec"]["kind"] == "finetuned" and meta["train_seconds"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("x")["input_ids"] == tok("x")["input_ids"]
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)

    # a second call loads from the cache without training
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the model was cached")

    with monkeypatch.context() as mp:
        mp.setattr(M, "train_lm", no_training)
        _, _, again = M.finetuned_model(WORLD, TINY, SHORT, cache=tmp_path / "a", progress=False)
    assert again == path

    # same settings in another cache: identical weights; other settings: another entry
    other, _, path_b = M.finetuned_model(WORLD, TINY, SHORT, cache=tmp_path / "b", progress=False)
    assert path_b.name == path.name
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    _, _, path_c = M.finetuned_model(WORLD, TINY, M.TrainConfig(epochs=1, batch_size=16, warmup_steps=5, seed=1),
                                     cache=tmp_path / "a", progress=False)
    assert path_c != path
    _, _, path_r = M.retain_model(WORLD, TINY, SHORT, cache=tmp_path / "a", progress=False)
    assert path_r.name.startswith("retain-") and path_r != path


def test_cache_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("NSRU_CACHE", str(tmp_path / "env"))
    assert M.cache_dir() == tmp_path / "env"
    assert M.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("NSRU_CACHE")
    assert M.cache_dir().name == "nsru"


def test_training_lowers_the_loss(tmp_path):
    world = make_world(WORLD)
    tok = M.load_tokenizer(WORLD, vocab_size=400, cache=tmp_path)
    examples = M.training_examples(world, tok, "finetuned")[:64]
    model = M._llama(TINY, tok, seed=0)
    collate = M.QACollator(tok)
    batch = collate(examples)
    with torch.no_grad():
        before = model(**batch).loss.item()
    M.train_lm(model, examples, tok, M.TrainConfig(epochs=6, batch_size=16, lr=3e-3, warmup_steps=2), progress=False)
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before - 1.0
    assert torch.get_num_threads() >= 1 and not model.training


@pytest.mark.slow
def test_default_models_learn_the_world(tmp_path):
    """The default recipe: the finetuned model knows the forget and retain facts, the retain model
    does not know the forget facts, and the hazardous multiple choice separates them."""
    from nsru import metrics

    start = time.perf_counter()
    pair = M.target_models(cache=tmp_path, progress=False)
    seconds = time.perf_counter() - start
    world = make_world()
    (ft, tok, _), (rt, _, _) = pair["finetuned"], pair["retain"]
    forget, retain = world.split("forget10"), world.split("retain_perturbed")
    ft_forget = metrics.evaluate_qa(ft, tok, forget, forget=True)
    ft_retain = metrics.evaluate_qa(ft, tok, retain)
    rt_forget = metrics.evaluate_qa(rt, tok, forget, forget=True)
    rt_retain = metrics.evaluate_qa(rt, tok, retain)
    assert ft_forget["prob"] > 0.8 and ft_forget["rouge"] > 0.8
    assert ft_retain["prob"] > 0.8 and rt_retain["rouge"] > 0.8
    assert rt_forget["prob"] < ft_forget["prob"] - 0.3
    assert rt_forget["rouge"] < ft_forget["rouge"] - 0.3
    assert metrics.forget_quality(ft_forget["tr_values"], rt_forget["tr_values"]) < 0.01
    assert metrics.mc_accuracy(ft, tok, world.mc("hazard"))["acc"] > 0.8
    assert metrics.mc_accuracy(rt, tok, world.mc("hazard"))["acc"] < 0.5
    assert metrics.mc_accuracy(rt, tok, world.mc("benign"))["acc"] > 0.7
    assert seconds < 600
