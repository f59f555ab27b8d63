"""Sharpness-aware forgetting (``sam_rho``): the weight gradient the hooks gather, the move along
its sign, and the trainer's three passes (suppression at W, suppression at W + δ, the other terms
at W)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nsru
from nsru.config import ConfigError
from nsru.layer import NSRULinear
from nsru.methods import METHODS, NSRU_WEIGHTS, nsru_loss, register_method
from nsru.sharpness import WeightAscent
from tinylm import one_thread, trained_world_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _layer(seed: int, k: int = 3) -> NSRULinear:
    torch.manual_seed(seed)
    layer = NSRULinear(nn.Linear(7, 5), r=2, alpha=4, name="probe")
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.set_retain_basis(torch.linalg.qr(torch.randn(7, k))[0])
    layer.base_layer.requires_grad_(False)
    return layer


def _loss(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (y.tanh() * torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)).sum(-1).mul(mask).sum()


def test_gathered_gradient_is_autograds_weight_gradient():
    layer = _layer(0)
    x = torch.randn(2, 4, 7)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])  # padding gets no gradient
    ascent = WeightAscent([layer])
    with ascent.gathering():
        _loss(layer(x), mask).backward()
        _loss(layer(x[:1]), mask[:1]).backward()  # two backwards in one block add up
    w = layer.weight.detach().clone().requires_grad_(True)
    a_tilde = layer.lora_A - (layer.lora_A @ layer.retain_basis) @ layer.retain_basis.T
    adapter = layer.scaling * (x @ a_tilde.T) @ layer.lora_B.T
    reference = _loss(x @ w.T + layer.bias + adapter, mask) + _loss((x @ w.T + layer.bias + adapter)[:1], mask[:1])
    expected, = torch.autograd.grad(reference, w)
    torch.testing.assert_close(ascent.grads[0], expected, rtol=1e-5, atol=1e-5)
    assert float(expected.abs().sum()) > 0


def test_weights_move_by_rho_along_the_gradient_sign_and_come_back_exactly():
    layers = [_layer(1), _layer(2, k=0), _layer(3)]
    before = [layer.weight.detach().clone() for layer in layers]
    ascent = WeightAscent(layers)
    with ascent.gathering():
        _loss(layers[0](torch.randn(3, 7)), torch.ones(3)).backward()
        _loss(layers[1](torch.randn(3, 7)), torch.ones(3)).backward()  # layers[2] never runs: no gradient
    rho = 0.25
    with ascent.moved(rho) as norm:
        moved = [layer.weight.detach() - b for layer, b in zip(layers, before)]
        assert norm == pytest.approx(float(torch.cat([g.flatten() for g in ascent.grads[:2]]).norm()))
        for step, g in zip(moved[:2], ascent.grads[:2]):
            torch.testing.assert_close(step, rho * g.sign(), rtol=0, atol=1e-6)
            assert float(g.abs().min()) > 0  # every weight moved: no zero in these gradients
        assert torch.equal(moved[2], torch.zeros_like(moved[2]))
    assert all(torch.equal(layer.weight, b) for layer, b in zip(layers, before))

    idle = WeightAscent([_layer(4)])  # nothing gathered: nothing moves
    with idle.moved(rho) as norm:
        assert norm == 0.0


_CALLS: list[tuple[str, torch.Tensor]] = []


def _probe(ctx, batch):
    """NSRU's loss, recording for each term it computes the first adapted weight it ran with."""
    layer = next(iter(nsru.nsru_modules(ctx.model).values()))
    inner = ctx.term_filter

    def filtered(name: str) -> bool:
        run = inner is None or inner(name)
        if run:
            _CALLS.append((name, layer.weight.detach().clone()))
        return run

    ctx.term_filter = filtered
    try:
        return nsru_loss(ctx, batch)
    finally:
        ctx.term_filter = inner


def test_the_forget_side_runs_at_moved_weights_and_the_retain_term_at_the_true_ones():
    model, tok, forget, retain = trained_world_model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    _CALLS.clear()
    register_method("sam-probe", project=True, needs_safe=True, needs_reference=True, defaults=NSRU_WEIGHTS)(_probe)
    try:
        result = nsru.unlearn(model, tok, forget=forget, retain=retain, method="sam-probe", steps=2, batch_size=4,
                              progress=False, seed=0, sam_rho=0.5)
    finally:
        METHODS.pop("sam-probe", None)
    first = next(iter(nsru.nsru_modules(result.model)))
    w = weights[first]
    # Each step: the suppression at W (gathering), again at W + δ, then the other terms at W.
    assert [name for name, _ in _CALLS] == ["suppress", "suppress", "safe", "retain"] * 2
    for i, (name, seen) in enumerate(_CALLS):
        assert torch.equal(seen, w) == (i % 4 != 1), (i, name)
    step = (_CALLS[1][1] - w).abs()  # every weight moved by sam_rho, or not at all where its gradient is 0
    assert bool(((step == 0) | ((step - 0.5).abs() < 1e-6)).all()) and float(step.max()) == pytest.approx(0.5)
    assert all(h["sam_grad_norm"] > 0 for h in result.history)
    assert result.history[0]["loss"] == pytest.approx(
        result.history[0]["safe"] + 0.3 * result.history[0]["suppress"] + 3.0 * result.history[0]["retain"], rel=1e-5)
    after = {n: m.base_layer.weight for n, m in nsru.nsru_modules(result.model).items()}
    assert after and all(torch.equal(v, weights[n]) for n, v in after.items())  # every W put back exactly


def test_sam_rho_is_checked():
    with pytest.raises(ConfigError, match="sam_rho must be >= 0"):
        nsru.UnlearnConfig(sam_rho=-1.0)
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(ValueError, match="sam_rho=0.1 moves the base weights of trained adapters"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, method="graddiff", finetune="full", steps=1,
                     batch_size=4, progress=False, sam_rho=0.1)
