"""Initialisation of the adapter factors (DESIGN §1.4): ``B = 0`` and ``A`` either

- ``"random"`` (default): PyTorch's LoRA init (uniform in ±1/√in, as ``kaiming_uniform_(a=√5)``)
  drawn from a seeded generator, then projected off the retain subspace, or
- ``"forget"``: the top-``r`` eigenvectors of ``P⊥ C_forget P⊥``, the input directions that the
  forget data uses and the retain data does not, scaled to the norm of a random row so that only
  the directions differ. Where the null space has fewer than ``r`` directions with forget energy,
  the remaining rows are random (projected).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nsru.layer import NSRULinear
from nsru.ops import null_space_factor


def _random_rows(r: int, width: int, gen: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(width)
    return (torch.rand(r, width, generator=gen, dtype=torch.float32) * 2 - 1) * bound


@torch.no_grad()
def init_adapters(
    layers: Mapping[str, NSRULinear],
    mode: str = "random",
    *,
    seed: int = 0,
    forget_moments=None,
) -> dict[str, dict]:
    """Set ``lora_B = 0`` and ``lora_A`` by ``mode`` for every layer (in name order, so the result
    depends only on ``seed``). ``forget_moments`` (``nsru.SecondMoments`` of the forget data) is
    needed for ``mode="forget"``. Returns per module ``{"forget_energy": ...}`` for ``"forget"``:
    the share of ``trace(P⊥ C_f P⊥)`` the chosen rows capture (empty dicts for ``"random"``).
    """
    if mode not in ("random", "forget"):
        raise ValueError(f"init must be 'random' or 'forget', got {mode!r}")
    if mode == "forget" and forget_moments is None:
        raise ValueError("init='forget' needs the forget data's second moments")
    gen = torch.Generator().manual_seed(int(seed))
    info: dict[str, dict] = {}
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(layers):
        layer = layers[name]
        rows = _random_rows(layer.r, layer.in_features, gen)
        basis = layer.retain_basis.detach().cpu().to(torch.float32)
        info[name] = {}
        if mode == "forget":
            if name not in forget_moments:
                raise ValueError(f"no forget statistics for module {name!r}")
            key = (forget_moments.groups[name], basis.shape[1])
            if key not in cache:
                c = forget_moments[name].detach().cpu().to(torch.float64)
                u = basis.to(torch.float64)
                p = torch.eye(c.shape[0], dtype=torch.float64) - u @ u.T
                m = p @ c @ p
                m = (m + m.T) / 2
                evals, evecs = torch.linalg.eigh(m)
                cache[key] = (evals.flip(0), evecs.flip(1))
            evals, evecs = cache[key]
            total = float(evals.clamp_min(0).sum())
            r = layer.r
            useful = int((evals[:r] > max(total, 1e-30) * 1e-6).sum()) if total > 0 else 0
            row_norm = 1.0 / math.sqrt(3.0)  # expected norm of a random row above
            if useful:
                rows[:useful] = (evecs[:, :useful].T * row_norm).to(torch.float32)
            info[name] = {"forget_energy": float(evals[:useful].sum()) / total if total > 0 else 0.0,
                          "aligned_rows": useful}
        a = null_space_factor(rows, basis) if basis.shape[1] else rows
        layer.lora_A.copy_(a.to(layer.lora_A.device))
        layer.lora_B.zero_()
    return info
