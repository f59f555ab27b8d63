"""Triton kernels of ``lowrank_linear``: a frozen GEMM with a null-space low-rank term fused in.

What they compute (the torch reference is ``nsru.ops.lowrank_linear.lowrank_linear_forward_reference``
and ``lowrank_linear_backward_reference``; in short)::

    S  = X Ãᵀ                                  # (M, r) fp32, saved for the backward
    Y  = X Wᵀ + b + s · S Bᵀ                   # one GEMM; S Bᵀ enters its fp32 accumulator
    T  = dY B                                  # (M, r) fp32
    dX = dY W + s · T Ã                        # one GEMM; T Ã enters its fp32 accumulator
    dB = s · dYᵀ S                             # (out, r)
    dÃ = s · Tᵀ X                              # (r, in)

Two kernels do all of it. ``_fused_lowrank_gemm_kernel`` is a tiled GEMM whose epilogue adds one
extra ``tl.dot`` of an (BLOCK_M, r) by (r, BLOCK_N) pair of tiles into the accumulator before the
single store of the output: the low-rank term costs no second pass over Y (or dX) and no extra
output write. ``_skinny_gemm_kernel`` computes ``scale · P Qᵀ`` for a tall P and a thin Q (r rows);
with strided views it gives S, T, dB and dÃ. These are memory-bound (each reads one big operand
once) and run at fp32 accuracy (``tf32x3`` on tensor cores), which is free there.
``_fused_lowrank_gemm_tma_kernel`` is the fused GEMM again with X, W and Y moved by Hopper's TMA
(``NSRU_TRITON_TMA=1``; off until a GPU run shows it faster). ``nsru.kernels.compile_check``
compiles all of them for sm_90 on a machine without a GPU.

X and W may be fp32, bf16 or fp16 (W is cast to X's dtype in registers); the adapter factors are
read as fp32 whatever their dtype. The rank dimension is padded to at least 16 (``tl.dot``'s
minimum) and masked. Any strides are accepted, so non-contiguous inputs need no copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# NSRU_TRITON_AUTOTUNE=0: take the first configuration for the dtype instead of timing them all
# (tests on a GPU, where every new shape and dtype would otherwise compile and time each one).
_AUTOTUNE = os.environ.get("NSRU_TRITON_AUTOTUNE", "1") != "0"
# NSRU_TRITON_TMA=1: the fused GEMMs move X, W and Y with Hopper's TMA (sm_90 and later) where the
# layouts allow it. Off by default until a GPU run shows it faster than the pointer kernel
# (benchmarks/gpu_kernels.py times both).
TMA = os.environ.get("NSRU_TRITON_TMA", "0") == "1"

# Accuracy of the small adapter products: three tf32 products per dot (about fp32 accuracy), cheap
# where these kernels are memory-bound. (The interpreter computes every dot in numpy fp32 anyway.)
_ADAPTER_PRECISION = "tf32x3"


def _configs(shapes, group_m=8) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_stages=st, num_warps=wp)
        for bm, bn, bk, st, wp in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) for Hopper (H100/H200, 228 KB of shared memory per SM).
# 16-bit: wgmma wants 64-row warpgroup tiles; 128x256x64 in 3 stages takes 144 KB. The smaller
# tiles serve small or skinny problems.
_GEMM_16BIT = _configs(
    [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
     (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 5, 4)]
)  # fmt: skip
# fp32 as tf32: twice the bytes per element, so BLOCK_K 32 to stay inside shared memory.
_GEMM_TF32 = _configs([(128, 128, 32, 3, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)])
# fp32 in full precision runs on the FMA units; a 128x256 tile of it took 80 s to compile (ptxas, sm_90).
_GEMM_F32_IEEE = _configs([(64, 64, 32, 2, 4)])
_GEMM_INTERPRET = _configs([(16, 32, 32, 1, 4)], group_m=4)  # one small tile: the interpreter's cost grows with it


def _gemm_configs() -> list[triton.Config]:
    return _GEMM_INTERPRET if _INTERPRET else _GEMM_16BIT + _GEMM_TF32 + _GEMM_F32_IEEE


def _prune_gemm_configs(configs, named_args, tma=False, **kwargs) -> list[triton.Config]:
    """The configurations for this call's dtype and precision (only the first unless autotuning)."""
    x = named_args["x_desc"].base if tma else named_args["x_ptr"]
    if x.dtype != torch.float32:
        chosen = _GEMM_16BIT
    else:
        chosen = _GEMM_TF32 if kwargs["MAIN_PRECISION"] == "tf32" else _GEMM_F32_IEEE
    if tma:  # the same shapes, carrying the pre-hook that sizes the descriptors' blocks
        by_shape = {_shape_of(c): c for c in configs}
        chosen = [by_shape[_shape_of(c)] for c in chosen]
    return chosen if _AUTOTUNE else chosen[:1]


