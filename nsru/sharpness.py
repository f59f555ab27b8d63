"""Forgetting that survives a relearning attack: the suppression term at perturbed base weights.

A relearning attack fine-tunes the weights of the adapted blocks on a few forget facts and brings
the others back: unlearning left the knowledge one short step away. Sharpness-aware unlearning
(Fan et al., ICML 2025) asks the forget loss to hold in a neighbourhood of the weights instead of
at one point. Here the neighbourhood is in the space that attack moves, the frozen base weights
``W`` of the adapted modules, and of its shape: the attack is AdamW, whose first step moves every
weight by the learning rate against the sign of its gradient. So each step first takes the
gradient of the suppression term with respect to every adapted ``W`` (``∂L/∂W = Σ_t ∂L/∂y_t ·
x_tᵀ``, gathered by hooks, since the fused layer computes no weight gradient), moves every weight
by ``ρ`` along its sign (the ℓ∞ ball's worst point to first order: the attack's first step at
learning rate ``ρ``), and computes the suppression term's adapter gradient there; the other terms
stay at the true weights. On SmolLM2 (layers 20-29) ``ρ = 1e-4`` lowers the forget answers'
per-token NLL from 0.83 to 0.48, where five steps of the audit's strong attack (AdamW at 2e-4)
reach 0.07 (``benchmarks/sam_calibration.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nsru.distributed import all_reduce_sum_


class WeightAscent:
    """A loss's gradient with respect to the base weights of ``layers`` (NSRU layers), and the
    weights moved along its sign.

    ``with ascent.gathering():`` hooks the layers while the loss runs forward and backward;
    ``with ascent.moved(rho):`` then adds ``rho · sign(G)`` to each base weight and puts back the
    exact weights on leaving."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        self.layers = list(layers)
        self.grads: list[torch.Tensor | None] = [None] * len(self.layers)

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """Accumulate ``∂L/∂W`` of every backward run inside the block (over the processes on leaving)."""
        self.grads = [None] * len(self.layers)
        handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        grads = [g for g in self.grads if g is not None]
        if grads:
            all_reduce_sum_(grads)

    def _hook(self, i: int):
        def forward_hook(module, args, output):
            if not output.requires_grad:
                return
            x = args[0].detach()

            def on_grad(dy: torch.Tensor) -> None:
                g = dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                self.grads[i] = g if self.grads[i] is None else self.grads[i].add_(g)

            output.register_hook(on_grad)

        return forward_hook

    def norm(self) -> float:
        """``‖G‖``, the Frobenius norm over every layer's gathered gradient."""
        squares = [g.pow(2).sum() for g in self.grads if g is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    @contextmanager
    def moved(self, rho: float) -> Iterator[float]:
        """The base weights at ``W + rho · sign(G)`` inside the block (unchanged where ``G`` is 0);
        yields ``‖G‖``."""
        norm = self.norm()
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            if norm > 0 and rho > 0:
                with torch.no_grad():
                    for layer, g in zip(self.layers, self.grads):
                        if g is None:
                            continue
                        w = layer.weight  # (out, in), a view of the base weight
                        saved.append((w, w.detach().clone()))
                        w.add_((g.sign() * rho).to(w.dtype))
            yield norm
        finally:
            with torch.no_grad():
                for w, original in saved:
                    w.copy_(original)
