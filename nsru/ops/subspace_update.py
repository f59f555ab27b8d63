"""``subspace_update``: from each module's retain statistic to its retain basis and its size k.

The eigendecomposition runs in float64. How many directions a basis keeps is one
:class:`SubspaceRule` for all modules: an energy fraction τ of the trace, a fixed k, an absolute
eigenvalue threshold, or a tail relative to the largest or the mean eigenvalue; optionally with a
floor of null directions every module keeps.

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
  with non-zero energy (``energy=1`` on low-rank data, or ``k`` at the full width) and otherwise drops
  only the old energy outside ``U``.
"""

from __future__ import annotations

import math
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

EIGH_BATCH_BYTES = 256 * 2**20
"""Most bytes of float64 statistics stacked into one batched ``eigh`` (bounds the extra memory)."""


RULE_KINDS = ("energy", "k", "abs", "tail", "mean")
DEFAULT_RULE = "energy=0.9"
"""The default retain-subspace rule (DESIGN §1.4; measured in benchmarks/sweep_defaults.py)."""


@dataclass(frozen=True)
class SubspaceRule:
    """Which eigen-directions of a module's retain statistic span its retain subspace.

    ``kind`` and ``value``:

    * ``energy``: the smallest k whose top eigenvalues hold the fraction ``value`` (τ in [0, 1]) of
      the trace; relative, so it transfers across models;
    * ``k``: a fixed number of directions (capped at the width);
    * ``abs``: the eigenvalues above ``value`` (AlphaEdit's absolute rule; scale-dependent);
    * ``tail``: the eigenvalues above ``value`` × the largest (the null space is the spectrum's tail);
    * ``mean``: the eigenvalues above ``value`` × the mean eigenvalue.

    ``min_null``: every module keeps at least this many null directions (k ≤ width − min_null), so
    no adapter is left without room; :attr:`Subspace.capped` says where the floor decided k.
    Written as a string: ``"energy=0.9"``, ``"tail=1e-3,min_null=16"``; a bare number is τ.
    """

    kind: str = "energy"
    value: float = 0.9
    min_null: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"subspace rule kind must be one of {', '.join(RULE_KINDS)}, got {self.kind!r}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"subspace rule {self.kind}= needs a finite number, got {v!r}")
        if self.kind == "energy" and not 0.0 <= v <= 1.0:
            raise ValueError(f"subspace rule energy= is a fraction of the trace in [0, 1], got {v!r}")
        if self.kind == "k" and (v < 0 or v != int(v)):
            raise ValueError(f"subspace rule k= is a whole number of directions >= 0, got {v!r}")
        if self.kind in ("abs", "tail", "mean") and v < 0:
            raise ValueError(f"subspace rule {self.kind}= must be >= 0, got {v!r}")
        if isinstance(self.min_null, bool) or not isinstance(self.min_null, int) or self.min_null < 0:
            raise ValueError(f"subspace rule min_null= is a whole number >= 0, got {self.min_null!r}")

    @classmethod
    def parse(cls, spec: SubspaceRule | str | float) -> SubspaceRule:
        """A rule from its string (``"energy=0.9,min_null=8"``), a bare τ, or a rule (returned as is)."""
        if isinstance(spec, SubspaceRule):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls("energy", float(spec))
        if not isinstance(spec, str):
            raise ValueError(f"a subspace rule is a string such as 'energy=0.9' or 'tail=1e-3', got {spec!r}")
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in RULE_KINDS + ("min_null",) or key in fields:
                raise ValueError(f"subspace rule {spec!r}: expected one of {'=, '.join(RULE_KINDS)}= with a "
                                 f"number, and optionally min_null=N (e.g. 'energy=0.9,min_null=8')")
            fields[key] = value.strip()
        kinds = [k for k in fields if k != "min_null"]
        if len(kinds) != 1:
            raise ValueError(f"subspace rule {spec!r}: choose exactly one of {', '.join(RULE_KINDS)}")
        try:
            value = float(fields[kinds[0]])
            min_null = int(fields.get("min_null", "0"))
        except ValueError:
            raise ValueError(f"subspace rule {spec!r}: values must be numbers") from None
        return cls(kinds[0], value, min_null)

    def __str__(self) -> str:
        value = int(self.value) if self.kind == "k" else self.value
        return f"{self.kind}={value:g}" + (f",min_null={self.min_null}" if self.min_null else "")

    def sizes(self, lam: torch.Tensor) -> tuple[list[int], list[bool]]:
        """k for every row of ``lam`` (``B × d``, descending), and whether ``min_null`` capped it."""
        b, d = lam.shape
        lam = lam.clamp_min(0)
        if self.kind == "k":
            ks = torch.full((b,), min(int(self.value), d), dtype=torch.long)
        elif d == 0:
            ks = torch.zeros(b, dtype=torch.long)
        elif self.kind == "energy":
            total = lam.sum(-1, keepdim=True)
            cumulative = torch.cumsum(lam, -1) / total.clamp_min(torch.finfo(lam.dtype).tiny)
            # The smallest k with cumulative[k-1] >= τ; a little slack for rounding at τ = 1.
            ks = ((cumulative < self.value - 1e-12).sum(-1) + 1).clamp_max(d)
            ks = torch.where((total.squeeze(-1) > 0) & (self.value > 0), ks, torch.zeros_like(ks))
        else:
            scale = {"abs": torch.ones_like(lam[:, :1]), "tail": lam[:, :1], "mean": lam.mean(-1, keepdim=True)}
            ks = (lam > self.value * scale[self.kind]).sum(-1)
        cap = max(d - self.min_null, 0)
        capped = (ks > cap).tolist()
        return ks.clamp_max(cap).tolist(), capped


