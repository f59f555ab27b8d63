"""``subspace_update``: from each module's retain statistic to its retain basis and rank.

The eigendecomposition runs in float64. The rank is chosen by one rule for all modules: an energy
fraction τ (the smallest k whose top-k eigenvalues hold τ of the trace), a fixed k, or an absolute
eigenvalue threshold.

All modules are decomposed together: on the CPU by the extension's ``symeig_upper``, which spreads
the matrices over the cores (each eigensolver single-threaded: LAPACK's ``syevd`` scales poorly on
few cores), elsewhere by one batched ``torch.linalg.eigh`` per width (a Llama layer has a handful
of distinct widths). Batches are bounded in bytes, so a large model never holds all its float64
eigenvectors at once.

Adding retain data later has two forms:

* exact: keep the statistics and accumulate the new data into them (``second_moment_`` adds in
  place, and ``torch.distributed.all_reduce`` sums them across processes), then call
  ``subspace_update`` again; the result is the from-scratch update on the union of the data;
* from a basis only: ``subspace_update(new_moments, previous=old_subspaces)`` folds each old
  subspace back in as ``U diag(λ_1..k) Uᵀ`` and decomposes that plus the new statistic. This is
  exact (up to the fp32 rounding of the stored basis) when the old subspace kept every direction
  with non-zero energy (``energy=1.0`` on low-rank data, or a full ``rank``) and otherwise drops
  only the old energy outside ``U``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nsru.ops.backend import extension_available, requested_backend, use_extension
from nsru.ops.second_moment import symmetrize

if extension_available():

    @torch.library.register_fake("nsru::symeig_upper")
    def _symeig_upper_fake(moments):
        values = [c.new_empty((c.shape[0],), dtype=torch.float64) for c in moments]
        # Column-major, as LAPACK (and torch.linalg.eigh) returns eigenvectors.
        vectors = [c.new_empty_strided((c.shape[0], c.shape[0]), (1, max(c.shape[0], 1)), dtype=torch.float64) for c in moments]
        return values, vectors

_BATCH_BYTES = 256 * 2**20
"""Most bytes of float64 statistics stacked into one batched ``eigh`` (bounds the extra memory)."""


@dataclass
class Subspace:
    """A module's retain basis ``U`` (``in × k``, orthonormal, fp32), its rank and the energy it holds."""

    basis: torch.Tensor
    rank: int
    energy: float
    eigenvalues: torch.Tensor  # all eigenvalues, descending, float64


def select_rank(
    eigenvalues: torch.Tensor,
    *,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
) -> int:
    """The rank ``k`` that the rule picks from eigenvalues sorted in descending order."""
    _check_rule(energy, rank, threshold)
    return int(_select_ranks(eigenvalues.reshape(1, -1), energy=energy, rank=rank, threshold=threshold)[0])


def _check_rule(energy, rank, threshold) -> None:
    rules = [r for r in (energy, rank, threshold) if r is not None]
    if len(rules) != 1:
        raise ValueError("choose exactly one of energy=, rank= or threshold= for the retain subspace")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if energy is not None and not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be a fraction in [0, 1], got {energy}")


def _select_ranks(lam: torch.Tensor, *, energy, rank, threshold) -> list[int]:
    """The rank of every row of ``lam`` (``B × d``, descending): see :func:`select_rank`."""
    b, d = lam.shape
    if rank is not None:
        return [min(int(rank), d)] * b
    lam = lam.clamp_min(0)
    if threshold is not None:
        return (lam > threshold).sum(-1).tolist()
    total = lam.sum(-1, keepdim=True)
    if energy == 0.0 or d == 0:
        return [0] * b
    cumulative = torch.cumsum(lam, -1) / total.clamp_min(torch.finfo(lam.dtype).tiny)
    # The smallest k with cumulative[k-1] >= energy; a little slack for rounding at energy = 1.
    ks = ((cumulative < energy - 1e-12).sum(-1) + 1).clamp_max(d)
    ks = torch.where(total.squeeze(-1) > 0, ks, torch.zeros_like(ks))
    return ks.tolist()


def _subspace(lam: torch.Tensor, vec: torch.Tensor, k: int) -> Subspace:
    """``lam`` descending, ``vec`` columns in the same order."""
    positive = lam.clamp_min(0)
    total = float(positive.sum())
    held = float(positive[:k].sum()) / total if total > 0 else 0.0
    return Subspace(vec[:, :k].to(torch.float32).contiguous(), k, held, lam.clone())


def subspace_update_reference(
    moments: Sequence[torch.Tensor],
    *,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
) -> list[Subspace]:
    """Torch reference of :func:`subspace_update`: one module at a time."""
    _check_rule(energy, rank, threshold)
    out = []
    for c in moments:
        full = symmetrize(c.to(torch.float64))
        lam, vec = torch.linalg.eigh(full)
        lam, vec = lam.flip(0), vec.flip(1)
        k = select_rank(lam, energy=energy, rank=rank, threshold=threshold)
        out.append(_subspace(lam, vec, k))
    return out


