"""NSRULinear on its own: init, null-space guarantee, gradients, merge, dtypes, errors."""

import copy

import pytest
import torch
from torch import nn

from nsru.layer import NSRULinear
from nsru.ops.lowrank_linear import fixed_null_space_factor


def _basis(width: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(width, max(k, 1), generator=g, dtype=torch.float64))[0][:, :k].float()


def _randomise(layer: NSRULinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def test_starts_equal_to_base():
    linear = nn.Linear(24, 40)
    layer = NSRULinear.from_linear(copy.deepcopy(linear), r=4, alpha=8)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert not layer.base_layer.weight.requires_grad and layer.lora_A.requires_grad


@pytest.mark.parametrize("k", [0, 1, 10, 24])
def test_inputs_in_retain_span_are_untouched(k):
    linear = nn.Linear(24, 40)
    layer = NSRULinear.from_linear(copy.deepcopy(linear), r=8, alpha=16)
    u = _basis(24, k)
    layer.set_retain_basis(u)
    _randomise(layer)
    inside = torch.randn(50, max(k, 1))[:, :k] @ u.T if k else torch.zeros(50, 24)
    base = linear(inside)
    assert (layer(inside) - base).norm() <= 1e-5 * base.norm()
    if k < 24:
        outside = torch.randn(50, 24)
        assert (layer(outside) - linear(outside)).abs().max() > 1e-2


def test_lora_A_gradient_has_no_component_in_span():
    layer = NSRULinear.from_linear(nn.Linear(16, 12), r=3, alpha=3)
    u = _basis(16, 6)
    layer.set_retain_basis(u)
    _randomise(layer)
    layer(torch.randn(7, 16)).pow(2).sum().backward()
    assert layer.lora_A.grad.norm() > 1e-3
    assert (layer.lora_A.grad @ u).norm() <= 1e-6 * layer.lora_A.grad.norm()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.norm() > 0


def test_matches_explicit_formula_and_autograd():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    layer = NSRULinear.from_linear(copy.deepcopy(linear), r=4, alpha=6)
    u = _basis(16, 5)
    layer.set_retain_basis(u)
    _randomise(layer)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = layer(x)
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    a_tilde = a - (a @ u) @ u.T
    y2 = linear(x2) + 1.5 * (x2 @ a_tilde.T) @ b.T
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_round_trip(dtype):
    linear = nn.Linear(32, 20).to(dtype)
    original = linear.weight.detach().clone()
    layer = NSRULinear.from_linear(linear, r=4, alpha=8)
    layer.set_retain_basis(_basis(32, 8))
    _randomise(layer)
    x = torch.randn(6, 32).to(dtype)
    before = layer(x)
    layer.merge()
    layer.merge()  # a second merge is a no-op
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol * 10)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x), before, rtol=tol, atol=tol * 10)


def test_disabled_while_merged_gives_base_output():
    linear = nn.Linear(16, 8)
    reference = copy.deepcopy(linear)
    layer = NSRULinear.from_linear(linear, r=2, alpha=2)
    _randomise(layer)
    x = torch.randn(4, 16)
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_adapter(dtype):
    linear = nn.Linear(32, 24).to(dtype)
    layer = NSRULinear.from_linear(linear, r=4, alpha=8)
    _randomise(layer)
    x = torch.randn(3, 32, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    assert layer.lora_A.grad.dtype == torch.float32
    reference = linear(x.detach()).float() + layer.delta_weight().detach().matmul(x.detach().float().T).T
    torch.testing.assert_close(y.detach().float(), reference, rtol=2e-2, atol=5e-2)


def test_conv1d_is_wrapped_with_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=12, nx=20)
    nn.init.normal_(conv.weight)
    layer = NSRULinear.from_linear(copy.deepcopy(conv), r=3, alpha=3)
    assert (layer.in_features, layer.out_features) == (20, 12)
    x = torch.randn(2, 5, 20)
    torch.testing.assert_close(layer(x), conv(x))
    _randomise(layer)
    expected = conv(x) + x @ layer.delta_weight().detach().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_with_other_basis_rank():
    src = NSRULinear.from_linear(nn.Linear(16, 8), r=2, alpha=4)
    src.set_retain_basis(_basis(16, 5))
    _randomise(src)
    dst = NSRULinear.from_linear(copy.deepcopy(src.base_layer), r=2, alpha=4)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(dst(x), src(x))
    assert dst.k == 5