@dataclass
class Subspace:
    """A module's retain basis ``U`` (``in × k``, orthonormal, fp32), its size, the energy it holds,
    and whether the rule's ``min_null`` floor (rather than its threshold) decided ``k``."""

    basis: torch.Tensor
    k: int
    energy: float
    eigenvalues: torch.Tensor  # all eigenvalues, descending, float64
    capped: bool = False


def select_k(eigenvalues: torch.Tensor, rule: SubspaceRule | str | float = DEFAULT_RULE) -> int:
    """The k that ``rule`` picks from eigenvalues sorted in descending order."""
    ks, _ = SubspaceRule.parse(rule).sizes(eigenvalues.reshape(1, -1))
    return int(ks[0])


def _subspace(lam: torch.Tensor, vec: torch.Tensor, rule: SubspaceRule) -> Subspace:
    """``lam`` descending, ``vec`` columns in the same order."""
    (k,), (capped,) = rule.sizes(lam.reshape(1, -1))
    positive = lam.clamp_min(0)
    total = float(positive.sum())
    held = float(positive[:k].sum()) / total if total > 0 else 0.0
    return Subspace(vec[:, :k].to(torch.float32).contiguous(), k, held, lam.clone(), capped)


def subspace_update_reference(
    moments: Sequence[torch.Tensor], rule: SubspaceRule | str | float = DEFAULT_RULE
) -> list[Subspace]:
    """Torch reference of :func:`subspace_update`: one module at a time."""
    rule = SubspaceRule.parse(rule)
    out = []
    for c in moments:
        full = symmetrize(c.to(torch.float64))
        lam, vec = torch.linalg.eigh(full)
        lam, vec = lam.flip(0), vec.flip(1)
        out.append(_subspace(lam, vec, rule))
    return out


def fold(subspace: Subspace, *, weight: float = 1.0) -> torch.Tensor:
    """The statistic a subspace stands for, ``weight · U diag(λ_1..k) Uᵀ`` (float64, full matrix)."""
    u = subspace.basis.to(torch.float64)
    lam = subspace.eigenvalues[: subspace.k].to(u.device, torch.float64).clamp_min(0)
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
    rule: SubspaceRule | str | float = DEFAULT_RULE,
    *,
    previous: Sequence[Subspace | None] | None = None,
    previous_weight: float | Sequence[float] = 1.0,
) -> list[Subspace]:
    """Retain bases of all modules in one call; ``moments[i]`` needs a valid upper triangle.

    ``rule``: a :class:`SubspaceRule` or its string (default ``"energy=0.9"``). With ``previous`` (one :class:`Subspace`
    or ``None`` per module), ``moments`` hold only the statistics of *new* data and each old
    subspace is folded back in first, scaled by ``previous_weight`` (e.g. ``N_old / N_new`` when the
    statistics are means rather than sums); see the module docstring for when this is exact.
    Returns one :class:`Subspace` per module, in order.
    """
    rule = SubspaceRule.parse(rule)
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
        return subspace_update_reference(moments, rule)

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
            out[i] = _subspace(lam.flip(0), vec.flip(1), rule)

    for i in order:
        size = 8 * moments[i].shape[0] ** 2
        if batch and (batch_bytes + size > EIGH_BATCH_BYTES or moments[batch[0]].device != moments[i].device):
            run(batch)
            batch, batch_bytes = [], 0
        batch.append(i)
        batch_bytes += size
    if batch:
        run(batch)
    return out  # type: ignore[return-value]