def _shape_of(c: triton.Config) -> tuple:
    return (*sorted(c.kwargs.items()), c.num_stages, c.num_warps)


def _skinny_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4)]
    # Memory-bound: enough programs to cover 132 SMs, and long enough K-steps to keep loads in flight.
    shapes = [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 3, 4), (128, 64, 3, 8), (32, 256, 3, 4)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=st, num_warps=wp) for bm, bk, st, wp in shapes]
    return configs if _AUTOTUNE else configs[1:2]


def _bucket(m: int) -> int:
    """Autotuning key for a token count: its power-of-two ceiling, so that varying batch sizes reuse a config."""
    return triton.next_power_of_2(max(int(m), 1))


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row-block, column-block), in grouped order: GROUP_M row-blocks walk the
    column-blocks together, so the W tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _add_lowrank_and_bias(
    acc, offs_m, offs_n, mask_m, mask_n,
    s_ptr, b_ptr, bias_ptr, R,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr, LOWRANK_BF16: tl.constexpr, MAIN_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``acc + scaling · S[offs_m] B[offs_n]ᵀ + bias[offs_n]``: one (BLOCK_M, r) x (r, BLOCK_N) product
    into the GEMM's accumulator before its single store."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    s = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, mask=mask_m[:, None] & mask_r[None, :], other=0.0
    )
    bt = tl.load(
        b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn, mask=mask_r[:, None] & mask_n[None, :], other=0.0
    )
    s = s.to(tl.float32) * scaling
    bt = bt.to(tl.float32)
    if LOWRANK_BF16:  # bf16 output: a bf16 product is as exact as the store, and fp32 would cost tf32 rate
        acc = tl.dot(s.to(tl.bfloat16), bt.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(s, bt, acc, input_precision=MAIN_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "R", "MAIN_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.heuristics(
    {
        "EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0,
        "EVEN_MNK": lambda meta: meta["M"] % meta["BLOCK_M"] == 0
        and meta["N"] % meta["BLOCK_N"] == 0
        and meta["K"] % meta["BLOCK_K"] == 0,
    }
)
@triton.jit
def _fused_lowrank_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr,
    LOWRANK_BF16: tl.constexpr,
    MAIN_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_MNK: tl.constexpr,
):
    """``Y[M, N] = X[M, K] W[N, K]ᵀ + bias[N] + scaling · S[M, R] B[N, R]ᵀ`` with fp32 accumulation."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Masks rather than wrapped indices: the offsets stay provably contiguous, so loads along M or N
    # (W read as Wᵀ in the backward) vectorise; the masks are uniform over 16 elements when M, N are
    # multiples of 16, which Triton specialises on.
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_MNK:  # the common LLM case (tokens, widths multiples of the tile): no predicates
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        elif EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=MAIN_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = _add_lowrank_and_bias(
        acc, offs_m, offs_n, mask_m, mask_n, s_ptr, b_ptr, bias_ptr, R,
        stride_sm, stride_sr, stride_bn, stride_br, stride_bias, scaling,
        HAS_BIAS, LOWRANK_BF16, MAIN_PRECISION, BLOCK_R,
    )  # fmt: skip
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _set_tma_blocks(nargs) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow the configuration being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]
    nargs["y_desc"].block_shape = [bm, bn]


def _tma_configs() -> list[triton.Config]:
    return [
        triton.Config(dict(c.kwargs), num_stages=c.num_stages, num_warps=c.num_warps, pre_hook=_set_tma_blocks)
        for c in _gemm_configs()
    ]


@triton.autotune(
    configs=_tma_configs(),
    key=["M_BUCKET", "N", "K", "R", "MAIN_PRECISION", "W_KN"],
    prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: _prune_gemm_configs(configs, nargs, **kw, tma=True)},
)
@triton.jit
def _fused_lowrank_gemm_tma_kernel(
    x_desc, w_desc, y_desc, bias_ptr, s_ptr, b_ptr,
    M, N, K, R, M_BUCKET,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr,
    LOWRANK_BF16: tl.constexpr,
    MAIN_PRECISION: tl.constexpr,
    W_KN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The same product as ``_fused_lowrank_gemm_kernel`` with X, W and Y moved by Hopper's tensor
    memory accelerator (TMA): no address arithmetic or predicates in the loop, edges zero-filled
    and clipped by the hardware. W is (N, K), or (K, N) when ``W_KN`` (dX = dY W in the backward)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = x_desc.load([off_m, k])
        if W_KN:
            w = w_desc.load([k, off_n])
        else:
            w = w_desc.load([off_n, k]).T
        acc = tl.dot(x, w, acc, input_precision=MAIN_PRECISION)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc = _add_lowrank_and_bias(
        acc, offs_m, offs_n, offs_m < M, offs_n < N, s_ptr, b_ptr, bias_ptr, R,
        stride_sm, stride_sr, stride_bn, stride_br, stride_bias, scaling,
        HAS_BIAS, LOWRANK_BF16, MAIN_PRECISION, BLOCK_R,
    )  # fmt: skip
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.autotune(configs=_skinny_configs(), key=["M_BUCKET", "K", "R"])
@triton.heuristics({"EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0})
@triton.jit
def _skinny_gemm_kernel(
    p_ptr, q_ptr, out_ptr,
    M, K, R, M_BUCKET,
    stride_pm, stride_pk, stride_qr, stride_qk, stride_om, stride_or,
    scale,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``OUT[M, R] = scale · P[M, K] Q[R, K]ᵀ`` in fp32, R ≤ BLOCK_R; P of any float dtype."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            p = tl.load(p_ptrs, mask=mask_m[:, None], other=0.0)
            q = tl.load(q_ptrs, mask=mask_r[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            p = tl.load(p_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            q = tl.load(q_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision=PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


def _main_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's switch (tf32 only where the user allowed it); 16-bit ones ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides and a contiguous last dimension."""
    return all(
        t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors
    )


