"""``nsru.ops.lowrank_linear`` and ``project_rows_`` on the torch reference path: the math itself,
and the contracts of their ``torch.library`` operators (``opcheck``).

(The Triton kernels are compared with these references in ``test_kernels.py``; a whole model through
the operators under ``torch.compile`` is in ``test_compile.py``.)
"""

from __future__ import annotations

import pytest
import torch

from nsru.ops import lowrank_linear, null_space_factor, project_rows_
from nsru.ops.lowrank_linear import fixed_null_space_factor


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


# ---------------------------------------------------------------- the operators' contracts (opcheck)
#
# torch.library.opcheck runs each op against its schema, its fake (shape function), its autograd
# registration and AOTAutograd with dynamic shapes. Adapters are fp32 as in NSRULinear; X and W in
# each dtype the CPU path takes.

OP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _op_problem(dtype, r, k, lead=(2, 5), width=13, out=7, bias=True, seed=0):
    """Ragged sizes (no power of two), a 3-D input and a basis of ``k`` columns (0 ≤ k ≤ width)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, width, generator=g).to(dtype)
    w = (torch.randn(out, width, generator=g) / width**0.5).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    a = torch.randn(r, width, generator=g) / width**0.5
    bb = torch.randn(out, r, generator=g)
    u = torch.zeros(width, 0)
    if k:
        u = torch.linalg.qr(torch.randn(width, k, generator=g, dtype=torch.float64))[0].float()
    return x, w, b, a, bb, u


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("k", [0, 5, 13])  # empty, partial and full basis
@pytest.mark.parametrize("r", [1, 3])
def test_opcheck_lowrank_linear(dtype, k, r):
    x, w, b, a, bb, u = _op_problem(dtype, r, k, bias=r > 1)
    for t in (x, a, bb):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.nsru.lowrank_linear.default, (x, w, b, a, bb, u, 0.5))


def test_opcheck_lowrank_linear_frozen_input_trainable_base():
    # no gradient for X (the first layer's inputs come from frozen embeddings), one for W and b
    x, w, b, a, bb, u = _op_problem(torch.float32, 4, 6, lead=(9,))
    for t in (w, b, a, bb):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.nsru.lowrank_linear.default, (x, w, b, a, bb, u, -1.5))


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("k", [0, 5, 13])
@pytest.mark.parametrize("project", [True, False])
def test_opcheck_lowrank_linear_with_a_tilde_formed_beforehand(dtype, k, project):
    # as NSRULinear calls it within null_space_step: Ã given, and without its basis when the
    # caller projects the gradients of A itself
    x, w, b, a, bb, u = _op_problem(dtype, 3, k)
    a_tilde = fixed_null_space_factor(a, u)
    for t in (x, a, bb):
        t.requires_grad_()
    basis = u if project else u[:, :0]
    torch.library.opcheck(torch.ops.nsru.lowrank_linear.default, (x, w, b, a, bb, basis, 0.5, a_tilde))
    y, s, formed = torch.ops.nsru.lowrank_linear(x, w, b, a, bb, basis, 0.5, a_tilde)
    assert formed.numel() == 0  # the op keeps the given Ã, it makes no copy


def test_a_tilde_formed_beforehand_gives_the_same_outputs_and_gradients():
    w, b, a0, bb0, u = _problem(dtype=torch.float32)
    x0 = torch.randn(7, 12)

    def run(**kw):
        x, a, bb = (t.clone().requires_grad_() for t in (x0, a0, bb0))
        y = lowrank_linear(x, w, b, a, bb, kw.pop("basis", u), 0.5, **kw)
        (y * torch.linspace(-1, 1, 10)).square().sum().backward()
        return y.detach(), x.grad, a.grad, bb.grad

    want = run()
    a_tilde = fixed_null_space_factor(a0, u)
    for g, e in zip(run(a_tilde=a_tilde), want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    y, dx, unprojected, d_b = run(a_tilde=a_tilde, basis=u[:, :0])  # the caller projects dA
    for g, e in zip((y, dx, d_b), (want[0], want[1], want[3])):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    projected = unprojected.clone()
    project_rows_([projected], [u])  # what the trainer does once for the step
    torch.testing.assert_close(projected, want[2], rtol=1e-5, atol=1e-5)
    assert (unprojected @ u).abs().max() > 1e-3  # left unprojected until then


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("needs_dx", [True, False])
def test_opcheck_lowrank_linear_backward(dtype, needs_dx):
    x, w, b, a, bb, u = _op_problem(dtype, 3, 5)
    _, s, a_tilde = torch.ops.nsru.lowrank_linear(x, w, b, a, bb, u, 0.5)
    dy = torch.randn(*x.shape[:-1], w.shape[0]).to(dtype)
    torch.library.opcheck(torch.ops.nsru.lowrank_linear_backward.default, (dy, x, w, a_tilde, bb, s, 0.5, needs_dx))
    dx, d_a, d_b = torch.ops.nsru.lowrank_linear_backward(dy, x, w, a_tilde, bb, s, 0.5, needs_dx)
    assert dx.shape == (x.shape if needs_dx else (0,)) and dx.dtype == dtype
    assert d_a.shape == a.shape and d_b.shape == bb.shape and d_a.dtype == d_b.dtype == torch.float32


@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_opcheck_project_rows(dtype):
    # one call over modules of ranks 1-3 and widths 13/7/20 with an empty, a full and a partial basis
    g = torch.Generator().manual_seed(1)
    sizes = [(1, 13, 0), (3, 7, 7), (2, 20, 9)]
    grads = [torch.randn(r, width, generator=g).to(dtype) for r, width, _ in sizes]
    bases = [_op_problem(torch.float32, 1, k, width=width)[5] for _, width, k in sizes]
    torch.library.opcheck(torch.ops.nsru.project_rows_.default, (grads, bases))
    before = [grad.clone() for grad in grads]
    project_rows_(grads, bases)
    torch.testing.assert_close(grads[0], before[0], atol=0, rtol=0)  # k = 0: untouched
    assert grads[1].float().abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)  # full basis: nothing left
    assert (grads[2].float() @ bases[2]).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


BAD_OP_ARGS = [
    ("width", lambda x, w, b, a, bb, u: (x[..., :-1], w, b, a, bb, u), ValueError, r"x has shape \(2, 5, 12\)"),
    ("bias", lambda x, w, b, a, bb, u: (x, w, b[:-1], a, bb, u), ValueError, r"bias has shape \(6,\)"),
    ("lora_A", lambda x, w, b, a, bb, u: (x, w, b, a[:, :-1], bb, u), ValueError, r"lora_A has shape \(3, 12\)"),
    ("lora_B", lambda x, w, b, a, bb, u: (x, w, b, a, bb.T, u), ValueError, r"lora_B has shape \(3, 7\)"),
    ("basis", lambda x, w, b, a, bb, u: (x, w, b, a, bb, u[:-1]), ValueError, r"basis has shape \(12, 5\)"),
    ("dtype", lambda x, w, b, a, bb, u: (x, w, b, a, bb, u.double()), TypeError, "share one floating dtype"),
    ("a_tilde", lambda x, w, b, a, bb, u: (x, w, b, a, bb, u, a[:, :-1]), ValueError, r"a_tilde is \(3, 12\)"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_OP_ARGS, ids=[case[0] for case in BAD_OP_ARGS])
def test_lowrank_linear_op_refuses_bad_arguments(name, make, error, match):
    args = make(*_op_problem(torch.float32, 3, 5))
    args, a_tilde = args[:6], args[6:]
    with pytest.raises(error, match=match):
        torch.ops.nsru.lowrank_linear(*args, 1.0, *a_tilde)
    with pytest.raises(error, match=match), torch._subclasses.FakeTensorMode() as fake:  # the shape function too
        fakes = [fake.from_tensor(t) if t is not None else None for t in args + a_tilde]
        torch.ops.nsru.lowrank_linear(*fakes[:6], 1.0, *fakes[6:])
