"""``subspace_update``: from each module's retain statistic to its retain basis and rank.

The eigendecomposition runs in float64. The rank is chosen by one rule for all modules: an energy
fraction τ (the smallest k whose top-k eigenvalues hold τ of the trace), a fixed k, or an absolute
eigenvalue threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nsru.ops.second_moment import symmetrize


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
    rules = [r for r in (energy, rank, threshold) if r is not None]
    if len(rules) != 1:
        raise ValueError("choose exactly one of energy=, rank= or threshold= for the retain subspace")
    d = eigenvalues.numel()
    if rank is not None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return min(int(rank), d)
    lam = eigenvalues.clamp_min(0)
    if threshold is not None:
        return int((lam > threshold).sum())
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be a fraction in [0, 1], got {energy}")
    total = float(lam.sum())
    if total <= 0.0 or energy == 0.0:
        return 0
    cumulative = torch.cumsum(lam, 0) / total
    # The smallest k with cumulative[k-1] >= energy; a little slack for rounding at energy = 1.
    return min(int((cumulative < energy - 1e-12).sum()) + 1, d)


def subspace_update_reference(
    moments: Sequence[torch.Tensor],
    *,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
) -> list[Subspace]:
    """Torch reference of :func:`subspace_update`."""
    out = []
    for c in moments:
        full = symmetrize(c.to(torch.float64))
        lam, vec = torch.linalg.eigh(full)
        lam, vec = lam.flip(0), vec.flip(1)
        k = select_rank(lam, energy=energy, rank=rank, threshold=threshold)
        total = float(lam.clamp_min(0).sum())
        held = float(lam[:k].clamp_min(0).sum()) / total if total > 0 else 0.0
        out.append(Subspace(vec[:, :k].to(torch.float32).contiguous(), k, held, lam))
    return out


def subspace_update(
    moments: Sequence[torch.Tensor],
    *,
    energy: float | None = None,
    rank: int | None = None,
    threshold: float | None = None,
) -> list[Subspace]:
    """Retain bases of all modules in one call; ``moments[i]`` needs a valid upper triangle."""
    for i, c in enumerate(moments):
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"subspace_update: moments[{i}] must be square, got shape {tuple(c.shape)}")
    return subspace_update_reference(moments, energy=energy, rank=rank, threshold=threshold)
