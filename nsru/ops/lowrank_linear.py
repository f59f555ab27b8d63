"""``lowrank_linear``: a frozen linear layer plus a low-rank update confined to a null space.

    Y  = X Wᵀ + b + s · (X Ãᵀ) Bᵀ,        Ã = A − (A U) Uᵀ,   S = X Ãᵀ saved for the backward
    dX = dY W + s · (dY B) Ã
    dB = s · dYᵀ S
    dÃ = s · (dY B)ᵀ X,                     dA = dÃ − (dÃ U) Uᵀ   (``project_rows_``)

W is ``(out, in)`` in the compute dtype of X (fp32, bf16 or fp16); A ``(r, in)``, B ``(out, r)`` and
U ``(in, k)`` are fp32. ``Ã`` is formed inside the operator, or passed in by a caller that keeps it
while A and U do not change (``NSRULinear`` forms it once per optimizer step, where the trainer's
several forwards of a step would each form it again); either way the gradient lands on A.
The forward/backward pairs below are the torch reference; the Triton
kernels in ``nsru.kernels.lowrank_linear`` have the same signatures. Both are served by the
``torch.library`` operators ``torch.ops.nsru.lowrank_linear`` (forward, with its autograd formula)
and ``torch.ops.nsru.lowrank_linear_backward``; :func:`lowrank_linear` is their Python face.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nsru.ops.backend import use_triton
from nsru.ops.project_rows import project_rows_  # noqa: F401  (registers nsru::project_rows_, used in the backward)


def null_space_factor(lora_A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``Ã = A − (A U) Uᵀ``: the rows of A with their retain-subspace component removed."""
    if basis.shape[1] == 0:
        return lora_A
    return lora_A - (lora_A @ basis) @ basis.T


def fixed_null_space_factor(lora_A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``Ã`` as the operator's ``a_tilde`` input: a new contiguous tensor (never ``lora_A`` itself,
    so that a later in-place update of A cannot change it), formed outside autograd and autocast in
    the adapters' dtype, and a normal tensor even under ``torch.inference_mode``."""
    # inference_mode(False) turns grad mode on again: no_grad comes after it
    with torch.inference_mode(False), torch.no_grad(), _no_autocast(lora_A.device.type):
        a_tilde = null_space_factor(lora_A, basis)
        if a_tilde is lora_A:
            return a_tilde.clone(memory_format=torch.contiguous_format)
        return a_tilde.contiguous()


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
    # GEMM, and here the bias rides along as one more column of S ([S, 1] [sB, b]ᵀ), so the
    # adapter adds only the two skinny products. Interleaved at M=2048, K=1024, N=2816, r=16, fp32,
    # one thread: 0.98-1.02x nn.Linear, against 1.09-1.15x for F.linear then y.addmm_(S, Bᵀ).
    m, r = x.shape[0], a_tilde.shape[0]
    factor = scaling * lora_B
    if bias is None:
        s = x @ a_tilde.T
        y = s @ factor.T
    else:
        s_one = x.new_empty((m, r + 1))
        s_one[:, r] = 1.0
        s = torch.mm(x, a_tilde.T, out=s_one[:, :r])
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


# ---------------------------------------------------------------- the operators
#
# ``nsru::lowrank_linear`` and ``nsru::lowrank_linear_backward`` are ``torch.library.custom_op``s,
# with a shape function each (``register_fake``) and the forward's backward formula
# (``register_autograd``), so torch.compile traces a model through them as single nodes
# (``fullgraph=True`` works) and ``torch.library.opcheck`` tests their contracts. They stay opaque
# to the compiler rather than ``triton_op``s: on the CPU the torch reference is a deliberate
# sequence of in-place GEMMs (``addmm_`` onto the low-rank term) that Inductor would re-plan, and on
# CUDA the TMA kernel needs an autotuner pre-hook, which ``wrap_triton`` does not support. Which
# implementation runs (``NSRU_BACKEND``) is decided inside, at every call.


def _check_forward(x, weight, bias, lora_A, lora_B, basis, a_tilde=None) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lowrank_linear: x has shape {tuple(x.shape)} and weight {tuple(weight.shape)}; "
            "expected (..., in) and (out, in)"
        )
    out_features, in_features = weight.shape
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lowrank_linear: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lowrank_linear: lora_A has shape {tuple(lora_A.shape)}, expected (r, {in_features})")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lowrank_linear: lora_B has shape {tuple(lora_B.shape)}, expected ({out_features}, {r})")
    if basis.dim() != 2 or basis.shape[0] != in_features:
        raise ValueError(f"lowrank_linear: basis has shape {tuple(basis.shape)}, expected ({in_features}, k)")
    if not (lora_A.dtype == lora_B.dtype == basis.dtype and lora_A.is_floating_point()):
        raise TypeError(
            f"lowrank_linear: lora_A, lora_B and basis must share one floating dtype, got "
            f"{lora_A.dtype}, {lora_B.dtype} and {basis.dtype}"
        )
    if a_tilde is not None and (tuple(a_tilde.shape) != tuple(lora_A.shape) or a_tilde.dtype != lora_A.dtype):
        raise ValueError(
            f"lowrank_linear: a_tilde is {tuple(a_tilde.shape)} {a_tilde.dtype}; expected lora_A's "
            f"{tuple(lora_A.shape)} {lora_A.dtype}"
        )


def _no_autocast(device_type: str):
    """Autocast off for the GEMMs inside the ops (the wrapper already chose their dtypes); a no-op
    context when it is off anyway, which saves its cost on every call."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _s_dtype(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """dtype of the saved ``S``: fp32 from the Triton kernels, the adapters' dtype from the reference."""
    return torch.float32 if use_triton(x, weight) else lora_A.dtype


