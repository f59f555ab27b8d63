"""``project_rows_``: remove from each row of G its component in span(U), in place: G ← G − (G U) Uᵀ.

Applied to the ``lora_A`` gradients so that an update never enters a module's retain subspace.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nsru.ops.backend import use_triton


def project_rows_reference_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """Torch reference of :func:`project_rows_`."""
    for g, u in zip(grads, bases):
        if u.shape[1] == 0:
            continue
        g.sub_(((g.to(u.dtype) @ u) @ u.T).to(g.dtype))


def project_rows_(grads: Sequence[torch.Tensor], bases: Sequence[torch.Tensor]) -> None:
    """In place, for every i: ``grads[i] ← grads[i] − (grads[i] U_i) U_iᵀ``.

    ``grads[i]`` is ``(r_i, in_i)`` and ``bases[i]`` is ``(in_i, k_i)`` with orthonormal columns
    (``k_i`` may be 0). All modules are handled in one kernel launch on the Triton backend.
    """
    if len(grads) != len(bases):
        raise ValueError(f"project_rows_: got {len(grads)} gradients and {len(bases)} bases")
    for i, (g, u) in enumerate(zip(grads, bases)):
        if g.dim() != 2 or u.dim() != 2 or g.shape[1] != u.shape[0]:
            raise ValueError(
                f"project_rows_: grads[{i}] has shape {tuple(g.shape)} and bases[{i}] {tuple(u.shape)}; "
                "expected (r, in) and (in, k)"
            )
    if not grads:
        return
    if use_triton(*grads, *bases):
        from nsru.kernels.project_rows import project_rows_triton_

        project_rows_triton_(grads, bases)
    else:
        project_rows_reference_(grads, bases)
