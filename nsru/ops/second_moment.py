"""``second_moment_``: grouped accumulation of uncentered second moments, ``C_i += X_iᵀ X_i``.

The retain statistic of a module is the second moment of its inputs over every unmasked token.
One call serves many modules of different widths. The compiled extension (``nsru._C``) fills
at least the upper triangle (it may skip the lower one); read moments through :func:`symmetrize`.

On the CPU the extension cuts every statistic into upper-triangle row panels and spreads the panels
of all modules over the cores (about half the multiply-adds of ``addmm_``); bf16/fp16 inputs with
an fp32 statistic go to MKL's mixed-precision GEMM without a converted copy. On CUDA it runs cuBLAS
on the same panels. Statistics are plain tensors: ``torch.distributed.all_reduce`` sums them
across processes before :func:`nsru.ops.subspace_update`. See ``csrc/second_moment.cpp``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nsru.ops.backend import extension_available, use_extension

if extension_available():

    @torch.library.register_fake("nsru::second_moment_")
    def _second_moment_fake(moments, inputs, masks):
        return None


def symmetrize(moment: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from one whose upper triangle is valid."""
    upper = torch.triu(moment)
    return upper + torch.triu(moment, diagonal=1).T


def _rows(x: torch.Tensor, mask: torch.Tensor | None, width: int) -> torch.Tensor:
    rows = x.reshape(-1, width)
    if mask is not None:
        rows = rows[mask.reshape(-1).to(torch.bool)]
    return rows


def second_moment_reference_(
    moments: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """Torch reference of :func:`second_moment_` (fills the full matrix)."""
    masks = masks or [None] * len(inputs)
    for c, x, m in zip(moments, inputs, masks):
        rows = _rows(x, m, c.shape[0]).to(c.dtype)
        if rows.shape[0]:
            c.addmm_(rows.T, rows)


def _check(moments, inputs, masks) -> None:
    if len(moments) != len(inputs):
        raise ValueError(f"second_moment_: got {len(moments)} moments and {len(inputs)} inputs")
    if masks is not None and len(masks) != len(inputs):
        raise ValueError(f"second_moment_: got {len(masks)} masks for {len(inputs)} inputs (pass None or one per input)")
    for i, (c, x) in enumerate(zip(moments, inputs)):
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"second_moment_: moments[{i}] must be square, got shape {tuple(c.shape)}")
        if c.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"second_moment_: moments[{i}] must be float32 or float64, got {c.dtype}")
        if not c.is_contiguous():
            raise ValueError(f"second_moment_: moments[{i}] must be contiguous")
        if x.dim() < 1 or x.shape[-1] != c.shape[0]:
            raise ValueError(
                f"second_moment_: inputs[{i}] has shape {tuple(x.shape)}, expected last dimension {c.shape[0]} "
                f"to match moments[{i}] of shape {tuple(c.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"second_moment_: inputs[{i}] must be floating point, got {x.dtype}")
        if masks is not None and masks[i] is not None and masks[i].numel() * c.shape[0] != x.numel():
            raise ValueError(
                f"second_moment_: masks[{i}] has {masks[i].numel()} entries for {x.numel() // max(c.shape[0], 1)} "
                f"rows of inputs[{i}]"
            )


def second_moment_(
    moments: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """In place, for every i: ``moments[i] += X_iᵀ X_i`` over the rows of ``inputs[i]`` kept by ``masks[i]``.

    ``inputs[i]`` has any leading shape and last dimension ``d_i``; ``moments[i]`` is ``(d_i, d_i)``
    float32 or float64; ``masks[i]`` (optional) has one entry per row, non-zero to keep it. Inputs
    may be bf16, fp16 or fp32; they are accumulated in the moment's dtype.
    """
    _check(moments, inputs, masks)
    if not moments:
        return
    if use_extension(*moments):
        torch.ops.nsru.second_moment_(list(moments), list(inputs), list(masks) if masks is not None else [])
    else:
        second_moment_reference_(moments, inputs, masks)
