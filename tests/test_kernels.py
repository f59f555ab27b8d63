"""The Triton kernels against their torch references.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), which is slow: shapes stay small but mostly ragged (M, K, N no multiple of
any block, K over several K-steps), so every masked edge is exercised. On a GPU the same tests run
compiled, bf16 included (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import pytest
import torch

import nsru
from nsru.ops import (
    lowrank_linear,
    lowrank_linear_backward_reference,
    lowrank_linear_forward_reference,
    project_rows_,
    project_rows_reference_,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter computes tl.dot on bf16 operands wrongly (it multiplies their bit patterns)"
    ),
)
DTYPES = [torch.float32, torch.float16, BF16]
# (atol, rtol) of a kernel output against the fp32 reference on the same (rounded) inputs, outputs of order 1
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}

# (M, K, N): ragged, K over several K-steps of the interpreter's 32 (and of a GPU's 64 for the first),
# and one that the interpreter's 16x32x32 tile divides exactly (the unmasked path)
SHAPES = [(37, 150, 53), (5, 64, 19), (70, 33, 48), (48, 64, 96)]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("NSRU_BACKEND", "triton")


def _kernels():
    from nsru.kernels import lowrank_linear as kernels

    return kernels


def _problem(m, k, n, r, dtype, seed=0, basis=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    u = torch.linalg.qr(torch.randn(k, basis, generator=g))[0] if basis else torch.zeros(k, 0)
    to = lambda t, dt=torch.float32: t.to(device=DEVICE, dtype=dt)  # noqa: E731
    return to(x, dtype), to(w, dtype), to(bias, dtype), to(a), to(b), to(u)


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kernel_matches_reference(shape, rank, dtype):
    m, k, n = shape
    x, w, bias, a, b, _ = _problem(m, k, n, rank, dtype, seed=rank)
    has_bias = rank % 2 == 0  # both cases across the ranks, without doubling the grid
    bias = bias if has_bias else None
    y, s = _kernels().lowrank_linear_forward_triton(x, w, bias, a, b, 0.75)
    y_ref, s_ref = lowrank_linear_forward_reference(
        x.float(), w.float(), None if bias is None else bias.float(), a, b, 0.75
    )
    assert y.dtype == dtype and y.shape == (m, n)
    assert s.dtype == torch.float32 and s.shape == (m, rank)
    _close(s, s_ref, torch.float32, "S")
    _close(y, y_ref, dtype, "Y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_kernel_matches_reference(shape, rank, dtype):
    m, k, n = shape
    x, w, _, a, b, _ = _problem(m, k, n, rank, dtype, seed=rank + 1)
    s = x.float() @ a.T
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    needs_dx = rank != 8  # needs_dx=False once
    dx, d_a, d_b = _kernels().lowrank_linear_backward_triton(dy, x, w, a, b, s, 0.75, needs_dx)
    dx_ref, d_a_ref, d_b_ref = lowrank_linear_backward_reference(dy.float(), x.float(), w.float(), a, b, s, 0.75, needs_dx)
    assert d_a.dtype == d_b.dtype == torch.float32
    # dÃ and dB sum over M tokens from inputs rounded to `dtype`, computed in fp32: fp32 tolerance, scaled by √M
    _close(d_a / m**0.5, d_a_ref / m**0.5, torch.float32, "dÃ")
    _close(d_b / m**0.5, d_b_ref / m**0.5, torch.float32, "dB")
    if needs_dx:
        assert dx.dtype == dtype
        _close(dx / n**0.5, dx_ref / n**0.5, dtype, "dX")
    else:
        assert dx is None


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("the pointer kernel ran where the TMA kernel should have")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 48, 56), (48, 64, 96)])  # rows 16-byte aligned, as TMA needs
def test_tma_kernel_matches_reference(shape, dtype, monkeypatch):
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    kern = _kernels()
    monkeypatch.setattr(kern, "TMA", True)
    monkeypatch.setattr(kern, "_fused_lowrank_gemm_kernel", _NotLaunched())
    m, k, n = shape
    x, w, bias, a, b, _ = _problem(m, k, n, 8, dtype, seed=5)
    y, s = kern.lowrank_linear_forward_triton(x, w, bias, a, b, 0.75)
    y_ref, s_ref = lowrank_linear_forward_reference(x.float(), w.float(), bias.float(), a, b, 0.75)
    _close(y, y_ref, dtype, "Y")
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(8)).to(device=DEVICE, dtype=dtype)
    dx, _, _ = kern.lowrank_linear_backward_triton(dy, x, w, a, b, s, 0.75, True)
    dx_ref, _, _ = lowrank_linear_backward_reference(dy.float(), x.float(), w.float(), a, b, s_ref, 0.75, True)
    _close(dx / n**0.5, dx_ref / n**0.5, dtype, "dX")


def test_kernels_accept_non_contiguous_inputs():
    m, k, n, r = 21, 40, 35, 8
    x, w, bias, a, b, _ = _problem(m, k, n, r, torch.float32, seed=3)
    # the same values through strided views: X transposed, W and Ã column slices, B transposed
    x_nc = x.T.contiguous().T
    w_nc = torch.zeros(n, 2 * k, device=DEVICE)[:, ::2]
    w_nc.copy_(w)
    a_nc = torch.zeros(r, 3 * k, device=DEVICE)[:, 1::3]
    a_nc.copy_(a)
    b_nc = b.T.contiguous().T
    bias_nc = torch.zeros(2 * n, device=DEVICE)[::2]
    bias_nc.copy_(bias)
    assert not (x_nc.is_contiguous() or w_nc.is_contiguous() or a_nc.is_contiguous() or b_nc.is_contiguous())
    kern = _kernels()
    y, s = kern.lowrank_linear_forward_triton(x_nc, w_nc, bias_nc, a_nc, b_nc, 2.0)
    y_ref, s_ref = lowrank_linear_forward_reference(x, w, bias, a, b, 2.0)
    _close(y, y_ref, torch.float32, "Y")
    dy = torch.randn(n, m, device=DEVICE).T  # non-contiguous gradient, as autograd may hand over
    grads = kern.lowrank_linear_backward_triton(dy, x_nc, w_nc, a_nc, b_nc, s.T.contiguous().T, 2.0, True)
    refs = lowrank_linear_backward_reference(dy.contiguous(), x, w, a, b, s_ref, 2.0, True)
    for got, want, what in zip(grads, refs, ("dX", "dÃ", "dB")):
        _close(got, want, torch.float32, what)


def test_kernels_handle_empty_batch():
    x, w, bias, a, b, _ = _problem(4, 24, 20, 8, torch.float32)
    kern = _kernels()
    y, s = kern.lowrank_linear_forward_triton(x[:0], w, bias, a, b, 1.0)
    assert y.shape == (0, 20) and s.shape == (0, 8)
    dx, d_a, d_b = kern.lowrank_linear_backward_triton(y, x[:0], w, a, b, s, 1.0, True)
    assert dx.shape == (0, 24)
    assert torch.count_nonzero(d_a) == 0 and torch.count_nonzero(d_b) == 0


def test_rank_above_128_is_refused():
    x, w, bias, a, b, _ = _problem(4, 140, 150, 129, torch.float32)
    with pytest.raises(ValueError, match="rank 129"):
        _kernels().lowrank_linear_forward_triton(x, w, bias, a, b, 1.0)


def test_autotuning_configs_fit_hopper_and_follow_the_dtype():
    kern = _kernels()
    for configs, element_bytes in ((kern._GEMM_16BIT, 2), (kern._GEMM_TF32, 4), (kern._GEMM_F32_IEEE, 4)):
        for c in configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            assert min(bm, bn, bk) >= 16
            assert (bm * bk + bk * bn) * element_bytes * c.num_stages <= 227 * 1024, c  # sm_90 shared memory
    prune = kern._prune_gemm_configs
    take = slice(None) if kern._AUTOTUNE else slice(1)
    x16, x32 = torch.empty(1, dtype=torch.float16), torch.empty(1)
    assert prune(None, {"x_ptr": x16}, MAIN_PRECISION="tf32") == kern._GEMM_16BIT[take]
    assert prune(None, {"x_ptr": x32}, MAIN_PRECISION="tf32") == kern._GEMM_TF32[take]
    assert prune(None, {"x_ptr": x32}, MAIN_PRECISION="ieee") == kern._GEMM_F32_IEEE[take]


# ---------------------------------------------------------------- project_rows_


def _orthonormal(width, k, seed):
    if k == 0:
        return torch.zeros(width, 0, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(width, k, generator=g, dtype=torch.float64))[0].float().to(DEVICE)


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
def test_project_rows_grouped_matches_reference(rank):
    # several modules of different widths in one launch: empty, partial and full bases, and a
    # basis wider than one column block; one gradient non-contiguous
    widths_and_k = [(50, 0), (70, 13), (33, 33), (130, 100), (19, 5)]
    grads, bases = [], []
    for i, (width, k) in enumerate(widths_and_k):
        g = torch.randn(rank, width, generator=torch.Generator().manual_seed(i)).to(DEVICE)
        if i == 1:
            g = g.T.contiguous().T
        grads.append(g)
        bases.append(_orthonormal(width, k, seed=10 + i))
    expected = [g.clone() for g in grads]
    project_rows_reference_(expected, bases)
    ptrs = [g.data_ptr() for g in grads]
    project_rows_(grads, bases)
    assert [g.data_ptr() for g in grads] == ptrs
    for i, (got, want, u) in enumerate(zip(grads, expected, bases)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"module {i}: {m}")
        if u.shape[1]:
            assert (got @ u).abs().max() < 1e-5  # nothing left in the retain subspace
    assert grads[2].abs().max() < 1e-5  # a full basis removes everything


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_project_rows_low_precision_gradients(dtype):
    g = torch.randn(8, 45, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=dtype)
    u = _orthonormal(45, 20, seed=1)
    expected = g.clone()
    project_rows_reference_([expected], [u])
    project_rows_([g], [u])
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_project_rows_nothing_to_do():
    g = torch.randn(4, 10, device=DEVICE)
    before = g.clone()
    project_rows_([g], [torch.zeros(10, 0, device=DEVICE)])
    project_rows_([], [])
    assert torch.equal(g, before)


# ---------------------------------------------------------------- whole op and layer, Triton vs reference


def _run(backend, monkeypatch, fn):
    monkeypatch.setenv("NSRU_BACKEND", backend)
    return fn()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("basis", [0, 9, 40])  # none, some, all of the width
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_triton_matches_reference_with_gradients(dtype, basis, bias, monkeypatch):
    k, n, r = 40, 29, 8
    x0, w, b0, a0, bb0, u = _problem(2 * 11, k, n, r, dtype, seed=basis, basis=basis)
    x0 = x0.reshape(2, 11, k)  # 3-D input

    def step():
        x = x0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        b = bb0.clone().requires_grad_()
        y = lowrank_linear(x, w, b0 if bias else None, a, b, u, 0.5)
        (y.float() * torch.linspace(-1, 1, n, device=DEVICE)).sum().backward()
        return y, x.grad, a.grad, b.grad

    got = _run("triton", monkeypatch, step)
    want = _run("reference", monkeypatch, step)
    assert got[0].shape == (2, 11, n) and got[1].shape == x0.shape
    for g, e, what in zip(got, want, ("Y", "dX", "dA", "dB")):
        scale = 1.0 if what == "Y" else 22**0.5  # gradients sum over 22 tokens or 29 outputs
        _close(g / scale, e / scale, dtype if what in ("Y", "dX") else torch.float32, what)
    if basis:
        assert (got[2] @ u).abs().max() < 1e-4  # lora_A's gradient lies in the null space


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("basis", [0, 9, 40])  # none, some, all of the width
@pytest.mark.parametrize("rank", [1, 8])
def test_opcheck_on_the_triton_path(dtype, basis, rank):
    # the ops' contracts (schema, fake, autograd, AOTAutograd) hold with the Triton kernels inside
    x, w, bias, a, b, u = _problem(2 * 11, 40, 29, rank, dtype, seed=rank, basis=basis)
    x = x.reshape(2, 11, 40)
    for t in (x, a, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.nsru.lowrank_linear.default, (x, w, bias if rank > 1 else None, a, b, u, 0.5))
    grads = [torch.randn(rank, 40, device=DEVICE, dtype=dtype), torch.randn(3, 19, device=DEVICE, dtype=dtype)]
    torch.library.opcheck(torch.ops.nsru.project_rows_.default, (grads, [u, _orthonormal(19, 5, seed=2)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nsru_linear_triton_matches_reference(dtype, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 36).to(device=DEVICE, dtype=dtype)
    layer = nsru.NSRULinear.from_linear(linear, r=16, alpha=32)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    layer.set_retain_basis(_orthonormal(48, 12, seed=4))
    x0 = torch.randn(3, 7, 48, device=DEVICE, dtype=dtype)

    def step():
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.float().square().mean().backward()
        return y, x.grad, layer.lora_A.grad, layer.lora_B.grad

    got = _run("triton", monkeypatch, step)
    want = _run("reference", monkeypatch, step)
    for g, e, what in zip(got, want, ("Y", "dX", "dA", "dB")):
        _close(g, e, dtype if what in ("Y", "dX") else torch.float32, what)
