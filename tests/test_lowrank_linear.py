"""``nsru.ops.lowrank_linear`` and ``project_rows_`` on the torch reference path: the math itself.

(The Triton kernels are compared with these references in ``test_kernels.py``.)
"""

from __future__ import annotations

import pytest
import torch

from nsru.ops import lowrank_linear, null_space_factor, project_rows_


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("NSRU_BACKEND", "reference")


def _problem(dtype=torch.float64, k=12, n=10, r=4, basis=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    a = torch.randn(r, k, generator=g, dtype=dtype)
    bb = torch.randn(n, r, generator=g, dtype=dtype)
    u = torch.linalg.qr(torch.randn(k, basis, generator=g, dtype=dtype))[0] if basis else torch.zeros(k, 0, dtype=dtype)
    return w, b, a, bb, u


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_formula_for_3d_input(bias):
    w, b, a, bb, u = _problem()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    b = b if bias else None
    y = lowrank_linear(x, w, b, a, bb, u, 0.5)
    a_tilde = a - a @ u @ u.T
    expected = x @ w.T + 0.5 * x @ a_tilde.T @ bb.T + (b if bias else 0)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, expected)


def test_gradients_match_autograd_of_the_formula():
    w, b, a0, bb0, u = _problem()
    x0 = torch.randn(7, 12, dtype=torch.float64)

    def run(fn):
        x, a, bb = (t.clone().requires_grad_() for t in (x0, a0, bb0))
        fn(x, a, bb).pow(2).sum().backward()
        return x.grad, a.grad, bb.grad

    got = run(lambda x, a, bb: lowrank_linear(x, w, b, a, bb, u, 0.5))
    # plain autograd through Ã = A − (A U) Uᵀ gives ∂L/∂A = (∂L/∂Ã) P⊥: the projected gradient
    want = run(lambda x, a, bb: x @ w.T + b + 0.5 * x @ null_space_factor(a, u).T @ bb.T)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    assert (got[1] @ u).abs().max() < 1e-12


def test_gradcheck():
    w, b, a, bb, u = _problem(k=6, n=5, r=2, basis=2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    a.requires_grad_()
    bb.requires_grad_()
    w.requires_grad_()  # a frozen weight is the common case, but the op also differentiates W
    assert torch.autograd.gradcheck(lambda x, w, a, bb: lowrank_linear(x, w, b, a, bb, u, 1.5), (x, w, a, bb))


@pytest.mark.parametrize("full_basis", [False, True])
def test_retain_inputs_see_the_base_layer(full_basis):
    w, b, a, bb, _ = _problem(basis=0)
    u = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))[0]
    x = torch.randn(4, 5, dtype=torch.float64) @ u.T  # inputs inside span(U)
    y = lowrank_linear(x, w, b, a, bb, u, 2.0)
    torch.testing.assert_close(y, x @ w.T + b)
    if full_basis:  # the whole space retained: the adapter does nothing anywhere
        full = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
        x = torch.randn(4, 12, dtype=torch.float64)
        torch.testing.assert_close(lowrank_linear(x, w, b, a, bb, full, 2.0), x @ w.T + b)


def test_mixed_precision_keeps_adapters_in_fp32():
    w, b, a, bb, u = _problem(dtype=torch.float32)
    x = torch.randn(5, 12).to(torch.bfloat16).requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    y = lowrank_linear(x, w.bfloat16(), b.bfloat16(), a, bb, u, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == bb.grad.dtype == torch.float32
    expected = x.float() @ w.bfloat16().float().T + b.bfloat16().float() + x.float() @ null_space_factor(a, u).T @ bb.T
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=2e-2)


def test_project_rows_rejects_mismatched_arguments():
    g = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="2 gradients and 1 bases"):
        project_rows_([g, g], [torch.zeros(6, 1)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4, 6\) and bases\[0\] \(5, 1\)"):
        project_rows_([g], [torch.zeros(5, 1)])


def test_autocast_runs_the_gemm_in_the_autocast_dtype():
    w, b, a, bb, u = _problem(dtype=torch.float32)
    x = torch.randn(5, 12, requires_grad=True)
    a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(x, w, b, a, bb, u, 1.0)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    expected = x @ w.T + b + x @ null_space_factor(a, u).T @ bb.T
    torch.testing.assert_close(y.float(), expected, atol=1e-1, rtol=2e-2)
    assert (a.grad @ u).abs().max() < 1e-5
