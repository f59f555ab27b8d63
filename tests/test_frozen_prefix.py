"""Frozen-prefix caching gives the full model's logits and gradients, computing each prefix once."""

import torch

import nsru
from nsru.config import UnlearnConfig
from nsru.data import QACollator, encode_qa
from nsru.frozen_prefix import FrozenPrefix
from nsru.methods import LossContext
from nsru.objectives import nll_loss
from tinylm import trained_world_model


def test_prefix_cache_matches_the_full_forward_and_runs_each_prefix_once():
    model, tok, forget, retain = trained_world_model()
    layers = nsru.apply_nsru(model, r=4, layers="1")
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    batch = QACollator(tok)([encode_qa(tok, r["question"], r["answer"]) for r in forget + retain[:3]])
    ctx = LossContext(model, UnlearnConfig(method="nsru"), prefix=FrozenPrefix.find(model))
    assert isinstance(ctx.prefix, FrozenPrefix) and ctx.prefix.first == 1

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_full = nll_loss(full, batch["labels"])
    grads_full = torch.autograd.grad(loss_full, [l.lora_B for l in layers.values()])
    out = ctx.forward(batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], full[mask], rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(nll_loss(out, batch["labels"]), [l.lora_B for l in layers.values()])
    for g, h in zip(grads, grads_full):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    # the reference (adapters off) and later steps reuse the cached prefixes
    ref = ctx.ref_forward(batch).logits
    with nsru.adapter_disabled(model):
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ref[mask], want[mask], rtol=1e-5, atol=1e-5)
    ctx.forward(batch)
    assert ctx.prefix.computed == batch["input_ids"].shape[0]


def test_no_prefix_when_the_bottom_layer_is_adapted_or_hidden_states_are_asked_for():
    model, tok, forget, _ = trained_world_model()
    nsru.apply_nsru(model, r=4)
    assert FrozenPrefix.find(model) is None
    model, tok, forget, _ = trained_world_model()
    nsru.apply_nsru(model, r=4, layers="1")
    prefix = FrozenPrefix.find(model)
    batch = QACollator(tok)([encode_qa(tok, r["question"], r["answer"]) for r in forget])
    out = prefix(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert len(out.hidden_states) == 3 and prefix.computed == 0  # the full model ran


def test_unlearn_with_a_layer_band_trains_through_the_prefix_cache(monkeypatch):
    """The trainer installs the cache (LossContext only runs what it is given)."""
    import nsru.frozen_prefix as fp

    model, tok, forget, retain = trained_world_model()
    calls = []
    original = fp.FrozenPrefix.__call__
    monkeypatch.setattr(fp.FrozenPrefix, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    nsru.unlearn(model, tok, forget, retain, steps=2, batch_size=2, layers="1", stats="retain", progress=False)
    assert calls, "nsru.unlearn with adapters on layer 1 only never ran the frozen-prefix cache"
