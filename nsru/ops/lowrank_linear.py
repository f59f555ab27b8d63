"""``lowrank_linear``: a frozen linear layer plus a low-rank update confined to a null space.

    Y  = X Wᵀ + b + s · (X Ãᵀ) Bᵀ,        Ã = A − (A U) Uᵀ,   S = X Ãᵀ saved for the backward
    dX = dY W + s · (dY B) Ã
    dB = s · dYᵀ S
    dÃ = s · (dY B)ᵀ X,                     dA = dÃ − (dÃ U) Uᵀ   (``project_rows_``)

W is ``(out, in)`` in the compute dtype of X (fp32, bf16 or fp16); A ``(r, in)``, B ``(out, r)`` and
U ``(in, k)`` are fp32. The forward/backward pairs below are the torch reference; the Triton
kernels in ``nsru.kernels.lowrank_linear`` have the same signatures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsru.ops.backend import use_triton
from nsru.ops.project_rows import project_rows_


def null_space_factor(lora_A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``Ã = A − (A U) Uᵀ``: the rows of A with their retain-subspace component removed."""
    if basis.shape[1] == 0:
        return lora_A
    return lora_A - (lora_A @ basis) @ basis.T


def _same_dtype(*tensors: torch.Tensor | None) -> bool:
    return len({t.dtype for t in tensors if t is not None}) == 1


def lowrank_linear_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_tilde: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the forward on 2-D ``x``; returns ``(Y, S)``."""
    if not _same_dtype(x, weight, bias, a_tilde, lora_B):
        # mixed precision: the base GEMM in X's dtype, the adapter product in the adapters' (fp32)
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        s = x.to(a_tilde.dtype) @ a_tilde.T
        return y.add_((scaling * (s @ lora_B.T)).to(y.dtype)), s
    # One dtype: write the low-rank term first, then let the base GEMM accumulate onto it (beta = 1).
    # That costs the GEMM nothing: nn.Linear itself writes the broadcast bias into Y before its
    # GEMM, and here the bias rides along as one more rank column ([S, 1] [sB, b]ᵀ), so the
    # adapter adds only the two skinny products. Interleaved at M=2048, K=1024, N=2816, r=16, fp32,
    # one thread: 0.98-1.02x nn.Linear, against 1.09-1.15x for F.linear then y.addmm_(S, Bᵀ).
    m, rank = x.shape[0], a_tilde.shape[0]
    factor = scaling * lora_B
    if bias is None:
        s = x @ a_tilde.T
        y = s @ factor.T
    else:
        s_one = x.new_empty((m, rank + 1))
        s_one[:, rank] = 1.0
        s = torch.mm(x, a_tilde.T, out=s_one[:, :rank])
        y = s_one @ torch.cat([factor, bias[:, None]], dim=1).T
    y.addmm_(x, weight.T)
    return y, s


def lowrank_linear_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    a_tilde: torch.Tensor,
    lora_B: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    needs_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Torch reference of the backward on 2-D ``dy``/``x``; returns ``(dX, dÃ, dB)``."""
    dy_f = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
    x_f = x if x.dtype == a_tilde.dtype else x.to(a_tilde.dtype)
    t = dy_f @ lora_B  # (M, r)
    # (Sᵀ dY)ᵀ rather than dYᵀ S: MKL ran the former 3x faster at the benchmark shape (CPU, one thread)
    d_b = (s.T @ dy_f).mul_(scaling).T.contiguous()
    d_a = (t.T @ x_f).mul_(scaling)
    dx = None
    if needs_dx:
        if _same_dtype(dy, weight, t, a_tilde):
            # as in the forward: the low-rank term first, the base GEMM accumulates onto it for free
            dx = t @ (scaling * a_tilde)
            dx.addmm_(dy, weight)
        else:
            dx = dy @ weight.to(dy.dtype)
            dx.add_((scaling * (t @ a_tilde)).to(dx.dtype))
    return dx, d_a, d_b


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, basis, scaling):
        in_features = x.shape[-1]
        x2d = x.reshape(-1, in_features)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast picks the GEMM dtype (as for nn.Linear); the adapters stay in their own dtype.
            dtype = torch.get_autocast_dtype(device_type)
            x2d, weight = x2d.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.device_type = device_type
        with torch.autocast(device_type, enabled=False):
            a_tilde = null_space_factor(lora_A, basis)
            if use_triton(x2d, weight):
                from nsru.kernels.lowrank_linear import lowrank_linear_forward_triton as forward
            else:
                forward = lowrank_linear_forward_reference
            y, s = forward(x2d, weight, bias, a_tilde, lora_B, scaling)
        ctx.save_for_backward(x2d, weight, a_tilde, lora_B, s, basis)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, a_tilde, lora_B, s, basis = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        if dy2d.dtype != x2d.dtype:
            dy2d = dy2d.to(x2d.dtype)
        needs_dx = ctx.needs_input_grad[0]
        with torch.autocast(ctx.device_type, enabled=False):
            if use_triton(dy2d, weight):
                from nsru.kernels.lowrank_linear import lowrank_linear_backward_triton as backward
            else:
                backward = lowrank_linear_backward_reference
            dx, d_a, d_b = backward(dy2d, x2d, weight, a_tilde, lora_B, s, ctx.scaling, needs_dx)
            project_rows_([d_a], [basis])
            d_weight = dy2d.T @ x2d if ctx.needs_input_grad[1] else None
            d_bias = dy2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, d_weight, d_bias, d_a, d_b, None, None


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    basis: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``X Wᵀ + b + s·(X Ãᵀ) Bᵀ`` for ``x`` of any leading shape, differentiable in x, A and B.

    The gradient reaching ``lora_A`` is already projected onto the null space of ``basis``.
    """
    return _LowRankLinear.apply(x, weight, bias, lora_A, lora_B, basis, scaling)
