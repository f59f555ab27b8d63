"""The trainer's fast paths compute what the plain formula computes.

A trainer step of NSRU runs several forwards of the same model (safe target, forget, retain); the
gradients it hands the optimizer must be those of one backward through the written-out formula
``Y = X Wᵀ + b + s·X Ãᵀ Bᵀ``, ``Ã = A − (A U) Uᵀ`` (autograd then projects ``∂L/∂A`` itself),
however the trainer gets there: forming ``Ã`` once per step, projecting the ``lora_A`` gradients
once, or running a backward per loss term.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nsru
from conftest import tiny_llama, token_batches
from nsru.layer import NSRULinear
from nsru.methods import LossContext
from nsru.sampler import Stream
from nsru.train import Trainer
from nsru.pipeline import resolve_config
from tinylm import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _formula(layer: NSRULinear, x: torch.Tensor) -> torch.Tensor:
    """NSRULinear's forward written out with plain torch ops (autograd gives ∂L/∂A = (∂L/∂Ã) P⊥)."""
    if layer.disabled:
        return layer.base_layer(x)
    u = layer.retain_basis
    a_tilde = layer.lora_A - (layer.lora_A @ u) @ u.T
    return F.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ a_tilde.T) @ layer.lora_B.T


def _qa(g: torch.Generator, vocab: int) -> dict:
    q = torch.randint(4, vocab, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
    a = torch.randint(4, vocab, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
    return {"input_ids": q + a, "attention_mask": [1] * (len(q) + len(a)), "labels": [-100] * len(q) + a}


def _data(n: int = 8, vocab: int = 97, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    forget = []
    for _ in range(n):
        ex, other = _qa(g, vocab), _qa(g, vocab)
        n_q = ex["labels"].count(-100)
        answer = [t for t in other["labels"] if t != -100]
        safe = {"input_ids": ex["input_ids"][:n_q] + answer, "attention_mask": [1] * (n_q + len(answer)),
                "labels": [-100] * n_q + answer}
        forget.append({"forget": ex, "safe": safe})
    return forget, [{"retain": _qa(g, vocab)} for _ in range(n)]


def _adapted_model(project: bool):
    model = tiny_llama(seed=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    layers = nsru.apply_nsru(model, r=4, alpha=8.0)
    if project:
        moments = nsru.collect_second_moments(model, token_batches(n_batches=2, batch=4, length=10), progress=False)
        nsru.set_retain_bases(model, nsru.retain_bases(moments))
        assert any(0 < layer.k < layer.in_features for layer in layers.values())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 would leave every lora_A gradient zero
        for layer in layers.values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
    return model


def _trainer(model, method: str, **options) -> Trainer:
    # the warm-up's first step runs at lr 0: the parameters stay, their .grad holds the step's gradients
    values = {"batch_size": 4, "steps": 10, "lr": 1e-3, "warmup_steps": 2, "max_grad_norm": None, "progress": False}
    cfg, m = resolve_config(method, None, {**values, **options})
    forget, retain = _data()
    streams = {"forget": Stream(forget, cfg.batch_size, seed=0, salt=1),
               "retain": Stream(retain, cfg.batch_size, seed=0, salt=2)}
    adapters = nsru.nsru_modules(model)
    params = {f"{n}.{p}": getattr(layer, p) for n, layer in adapters.items() for p in ("lora_A", "lora_B")}
    for p in params.values():
        p.requires_grad_(True)
    return Trainer(model, cfg, m, LossContext(model, cfg), streams, params, adapters=adapters)


def _formula_gradients(trainer: Trainer, monkeypatch) -> dict[str, torch.Tensor]:
    """The gradients of one step of ``trainer``'s batches: the written-out formula, all micro-batches'
    losses summed, one backward."""
    micro = trainer._micro_batches()
    ctx = trainer.ctx
    ctx.counts = trainer._global_counts(micro)
    with monkeypatch.context() as patch:
        patch.setattr(NSRULinear, "forward", _formula)
        total = sum(trainer.method.loss(ctx, batch)["loss"] for batch in micro)
        total.backward()
    ctx.counts = None
    return {n: p.grad.detach().clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("method,grad_accum", [("nsru", 1), ("nsru", 2), ("nsru-no-project", 1), ("idkdpo", 1)])
def test_a_trainer_step_has_the_gradients_of_one_backward_through_the_formula(method, grad_accum, monkeypatch):
    model = _adapted_model(project=method == "nsru")
    reference = copy.deepcopy(model)
    trainer = _trainer(model, method, grad_accum=grad_accum)
    assert trainer.train_step()["lr"] == 0.0
    want = _formula_gradients(_trainer(reference, method, grad_accum=grad_accum), monkeypatch)
    for name, p in trainer.params.items():
        assert want[name].abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for layer in trainer.adapters.values():  # the gradient the optimizer saw is in the null space
        if layer.k:
            assert (layer.lora_A.grad @ layer.retain_basis).abs().max() <= 1e-5 * layer.lora_A.grad.abs().max()
