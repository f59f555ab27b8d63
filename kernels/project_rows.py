"""Triton kernel of ``project_rows_``: ``G_i ← G_i − (G_i U_i) U_iᵀ`` in place, all modules in one launch.

The torch reference is ``nsru.ops.project_rows.project_rows_reference_``.

Modules differ in width (``in_i``), rank (``r_i``) and basis size (``k_i``), so the launch reads a
small table with one row per program: the addresses of ``G_i`` and ``U_i``, which 16 rows of
``G_i`` the program owns, the three sizes and the four strides. A program walks its module's basis
in column blocks ``U_b`` and, for each, computes ``P = G U_b`` over the full width, then writes
``G ← G − P U_bᵀ`` back. Doing the blocks one after another on the already-updated G gives the
same result as one projection with all of U, because the columns of U are orthonormal
(``(G − P U_bᵀ) U_c = G U_c`` for ``c ≠ b``); it is the modified Gram-Schmidt order, which is the
more accurate of the two. Products run at fp32 accuracy (``tf32x3``): the projection is what keeps
updates out of the retain subspace, so it is not done in tf32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16  # rows of G per program (tl.dot's minimum); ranks above 16 get several programs
BLOCK_BASIS = 64  # basis columns per step
BLOCK_COLUMNS = 64  # columns of G (and rows of U) per load
NUM_WARPS = 4
_TABLE_COLUMNS = 10  # g address, u address, first row, rows, width, basis size, 4 strides


@triton.jit
def _project_rows_kernel(
    table_ptr,
    TABLE_COLUMNS: tl.constexpr,
    G_DTYPE: tl.constexpr,
    U_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = table_ptr + tl.program_id(0) * TABLE_COLUMNS
    g_ptr = tl.load(row + 0).to(tl.pointer_type(G_DTYPE))
    u_ptr = tl.load(row + 1).to(tl.pointer_type(U_DTYPE))
    r0 = tl.load(row + 2)
    n_rows = tl.load(row + 3)
    width = tl.load(row + 4)
    n_basis = tl.load(row + 5)
    stride_gr = tl.load(row + 6)
    stride_gc = tl.load(row + 7)
    stride_uc = tl.load(row + 8)
    stride_ub = tl.load(row + 9)

    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    for b0 in range(0, n_basis, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < n_basis
        # P = G U_b over the full width
        p = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
        for c0 in range(0, width, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < width
            g = tl.load(
                g_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc,
                mask=mask_r[:, None] & mask_c[None, :],
                other=0.0,
            )
            u = tl.load(
                u_ptr + offs_c[:, None] * stride_uc + offs_b[None, :] * stride_ub,
                mask=mask_c[:, None] & mask_b[None, :],
                other=0.0,
            )
            p = tl.dot(g.to(tl.float32), u.to(tl.float32), p, input_precision="tf32x3")
        # G ← G − P U_bᵀ
        for c0 in range(0, width, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < width
            g_ptrs = g_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc
            mask_g = mask_r[:, None] & mask_c[None, :]
            g = tl.load(g_ptrs, mask=mask_g, other=0.0).to(tl.float32)
            ut = tl.load(
                u_ptr + offs_b[:, None] * stride_ub + offs_c[None, :] * stride_uc,
                mask=mask_b[:, None] & mask_c[None, :],
                other=0.0,
            )
            g = g - tl.dot(p, ut.to(tl.float32), input_precision="tf32x3")
            tl.store(g_ptrs, g.to(G_DTYPE), mask=mask_g)
        # the next block reads G as this one wrote it, across the program's threads
        tl.debug_barrier()


def row_blocks(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> int:
    """How many programs :func:`project_rows_triton_` launches: its parallelism."""
    return sum(triton.cdiv(g.shape[0], BLOCK_ROWS) for g, u in zip(grads, bases) if u.shape[1] and g.shape[1])


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def project_rows_triton_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place, for every i: ``grads[i] ← grads[i] − (grads[i] U_i) U_iᵀ``; one launch per dtype pair (usually one)."""
    groups: dict[tuple[torch.dtype, torch.dtype, torch.device], list[list[int]]] = {}
    for i, (g, u) in enumerate(zip(grads, bases)):
        n_rows, width = g.shape
        n_basis = u.shape[1]
        if n_basis == 0 or n_rows == 0 or width == 0:
            continue
        if g.dtype not in _TL_DTYPES or u.dtype not in _TL_DTYPES:
            raise TypeError(f"project_rows_ (triton): grads[{i}] is {g.dtype} and bases[{i}] {u.dtype}; expected float types")
        if u.device != g.device:
            raise ValueError(f"project_rows_ (triton): grads[{i}] is on {g.device} and bases[{i}] on {u.device}")
        rows = groups.setdefault((g.dtype, u.dtype, g.device), [])
        for r0 in range(0, n_rows, BLOCK_ROWS):
            rows.append(
                [g.data_ptr(), u.data_ptr(), r0, n_rows, width, n_basis, g.stride(0), g.stride(1), u.stride(0), u.stride(1)]
            )
    for (g_dtype, u_dtype, device), rows in groups.items():
        # The largest modules set the pace: their programs go first so they start first.
        rows.sort(key=lambda row: row[4] * row[5], reverse=True)
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _project_rows_kernel[(len(rows),)](
            table,
            TABLE_COLUMNS=_TABLE_COLUMNS,
            G_DTYPE=_TL_DTYPES[g_dtype],
            U_DTYPE=_TL_DTYPES[u_dtype],
            BLOCK_R=BLOCK_ROWS,
            BLOCK_B=BLOCK_BASIS,
            BLOCK_C=BLOCK_COLUMNS,
            num_warps=NUM_WARPS,
        )