def test_to_moves_adapter_and_basis():
    layer = NSRULinear.from_linear(nn.Linear(8, 8), r=2)
    layer.set_retain_basis(_basis(8, 3))
    layer = layer.to(torch.float64)
    assert layer.retain_basis.dtype == torch.float64  # buffers follow .to like any module's


def test_rank_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match=r"r=9 is larger.*8 -> 20.*at most 8"):
        NSRULinear.from_linear(nn.Linear(8, 20), r=9)


def test_bad_bases_are_clear_errors():
    layer = NSRULinear.from_linear(nn.Linear(8, 4), r=2, name="mlp.up")
    with pytest.raises(ValueError, match=r"'mlp.up'.*shape \(7, 2\).*expected \(8, k\)"):
        layer.set_retain_basis(torch.zeros(7, 2))
    with pytest.raises(ValueError, match="not orthonormal"):
        layer.set_retain_basis(torch.ones(8, 2))


def test_wrapping_something_else_fails():
    with pytest.raises(TypeError, match="Conv1D"):
        NSRULinear(nn.Conv2d(3, 3, 1), r=1)



# ---------------------------------------------------------------- one optimizer step: Ã formed once


def _stepped_layer(k: int = 6, seed: int = 0) -> NSRULinear:
    torch.manual_seed(seed)
    layer = NSRULinear.from_linear(nn.Linear(16, 12), r=3, alpha=6)
    layer.set_retain_basis(_basis(16, k))
    _randomise(layer)
    return layer


def _three_forwards(layer: NSRULinear, xs) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """What a trainer step does: several forwards of one layer, then one backward of their sum."""
    layer.zero_grad(set_to_none=True)
    ys = [layer(x) for x in xs]
    sum((y * torch.linspace(-1, 1, y.shape[-1])).square().sum() for y in ys).backward()
    return [y.detach() for y in ys], layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("k", [0, 6, 16])
@pytest.mark.parametrize("project_grads", [True, False])
def test_null_space_step_forms_a_tilde_once_and_changes_nothing_else(k, project_grads, monkeypatch):
    import nsru.layer as L

    layer = _stepped_layer(k)
    xs = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    want = _three_forwards(layer, xs)
    formed = []
    monkeypatch.setattr(L, "fixed_null_space_factor", lambda a, u: formed.append(1) or fixed_null_space_factor(a, u))
    with L.null_space_step([layer], project_grads=project_grads):
        got = _three_forwards(layer, xs)
        if not project_grads:  # the caller's part: one projection for the step
            L.project_gradients_([layer])
            got = (got[0], layer.lora_A.grad, got[2])
    assert len(formed) == 1 and layer._step is None  # one Ã for the three forwards, dropped on leaving
    for g, w in zip(got[0] + list(got[1:]), want[0] + list(want[1:])):
        # (the gradients are O(10-1000); with a full basis A's is rounding noise of that size)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=5e-5)
    if 0 < k < 16:  # (a full basis leaves A no gradient but rounding)
        assert (got[1] @ layer.retain_basis).abs().max() <= 1e-6 * got[1].abs().max()


def test_null_space_step_follows_changes_of_a_and_of_the_basis():
    import nsru.layer as L

    layer = _stepped_layer()
    x = torch.randn(4, 16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with L.null_space_step([layer]):
        layer(x).square().sum().backward()
        opt.step()  # A changes in place: the next forward forms Ã again
        after_step = layer(x)
        with torch.no_grad():
            reference = layer.base_layer(x) + x @ layer.delta_weight().T  # delta_weight forms Ã anew
        layer.set_retain_basis(_basis(16, 9, seed=3))  # so does a new basis
        after_basis = layer(x)
    torch.testing.assert_close(after_step.detach(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
    torch.testing.assert_close(after_basis, layer(x), rtol=0, atol=0)  # the same as outside the block


def test_a_tilde_formed_without_grad_or_autocast_is_usable_for_training():
    import nsru.layer as L

    layer = _stepped_layer()
    a_tilde = fixed_null_space_factor(layer.lora_A, layer.retain_basis)
    assert not a_tilde.requires_grad and a_tilde.dtype == torch.float32
    assert fixed_null_space_factor(layer.lora_A, layer.retain_basis[:, :0]).data_ptr() != layer.lora_A.data_ptr()
    with L.null_space_step([layer]):
        with torch.inference_mode():  # an evaluation first: Ã must still be a normal tensor
            layer(torch.randn(2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(2, 16)).float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
