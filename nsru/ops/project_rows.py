"""``project_rows_``: remove from each row of G its component in span(U), in place: G ← G − (G U) Uᵀ.

Applied to the ``lora_A`` gradients so that an update never enters a module's retain subspace.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nsru.ops.backend import requested_backend, use_triton

# The grouped kernel gives each program 16 rows of one module and walks that module's whole basis,
# so its parallelism is the number of such row blocks. One module with r = 16 (the autograd function's
# call) is one program on one SM: by the count of its tf32x3 products about 0.4 ms for a 4096-wide
# module with 2048 basis vectors, where cuBLAS's two GEMMs spread over the GPU take tens of
# microseconds. Below this many programs ``auto`` takes the torch (cuBLAS) path; the trainer's call
# over all modules of a model is well above it. An estimate, not a measurement yet:
# benchmarks/gpu_kernels.py times both sides.
MIN_TRITON_PROGRAMS = 32


def project_rows_reference_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """Torch reference of :func:`project_rows_`."""
    for g, u in zip(grads, bases):
        if u.shape[1] == 0:
            continue
        g.sub_(((g.to(u.dtype) @ u) @ u.T).to(g.dtype))


def _check(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    if len(grads) != len(bases):
        raise ValueError(f"project_rows_: got {len(grads)} gradients and {len(bases)} bases")
    for i, (g, u) in enumerate(zip(grads, bases)):
        if g.dim() != 2 or u.dim() != 2 or g.shape[1] != u.shape[0]:
            raise ValueError(
                f"project_rows_: grads[{i}] has shape {tuple(g.shape)} and bases[{i}] {tuple(u.shape)}; "
                "expected (r, in) and (in, k)"
            )
        if not (g.is_floating_point() and u.is_floating_point()):
            raise TypeError(f"project_rows_: grads[{i}] is {g.dtype} and bases[{i}] {u.dtype}; expected floating point")
        if g.device != u.device:
            raise ValueError(f"project_rows_: grads[{i}] is on {g.device} and bases[{i}] on {u.device}")


# The operator ``nsru::project_rows_(Tensor(a!)[] grads, Tensor[] bases) -> ()``, opaque to
# torch.compile (which functionalises the mutation of ``grads``). Not a ``triton_op``: the grouped
# kernel reads a table of raw addresses built on the host, which no tracer can follow.
@torch.library.custom_op("nsru::project_rows_", mutates_args=("grads",))
def _project_rows_op(grads: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    _check(grads, bases)
    if use_triton(*grads, *bases):
        from nsru.kernels import project_rows as kernel

        if requested_backend() == "triton" or kernel.row_blocks(grads, bases) >= MIN_TRITON_PROGRAMS:
            kernel.project_rows_triton_(grads, bases)
            return
    project_rows_reference_(grads, bases)


@_project_rows_op.register_fake
def _project_rows_fake(grads, bases) -> None:
    _check(grads, bases)


def project_rows_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place, for every i: ``grads[i] ← grads[i] − (grads[i] U_i) U_iᵀ``.

    ``grads[i]`` is ``(r_i, in_i)`` and ``bases[i]`` is ``(in_i, k_i)`` with orthonormal columns
    (``k_i`` may be 0). All modules are handled in one kernel launch on the Triton backend (taken on
    CUDA when the group is large enough to fill the GPU, see ``MIN_TRITON_PROGRAMS``, or always
    with ``NSRU_BACKEND=triton``). The work is done by the operator ``torch.ops.nsru.project_rows_``.
    """
    _check(grads, bases)
    if grads:  # an empty list has no tensor to dispatch on
        torch.ops.nsru.project_rows_(list(grads), list(bases))