def _tma_available(device: torch.device) -> bool:
    return _INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _fused_gemm(x, w_nk, bias, s, b_nr, out, scaling: float, tma: bool | None = None) -> None:
    """``out = x @ w_nkᵀ + bias + scaling · s @ b_nrᵀ`` where ``w_nk`` is any (N, K) view and ``b_nr`` any (N, R) view.

    ``tma`` (default: ``NSRU_TRITON_TMA``) takes the TMA kernel where the layouts allow it.
    """
    m, k = x.shape
    n = w_nk.shape[0]
    r = s.shape[1]
    if m == 0 or n == 0:
        return
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    common = dict(
        HAS_BIAS=bias is not None,
        LOWRANK_BF16=out.dtype == torch.bfloat16,
        MAIN_PRECISION=_main_precision(x.dtype),
        BLOCK_R=_rank_block(r),
    )
    bias_arg = bias if bias is not None else s
    bias_stride = bias.stride(0) if bias is not None else 0
    w_kn = w_nk.stride(1) != 1  # W given as a transposed view (the backward's dX = dY W)
    w_stored = w_nk.T if w_kn else w_nk
    if (
        (TMA if tma is None else tma)
        and x.dtype == w_nk.dtype == out.dtype
        and _tma_available(x.device)
        and _tma_layout_ok(x, w_stored, out)
    ):
        from triton.tools.tensor_descriptor import TensorDescriptor

        block = [16, 16]  # placeholder: the autotuner's pre-hook sets each config's block shape
        _fused_lowrank_gemm_tma_kernel[grid](
            TensorDescriptor.from_tensor(x, block), TensorDescriptor.from_tensor(w_stored, block),
            TensorDescriptor.from_tensor(out, block), bias_arg, s, b_nr,
            m, n, k, r, _bucket(m),
            s.stride(0), s.stride(1), b_nr.stride(0), b_nr.stride(1), bias_stride,
            float(scaling),
            W_KN=w_kn,
            **common,
        )  # fmt: skip
        return
    _fused_lowrank_gemm_kernel[grid](
        x, w_nk, bias_arg, s, b_nr, out,
        m, n, k, r, _bucket(m),
        x.stride(0), x.stride(1), w_nk.stride(0), w_nk.stride(1),
        s.stride(0), s.stride(1), b_nr.stride(0), b_nr.stride(1),
        out.stride(0), out.stride(1), bias_stride,
        float(scaling),
        **common,
    )  # fmt: skip


