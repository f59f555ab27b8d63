"""``NSRULinear``: a frozen linear layer plus a low-rank adapter confined to a null space.

The update is ``ΔW = s·B·Ã`` with ``Ã = A − (A U) Uᵀ``, where ``U`` spans the module's retain
subspace, so for any input ``h`` in span(U) the layer's output is exactly the base output.

Each forward forms ``Ã`` (two skinny GEMMs over the basis) and each backward projects ``∂L/∂A`` (two
more), which is right for a layer on its own. An optimizer step of the trainer runs several forwards
of the same model with the same A and U (NSRU: safe target, forget, retain), so within
:func:`null_space_step` every layer forms ``Ã`` once, and the trainer projects all ``lora_A``
gradients once, in one ``project_rows_`` call (:func:`project_gradients_`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nsru import ops
from nsru.ops.lowrank_linear import fixed_null_space_factor

try:  # GPT-2 style models store their projections transposed in a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layer works without it
    Conv1D = ()

ORTHONORMAL_TOL = 1e-4


def is_linear(module: nn.Module) -> bool:
    """Whether NSRULinear can wrap ``module`` (``nn.Linear`` or transformers' ``Conv1D``)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


class NSRULinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` (or ``Conv1D``) with a null-space constrained adapter.

    The base layer is kept as ``base_layer`` and frozen. ``lora_A`` (r × in) and ``lora_B``
    (out × r) are fp32 whatever the base dtype; ``retain_basis`` (in × k, k may be 0 or in) is a
    buffer. ``B`` starts at zero so the layer starts equal to its base.
    """

    _step: _StepFactor | None = None  # set within null_space_step (a class default: layers pickled before it work)

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16.0, name: str = "") -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"NSRULinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__} at {name or '?'}")
        self._transposed = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        out_features, in_features = (weight.shape[1], weight.shape[0]) if self._transposed else weight.shape
        where = f"module {name!r}" if name else "the module"
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"adapter rank r must be a positive integer, got {r!r} for {where}")
        if r > min(in_features, out_features):
            raise ValueError(
                f"adapter rank r={r} is larger than {where} allows: it maps {in_features} -> {out_features} features, "
                f"so the rank can be at most {min(in_features, out_features)}"
            )
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.name = name
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=torch.float32, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("retain_basis", torch.zeros(in_features, 0, dtype=torch.float32, device=weight.device))
        self.merged = False
        self.disabled = False

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 16.0, name: str = "") -> NSRULinear:
        """Wrap ``linear``; the result's outputs equal ``linear``'s until ``lora_B`` is trained."""
        return cls(linear, r=r, alpha=alpha, name=name)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w.T if self._transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def k(self) -> int:
        """Size of the retain basis (its columns)."""
        return self.retain_basis.shape[1]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, k={self.k}, merged={self.merged}"
        )

    @torch.no_grad()
    def set_retain_basis(self, basis: torch.Tensor) -> None:
        """Use ``basis`` (in × k, orthonormal columns) as the retain subspace and project ``lora_A`` off it."""
        where = f"module {self.name!r}" if self.name else "NSRULinear"
        if self.merged:
            raise RuntimeError(f"{where} is merged: unmerge() before changing its retain basis")
        if basis.dim() != 2 or basis.shape[0] != self.in_features:
            raise ValueError(
                f"retain basis for {where} has shape {tuple(basis.shape)}; expected ({self.in_features}, k) "
                f"with k <= {self.in_features}"
            )
        if basis.shape[1] > self.in_features:
            raise ValueError(f"retain basis for {where} has {basis.shape[1]} columns, more than its width {self.in_features}")
        if not basis.is_floating_point() or not torch.isfinite(basis).all():
            raise ValueError(f"retain basis for {where} must be a finite floating-point tensor")
        u = basis.detach().to(device=self.lora_A.device, dtype=torch.float32).contiguous()
        if u.shape[1]:
            gram = u.T @ u
            err = float((gram - torch.eye(u.shape[1], device=u.device)).abs().max())
            if err > ORTHONORMAL_TOL:
                raise ValueError(
                    f"retain basis for {where} is not orthonormal: max |UᵀU − I| = {err:.2e} (tolerance "
                    f"{ORTHONORMAL_TOL:g}); orthonormalise it first, e.g. with torch.linalg.qr"
                )
        self.retain_basis = u
        self.lora_A.copy_(ops.null_space_factor(self.lora_A, u))

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s·B·Ã`` as ``(out, in)`` fp32."""
        a_tilde = ops.null_space_factor(self.lora_A, self.retain_basis)
        return self.scaling * (self.lora_B @ a_tilde)

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        delta = sign * self.delta_weight()
        w = self.base_layer.weight
        w.add_((delta.T if self._transposed else delta).to(w.dtype))

    def merge(self) -> None:
        """Write ``ΔW`` into the base weight (no inference overhead); a second call does nothing."""
        if not self.merged:
            self._add_to_base(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Take ``ΔW`` back out of the base weight (exact up to rounding)."""
        if self.merged:
            self._add_to_base(-1.0)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and not self.disabled:
            return self.base_layer(x)
        if self.disabled and not self.merged:
            return self.base_layer(x)
        # Adapter on, or disabled while merged: the latter subtracts the merged update again.
        scaling = -self.scaling if self.disabled else self.scaling
        basis, a_tilde = self.retain_basis, None
        if self._step is not None and not torch.compiler.is_compiling():  # a compiled graph forms Ã itself
            a_tilde = self._step.factor(self.lora_A, basis)
            if not self._step.project:
                basis = self._step.no_basis  # the trainer projects ∂L/∂A once for the whole step
        return ops.lowrank_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, basis, scaling, a_tilde)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "retain_basis"
        if key in state_dict and state_dict[key].shape != self.retain_basis.shape:
            incoming = state_dict[key]
            if incoming.dim() != 2 or incoming.shape[0] != self.in_features:
                raise ValueError(
                    f"{key} has shape {tuple(incoming.shape)}; expected ({self.in_features}, k) for {self.name or 'this layer'}"
                )
            self.retain_basis = torch.empty_like(incoming, dtype=torch.float32, device=self.retain_basis.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _StepFactor:
    """``Ã`` of one layer, kept while its ``lora_A`` and ``retain_basis`` stay what they were: the
    same storage at the same version (every in-place write through autograd's view of a tensor,
    an optimizer's included, bumps its version; a write through ``.data`` does not, so none may
    happen within :func:`null_space_step`)."""

    __slots__ = ("project", "key", "a_tilde", "no_basis")

    def __init__(self, project: bool) -> None:
        self.project = project
        self.key: tuple | None = None
        self.a_tilde: torch.Tensor | None = None
        self.no_basis: torch.Tensor | None = None

    def factor(self, lora_A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        key = (lora_A.data_ptr(), lora_A._version, lora_A.dtype, basis.data_ptr(), basis._version, tuple(basis.shape))
        if key != self.key:
            self.a_tilde = fixed_null_space_factor(lora_A, basis)
            self.no_basis = basis.new_empty((basis.shape[0], 0))
            self.key = key
        return self.a_tilde


@contextmanager
def null_space_step(layers: Iterable[NSRULinear], project_grads: bool = True) -> Iterator[None]:
    """The forwards and backwards of one optimizer step: within the block every layer of ``layers``
    forms ``Ã`` at its first forward and reuses it while its ``lora_A`` and ``retain_basis`` do not
    change (so the trainer's several forwards of a step form it once); on leaving, it is dropped.

    ``project_grads=False``: the backwards leave ``∂L/∂Ã`` on ``lora_A.grad`` unprojected, and the
    caller applies :func:`project_gradients_` before using the gradients — one grouped
    ``project_rows_`` for every module and every forward of the step instead of one per module and
    forward. The result is the same (the projection is linear). Code under ``torch.compile`` ignores
    the block: it forms ``Ã`` and projects inside the compiled graph, as outside it.
    """
    layers = list(layers)
    previous = [layer._step for layer in layers]
    for layer in layers:
        layer._step = _StepFactor(project_grads)
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer._step = was


@torch.no_grad()
def project_gradients_(layers: Iterable[NSRULinear]) -> None:
    """``∂L/∂A ← ∂L/∂A · P⊥`` in place for every layer with a retain basis and a gradient, in one
    ``project_rows_`` call (what :func:`null_space_step` with ``project_grads=False`` leaves to do)."""
    chosen = [layer for layer in layers if layer.k and layer.lora_A.grad is not None]
    if chosen:
        ops.project_rows_([layer.lora_A.grad for layer in chosen], [layer.retain_basis for layer in chosen])


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live; the CPU for a model without parameters."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def nsru_modules(model: nn.Module) -> dict[str, NSRULinear]:
    """Every ``NSRULinear`` in ``model`` by its full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NSRULinear)}


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every ``NSRULinear`` acts as its base layer: the reference policy, no weight copy."""
    layers = list(nsru_modules(model).values())
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