@torch.library.custom_op("nsru::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    basis: torch.Tensor,
    scaling: float,
    a_tilde: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Y, S, Ã)``: Y of shape ``(..., out)``, ``S = X Ãᵀ`` (M, r) for the backward, and the ``Ã``
    (r, in) it formed, or an empty tensor when ``a_tilde`` was given (the backward keeps that one)."""
    _check_forward(x, weight, bias, lora_A, lora_B, basis, a_tilde)
    x2d = x.reshape(-1, x.shape[-1])
    formed = a_tilde is None
    with _no_autocast(x.device.type):
        if formed:
            a_tilde = null_space_factor(lora_A, basis)
            # an output may not alias an input (k = 0 gives lora_A itself): an r x in copy
            a_tilde = a_tilde.clone(memory_format=torch.contiguous_format) if a_tilde is lora_A else a_tilde
        a_tilde = a_tilde.contiguous()
        if use_triton(x2d, weight):
            from nsru.kernels.lowrank_linear import lowrank_linear_forward_triton as forward
        else:
            forward = lowrank_linear_forward_reference
        y, s = forward(x2d, weight, bias, a_tilde, lora_B, scaling)
    # S is a column slice of [S, 1] on the reference path with a bias: an M x r copy, free beside the GEMM
    return y.reshape(*x.shape[:-1], y.shape[-1]), s.contiguous(), a_tilde if formed else lora_A.new_empty(0)


@_lowrank_linear_op.register_fake
def _lowrank_linear_fake(x, weight, bias, lora_A, lora_B, basis, scaling, a_tilde=None):
    _check_forward(x, weight, bias, lora_A, lora_B, basis, a_tilde)
    rows = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    s = x.new_empty((rows, lora_A.shape[0]), dtype=_s_dtype(x, weight, lora_A))
    return y, s, lora_A.new_empty(lora_A.shape if a_tilde is None else (0,))


@torch.library.custom_op("nsru::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    a_tilde: torch.Tensor,
    lora_B: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dÃ, dB)`` of :func:`lowrank_linear` for ``dy`` (..., out) and ``x`` (..., in); dÃ is not
    yet projected. dX has x's shape and dtype, or is an empty tensor when ``needs_dx`` is false."""
    dy2d = dy.reshape(-1, dy.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    if dy2d.dtype != x2d.dtype:
        dy2d = dy2d.to(x2d.dtype)
    with _no_autocast(x.device.type):
        if use_triton(dy2d, weight):
            from nsru.kernels.lowrank_linear import lowrank_linear_backward_triton as backward
        else:
            backward = lowrank_linear_backward_reference
        dx, d_a, d_b = backward(dy2d, x2d, weight, a_tilde, lora_B, s, scaling, needs_dx)
    dx = dx.reshape(x.shape) if dx is not None else x.new_empty(0)
    return dx, d_a, d_b


@_lowrank_linear_backward_op.register_fake
def _lowrank_linear_backward_fake(dy, x, weight, a_tilde, lora_B, s, scaling, needs_dx):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    return dx, a_tilde.new_empty(a_tilde.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, basis, scaling, given = inputs
    _, s, formed = output
    ctx.mark_non_differentiable(s, formed)  # saved for the backward, not results
    ctx.save_for_backward(x, weight, lora_B, basis, s, formed if given is None else given)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _ds, _da_tilde):
    x, weight, lora_B, basis, s, a_tilde = ctx.saved_tensors
    needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
    dx, d_a, d_b = torch.ops.nsru.lowrank_linear_backward(dy, x, weight, a_tilde, lora_B, s, ctx.scaling, needs_dx)
    if basis.shape[1]:  # ∂L/∂A = (∂L/∂Ã) P⊥, in place on the fresh dÃ (DESIGN §1.4)
        torch.ops.nsru.project_rows_([d_a], [basis])
    d_weight = d_bias = None
    if needs_dw or (ctx.has_bias and needs_db):
        # a frozen base (the usual case) skips this
        with _no_autocast(x.device.type):
            dy2d = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
            d_weight = dy2d.T @ x.reshape(-1, x.shape[-1]) if needs_dw else None
            d_bias = dy2d.sum(0) if ctx.has_bias and needs_db else None
    # ``a_tilde`` (when given) stands for a function of lora_A and basis: its gradient is lora_A's
    return dx if needs_dx else None, d_weight, d_bias, d_a, d_b, None, None, None


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    basis: torch.Tensor,
    scaling: float,
    a_tilde: torch.Tensor | None = None,
) -> torch.Tensor:
    """``X Wᵀ + b + s·(X Ãᵀ) Bᵀ`` for ``x`` of any leading shape, differentiable in x, W, b, A and B.

    The gradient reaching ``lora_A`` is ``∂L/∂Ã`` projected onto the null space of ``basis``.
    ``a_tilde``: ``Ã = A − (A U) Uᵀ`` formed beforehand (:func:`fixed_null_space_factor`) from this
    call's A and the module's retain basis U; the forward reads it instead of forming Ã, and it
    gets no gradient itself. With it, ``basis`` only says where the gradient of A is projected: a
    caller that projects the gradients of A itself, once for many calls (the trainer: one
    ``project_rows_`` over every module for the step), passes an empty ``basis`` (``(in, 0)``) and
    lora_A receives ``∂L/∂Ã`` as it is. Under autocast the base GEMM runs in the autocast dtype (as
    ``nn.Linear``'s) and the adapters stay in their own. The work is done by the operator
    ``torch.ops.nsru.lowrank_linear``.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    y, _, _ = torch.ops.nsru.lowrank_linear(x, weight, bias, lora_A, lora_B, basis, float(scaling), a_tilde)
    return y