def fold(subspace: Subspace, *, weight: float = 1.0) -> torch.Tensor:
    """The statistic a subspace stands for, ``weight · U diag(λ_1..k) Uᵀ`` (float64, full matrix)."""
    u = subspace.basis.to(torch.float64)
    lam = subspace.eigenvalues[: subspace.rank].to(u.device, torch.float64).clamp_min(0)
    return weight * (u * lam) @ u.T


def _eigh_torch(matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ascending eigenpairs of the symmetric matrices whose upper triangles are given: one batched
    ``torch.linalg.eigh`` per width (on CUDA this is cuSOLVER's batched solver)."""
    out: list = [None] * len(matrices)
    by_width: dict[int, list[int]] = {}
    for i, c in enumerate(matrices):
        by_width.setdefault(c.shape[0], []).append(i)
    for members in by_width.values():
        x = torch.stack([matrices[i].to(torch.float64) for i in members])
        lam, vec = torch.linalg.eigh(torch.triu(x) + torch.triu(x, diagonal=1).mT)
        for j, i in enumerate(members):
            out[i] = (lam[j], vec[j])
    return out


def _eigh(matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if matrices and matrices[0].device.type == "cpu" and use_extension(matrices[0]):
        lam, vec = torch.ops.nsru.symeig_upper(matrices)
        return list(zip(lam, vec))
    return _eigh_torch(matrices)


def subspace_update(
    moments: Sequence[torch.Tensor],
    *,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
    previous: Sequence[Subspace | None] | None = None,
    previous_weight: float | Sequence[float] = 1.0,
) -> list[Subspace]:
    """Retain bases of all modules in one call; ``moments[i]`` needs a valid upper triangle.

    Choose exactly one rule: ``energy`` (fraction τ of the trace), ``rank`` (fixed k, capped at
    the width) or ``threshold`` (eigenvalues above it). With ``previous`` (one :class:`Subspace`
    or ``None`` per module), ``moments`` hold only the statistics of *new* data and each old
    subspace is folded back in first, scaled by ``previous_weight`` (e.g. ``N_old / N_new`` when the
    statistics are means rather than sums); see the module docstring for when this is exact.
    Returns one :class:`Subspace` per module, in order.
    """
    _check_rule(energy, rank, threshold)
    for i, c in enumerate(moments):
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"subspace_update: moments[{i}] must be square, got shape {tuple(c.shape)}")
        if not c.is_floating_point():
            raise TypeError(f"subspace_update: moments[{i}] must be floating point, got {c.dtype}")
    if previous is not None and len(previous) != len(moments):
        raise ValueError(f"subspace_update: got {len(previous)} previous subspaces for {len(moments)} moments")
    if isinstance(previous_weight, (int, float)):
        weights = [float(previous_weight)] * len(moments)
    else:
        weights = [float(w) for w in previous_weight]
        if len(weights) != len(moments):
            raise ValueError(f"subspace_update: got {len(weights)} previous weights for {len(moments)} moments")
    if requested_backend() == "reference" and previous is None:
        return subspace_update_reference(moments, energy=energy, rank=rank, threshold=threshold)

    # Widest first, in batches of bounded float64 size, one device per batch.
    order = sorted(range(len(moments)), key=lambda i: (str(moments[i].device), -moments[i].shape[0]))
    out: list[Subspace | None] = [None] * len(moments)
    batch: list[int] = []
    batch_bytes = 0

    def run(batch: list[int]) -> None:
        matrices = []
        for i in batch:
            c = moments[i]
            old = previous[i] if previous is not None else None
            if old is not None:
                if old.basis.shape[0] != c.shape[0]:
                    raise ValueError(
                        f"subspace_update: previous[{i}] has width {old.basis.shape[0]} but moments[{i}] "
                        f"is {c.shape[0]}x{c.shape[0]}"
                    )
                c = symmetrize(c.to(torch.float64)) + fold(old, weight=weights[i]).to(c.device)
            matrices.append(c)
        for i, (lam, vec) in zip(batch, _eigh(matrices)):
            lam, vec = lam.flip(0), vec.flip(1)
            k = _select_ranks(lam.reshape(1, -1), energy=energy, rank=rank, threshold=threshold)[0]
            out[i] = _subspace(lam, vec, k)

    for i in order:
        size = 8 * moments[i].shape[0] ** 2
        if batch and (batch_bytes + size > _BATCH_BYTES or moments[batch[0]].device != moments[i].device):
            run(batch)
            batch, batch_bytes = [], 0
        batch.append(i)
        batch_bytes += size
    if batch:
        run(batch)
    return out  # type: ignore[return-value]