def _skinny_gemm(p, q_rk, out, scale: float) -> None:
    """``out = scale · p @ q_rkᵀ`` for a tall ``p`` (M, K) and a thin ``q_rk`` (R, K); any strides."""
    m, k = p.shape
    r = q_rk.shape[0]
    if m == 0:
        return
    if k == 0:
        out.zero_()
        return
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _skinny_gemm_kernel[grid](
        p, q_rk, out,
        m, k, r, _bucket(m),
        p.stride(0), p.stride(1), q_rk.stride(0), q_rk.stride(1), out.stride(0), out.stride(1),
        float(scale),
        PRECISION=_ADAPTER_PRECISION,
        BLOCK_R=_rank_block(r),
    )  # fmt: skip


def _check_rank(a_tilde: torch.Tensor) -> None:
    if a_tilde.shape[0] > 128:
        raise ValueError(f"lowrank_linear (triton): rank {a_tilde.shape[0]} is above the supported 128")


def lowrank_linear_forward_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_tilde: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on 2-D ``x`` (M, in); returns ``(Y, S)`` with ``S = X Ãᵀ`` in fp32."""
    _check_rank(a_tilde)
    m = x.shape[0]
    s = torch.empty((m, a_tilde.shape[0]), device=x.device, dtype=torch.float32)
    _skinny_gemm(x, a_tilde, s, 1.0)
    y = torch.empty((m, weight.shape[0]), device=x.device, dtype=x.dtype)
    _fused_gemm(x, weight, bias, s, lora_B, y, scaling)
    return y, s


def lowrank_linear_backward_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    a_tilde: torch.Tensor,
    lora_B: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    needs_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Triton backward on 2-D ``dy`` (M, out) and ``x`` (M, in); returns ``(dX, dÃ, dB)``."""
    _check_rank(a_tilde)
    m = dy.shape[0]
    t = torch.empty((m, a_tilde.shape[0]), device=dy.device, dtype=torch.float32)
    _skinny_gemm(dy, lora_B.T, t, 1.0)  # T = dY B
    d_b = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
    _skinny_gemm(dy.T, s.T, d_b, scaling)  # dB = s · dYᵀ S
    d_a = torch.empty_like(a_tilde, memory_format=torch.contiguous_format)
    _skinny_gemm(x.T, t.T, d_a.T, scaling)  # dÃᵀ = s · Xᵀ T
    dx = None
    if needs_dx:
        dx = torch.empty((m, weight.shape[1]), device=dy.device, dtype=dy.dtype)
        _fused_gemm(dy, weight.T, None, t, a_tilde.T, dx, scaling)  # dX = dY W + s · T Ã
    return dx, d_a, d_b
