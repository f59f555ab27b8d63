"""Unlearning methods, each one its loss, chosen by name from a registry.

A method's loss takes a :class:`LossContext` (the model, the config and the reference policy) and
one step's batch (``{"forget": ..., "safe": ..., "retain": ...}``, each a padded encoding) and
returns its weighted terms: ``{"loss": total, "safe": ..., "suppress": ..., "retain": ...}``
(terms that are off are left out; the trainer's history records them under the same names).
``"suppress"`` is the method's forget-side term, weighted by ``suppress_weight`` — ``L_sup`` for
NSRU. Names: ``nsru``, ``ga``, ``graddiff``, ``npo``, ``simnpo``, ``idkdpo``, ``rmu``; NSRU's
ablations as ``nsru-no-safe``, ``nsru-no-suppress``, ``nsru-no-retain``, ``nsru-no-project``
(or the switches of the same names in the config). New methods: :func:`register_method`.

The built-in losses compute their terms through :meth:`LossContext.weighted`, one after the other,
so that inside the trainer each term's backward runs before the next term's forward: a step holds
the activations of one forward at a time, not of all three.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from nsru import objectives as obj
from nsru.data import sequence_keys
from nsru.layer import adapter_disabled, model_device

ABLATIONS = ("safe", "suppress", "retain", "project")
WEIGHTS = ("safe_weight", "suppress_weight", "retain_weight")


class LossContext:
    """What a loss needs beside the batch.

    ``reference`` gives the reference policy π_ref: the same model with its adapters disabled,
    or, for full fine-tuning, a frozen copy made by the caller. ``state`` holds per-run values a
    method computes once (e.g. RMU's control vector).

    ``prefix``: how to run the model when the bottom layers below its adapters are frozen, as
    ``prefix(input_ids=..., attention_mask=..., **kwargs)`` (the trainer's
    :class:`nsru.frozen_prefix.FrozenPrefix`, which caches those layers' outputs per sequence);
    ``None`` runs the whole model. It serves the policy and, with adapters disabled, the reference.
    Whether to cache is the trainer's policy, so the trainer sets it; the losses only call
    :meth:`forward` and :meth:`ref_forward`.

    ``counts``: set by the trainer for each step, ``{part: {"tokens"|"sequences"|"positions": n}}``
    over the whole global batch (all micro-batches of all processes). A loss divides its sum by
    ``denom(part, kind)`` so that its terms add up across micro-batches and processes to the loss
    of the global batch in one process. Outside the trainer ``denom`` is ``None`` and the losses
    average over the batch they are given.

    ``term_backward``: set by the trainer for each step, ``term_backward(weighted_term, used_denom)``
    runs the backward of one term as soon as :meth:`weighted` has computed it.

    ``term_filter``: set by the trainer for a pass that needs some terms alone (the suppression
    term at perturbed weights, :mod:`nsru.sharpness`): :meth:`weighted` computes the terms whose
    name it accepts and skips the others; ``None`` computes all.
    """

    def __init__(self, model: nn.Module, config, ref_model: nn.Module | None = None,
                 prefix: Callable | None = None) -> None:
        self.model = model
        self.config = config
        self.ref_model = ref_model
        self.weights = get_method(config.method).weights(config)
        self.prefix = prefix
        self._ref_logp: dict[bytes, torch.Tensor] = {}
        self.state: dict = {}
        self.counts: dict[str, dict[str, float]] | None = None
        self.counts_used = False  # whether a loss asked for denom() since the trainer last reset it
        self.term_backward: Callable[[torch.Tensor, bool], None] | None = None
        self.term_filter: Callable[[str], bool] | None = None

    def denom(self, part: str, kind: str = "tokens") -> float | None:
        """The global count of ``kind`` in ``part`` of this step's batch (``None`` outside the trainer)."""
        if self.counts is None:
            return None
        self.counts_used = True
        return self.counts[part][kind]

    def weighted(self, terms: Mapping[str, Callable[[], torch.Tensor]], weights: Mapping[str, float]) -> dict:
        """A method's result from its terms: ``{name: value, ..., "loss": Σ weights[name]·value}``,
        the values detached, computed in order by calling each of ``terms`` (a function of no
        arguments that runs the forwards its term needs).

        Outside the trainer ``"loss"`` is the differentiable sum. Inside it (``term_backward`` set)
        each weighted term's backward runs as soon as the term is computed, which frees its graph
        before the next term's forward, and ``"loss"`` comes back detached: its gradient is already
        in ``.grad``. A method wrapping one that returns this may add a differentiable term to
        ``"loss"`` (the trainer runs its backward too) but not rescale it.
        """
        if not terms:
            raise ValueError("every loss term is switched off; nothing to train")
        values: dict[str, torch.Tensor] = {}
        total = None
        used_before = self.counts_used
        for name, compute in terms.items():
            if self.term_filter is not None and not self.term_filter(name):
                continue
            self.counts_used = False
            value = compute()
            part = weights[name] * value
            if self.term_backward is not None:
                self.term_backward(part, self.counts_used)
                part = part.detach()
            used_before = used_before or self.counts_used
            values[name] = value.detach()
            total = part if total is None else total + part
        self.counts_used = used_before
        if total is None:  # every term skipped by ``term_filter``
            total = torch.zeros((), device=model_device(self.model))
        return {**values, "loss": total}

    def forward(self, batch: Mapping[str, torch.Tensor], **kwargs):
        run = self.prefix or self._full
        return run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    def _full(self, **inputs):
        return self.model(**inputs)

    @contextmanager
    def _reference(self):
        if self.ref_model is not None:
            yield self.ref_model
            return
        with adapter_disabled(self.model):
            yield self.model

    @torch.no_grad()
    def ref_logprob(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log π_ref(y|q)`` per sequence. π_ref never changes, so each sequence's value is computed
        once and kept (the reference forward is one of NSRU's four a step; it is run only for
        sequences not seen before)."""
        lengths = batch["attention_mask"].sum(-1).tolist()
        keys = sequence_keys(lengths, batch["input_ids"], batch["labels"])
        missing = [i for i, k in enumerate(keys) if k not in self._ref_logp]
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
            values, _ = obj.sequence_logprob(self.ref_forward(sub).logits, sub["labels"])
            for i, v in zip(missing, values):
                self._ref_logp[keys[i]] = v
        return torch.stack([self._ref_logp[k] for k in keys])

    @torch.no_grad()
    def ref_forward(self, batch: Mapping[str, torch.Tensor], **kwargs):
        with self._reference() as ref:
            run = self.prefix if self.prefix is not None and ref is self.model else ref
            return run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


LossFn = Callable[[LossContext, dict], dict]


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    project: bool = False  # default of config.project: whether updates are confined to the null space
    needs_safe: bool = False  # builds safe targets for the forget queries
    needs_retain: bool = True
    needs_reference: bool = False
    description: str = ""
    setup: Callable | None = None  # setup(ctx, batches) once before training (e.g. RMU's control)
    default_targets: Callable | None = None  # default_targets(model, config) -> target_modules
    overrides: dict = field(default_factory=dict)  # switches forced by an ablation name
    defaults: dict = field(default_factory=dict)  # loss weights used where the user left None
    safe_when: Callable | None = None  # safe_when(config): whether safe targets are needed (None: needs_safe)

    def weights(self, config) -> dict[str, float]:
        """The loss weights: the config's where set, this method's defaults elsewhere (else 1)."""
        return {n: getattr(config, n) if getattr(config, n) is not None else self.defaults.get(n, 1.0)
                for n in WEIGHTS}

    def wants_safe_targets(self, config) -> bool:
        return self.needs_safe and (self.safe_when is None or bool(self.safe_when(config)))


METHODS: dict[str, Method] = {}


def register_method(name: str, **kwargs) -> Callable[[LossFn], LossFn]:
    """Decorator: ``@register_method("mine", project=False)`` on ``def loss(ctx, batch) -> dict``."""

    def wrap(fn: LossFn) -> LossFn:
        METHODS[name] = Method(name=name, loss=fn, **kwargs)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The registered method, with ``"<name>-no-<switch>"`` ablations resolved into overrides."""
    if name in METHODS:
        return METHODS[name]
    match = re.fullmatch(r"(.+?)((?:-no-(?:" + "|".join(ABLATIONS) + r"))+)", name)
    if match and match.group(1) in METHODS:
        base = METHODS[match.group(1)]
        off = {s: False for s in re.findall(r"-no-(\w+)", match.group(2))}
        return Method(**{**base.__dict__, "name": name, "overrides": {**base.overrides, **off}})
    known = ", ".join(sorted(METHODS)) + "; ablations as nsru-no-safe, nsru-no-suppress, nsru-no-retain, nsru-no-project"
    raise ValueError(f"unknown unlearning method {name!r}; known: {known}")


# --------------------------------------------------------------------------------------------
# shared pieces


def _seq_logp(outputs, batch):
    return obj.sequence_logprob(outputs.logits, batch["labels"])


def _has_retain(ctx: LossContext, batch: dict) -> bool:
    return "retain" in batch and bool(ctx.config.retain)


def _retain_term(ctx: LossContext, batch: dict) -> torch.Tensor:
    cfg = ctx.config
    out = ctx.forward(batch["retain"])
    if cfg.retain_loss == "nll":
        return obj.nll_loss(out.logits, batch["retain"]["labels"], ctx.denom("retain"))
    if cfg.retain_loss == "kl":
        ref = ctx.ref_forward(batch["retain"])
        return obj.kl_loss(out.logits, ref.logits, batch["retain"]["labels"], ctx.denom("retain"))
    raise ValueError(f"retain_loss must be 'nll' or 'kl', got {cfg.retain_loss!r}")


# --------------------------------------------------------------------------------------------
# NSRU


# NSRU's loss weights from benchmarks/sweep_defaults.py (results/sweep_defaults.md, 3 seeds): NPO
# sums log-probabilities over the answer tokens, so at weight 1 it outweighs the per-token safe and
# retain terms (held-out facts 0.28 vs 0.52 at 0.3); a retain weight of 1 instead of 3 costs as much
# (retain 0.69 vs 0.81, held-out 0.26).
NSRU_WEIGHTS = {"safe_weight": 1.0, "suppress_weight": 0.3, "retain_weight": 3.0}


@register_method("nsru", project=True, needs_safe=True, needs_reference=True, defaults=NSRU_WEIGHTS,
                 safe_when=lambda cfg: cfg.safe or cfg.suppress_loss == "dpo", description="safe-target CE + suppression (NPO) + retention, null-space projected LoRA")
def nsru_loss(ctx: LossContext, batch: dict) -> dict:
    cfg = ctx.config
    if cfg.suppress_loss not in ("npo", "unlikelihood", "dpo"):
        raise ValueError(f"suppress_loss must be 'npo', 'unlikelihood' or 'dpo', got {cfg.suppress_loss!r}")
    if cfg.suppress and cfg.suppress_loss == "dpo" and "safe" not in batch:
        raise ValueError("suppress_loss='dpo' needs question-answer forget data (chosen = safe target)")
    terms = {}
    if cfg.safe and "safe" in batch:
        safe = batch["safe"]
        terms["safe"] = lambda: obj.nll_loss(ctx.forward(safe).logits, safe["labels"], ctx.denom("safe"))
    if cfg.suppress:
        terms["suppress"] = lambda: _nsru_suppress(ctx, batch)
    if _has_retain(ctx, batch):
        terms["retain"] = lambda: _retain_term(ctx, batch)
    if not terms:
        raise ValueError("every NSRU loss term is switched off (safe, suppress and retain); nothing to train")
    w = ctx.weights
    weights = {"safe": w["safe_weight"], "suppress": w["suppress_weight"], "retain": w["retain_weight"]}
    return ctx.weighted(terms, weights)


def _nsru_suppress(ctx: LossContext, batch: dict) -> torch.Tensor:
    cfg = ctx.config
    forget = batch["forget"]
    if cfg.suppress_loss == "npo":
        logp, _ = _seq_logp(ctx.forward(forget), forget)
        return obj.npo_loss(logp, ctx.ref_logprob(forget), cfg.beta, denom=ctx.denom("forget", "sequences"))
    if cfg.suppress_loss == "unlikelihood":
        return obj.unlikelihood_loss(ctx.forward(forget).logits, forget["labels"], denom=ctx.denom("forget"))
    chosen, rejected = batch["safe"], forget  # dpo
    c, _ = _seq_logp(ctx.forward(chosen), chosen)
    r, _ = _seq_logp(ctx.forward(rejected), rejected)
    c_ref, r_ref = ctx.ref_logprob(chosen), ctx.ref_logprob(rejected)
    return obj.dpo_loss(c, r, c_ref, r_ref, cfg.beta, denom=ctx.denom("forget", "sequences"))


# --------------------------------------------------------------------------------------------
# baselines (open-unlearning's definitions: loss = γ·forget + α·retain)


def _with_retain(ctx, batch, suppress_term: Callable[[], torch.Tensor], suppress_weight=None) -> dict:
    terms = {"suppress": suppress_term}
    if _has_retain(ctx, batch):
        terms["retain"] = lambda: _retain_term(ctx, batch)
    w = ctx.weights["suppress_weight"] if suppress_weight is None else suppress_weight
    return ctx.weighted(terms, {"suppress": w, "retain": ctx.weights["retain_weight"]})


@register_method("ga", needs_retain=False, description="gradient ascent on the forget answers")
def ga_loss(ctx: LossContext, batch: dict) -> dict:
    forget = batch["forget"]

    def suppress():
        return obj.gradient_ascent_loss(ctx.forward(forget).logits, forget["labels"], ctx.denom("forget"))

    return ctx.weighted({"suppress": suppress}, {"suppress": ctx.weights["suppress_weight"]})


@register_method("graddiff", description="gradient ascent on forget + NLL on retain")
def graddiff_loss(ctx: LossContext, batch: dict) -> dict:
    forget = batch["forget"]
    return _with_retain(ctx, batch, lambda: obj.gradient_ascent_loss(ctx.forward(forget).logits, forget["labels"],
                                                                     ctx.denom("forget")))


@register_method("npo", needs_reference=True, description="NPO (β = 0.1) on forget + NLL on retain")
def npo_method_loss(ctx: LossContext, batch: dict) -> dict:
    forget = batch["forget"]

    def suppress():
        logp, _ = _seq_logp(ctx.forward(forget), forget)
        return obj.npo_loss(logp, ctx.ref_logprob(forget), ctx.config.beta, ctx.denom("forget", "sequences"))

    return _with_retain(ctx, batch, suppress)


@register_method("simnpo", description="SimNPO (β 4.5, δ 0, γ 0.125) on forget + NLL on retain")
def simnpo_method_loss(ctx: LossContext, batch: dict) -> dict:
    cfg = ctx.config
    forget = batch["forget"]

    def suppress():
        logp, n = _seq_logp(ctx.forward(forget), forget)
        return obj.simnpo_loss(logp, n, cfg.simnpo_beta, cfg.simnpo_delta, ctx.denom("forget", "sequences"))

    return _with_retain(ctx, batch, suppress, suppress_weight=cfg.simnpo_gamma * ctx.weights["suppress_weight"])


@register_method("idkdpo", needs_safe=True, needs_reference=True,
                 description="DPO (β 0.1) preferring an 'I don't know' answer over the original + NLL on retain")
def idkdpo_loss(ctx: LossContext, batch: dict) -> dict:
    if "safe" not in batch:
        raise ValueError("idkdpo needs question-answer forget data (the 'I don't know' answer is the chosen one)")
    chosen, rejected = batch["safe"], batch["forget"]

    def suppress():
        c, _ = _seq_logp(ctx.forward(chosen), chosen)
        r, _ = _seq_logp(ctx.forward(rejected), rejected)
        c_ref, r_ref = ctx.ref_logprob(chosen), ctx.ref_logprob(rejected)
        return obj.dpo_loss(c, r, c_ref, r_ref, ctx.config.beta, ctx.denom("forget", "sequences"))

    return _with_retain(ctx, batch, suppress)


# RMU (Li et al., 2024, "The WMDP Benchmark"): push the hidden state at one layer on forget tokens
# towards a fixed random direction scaled by a steering coefficient, keep it at the reference on
# retain tokens; only the MLPs of that layer and the two below it are updated.


def num_layers(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers; set rmu_layer and target_modules")
    return int(n)


def rmu_layer(model: nn.Module, cfg) -> int:
    n = num_layers(model)
    layer = cfg.rmu_layer if cfg.rmu_layer is not None else max(0, round(n * 7 / 32))  # WMDP: 7 of 32
    if not 0 <= layer < n:
        raise ValueError(f"rmu_layer={layer} is out of range for a model with {n} layers")
    return layer


def rmu_targets(model: nn.Module, cfg) -> str:
    layer = rmu_layer(model, cfg)
    layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    return rf".*layers\.({layers})\.mlp\..*"


def _hidden(outputs, layer: int) -> torch.Tensor:
    return outputs.hidden_states[layer + 1]


def rmu_setup(ctx: LossContext, forget_batches) -> None:
    cfg = ctx.config
    layer = rmu_layer(ctx.model, cfg)
    hidden_size = ctx.model.config.hidden_size
    gen = torch.Generator().manual_seed(int(cfg.seed) + 7919)
    u = torch.rand(hidden_size, generator=gen)
    u = u / u.norm()
    coeff = cfg.rmu_steering
    if coeff is None:
        # Hidden-state norms differ by orders of magnitude between models, so by default the
        # steering coefficient is relative: rmu_steering_scale × the mean norm of the layer's
        # hidden states on the forget data before training.
        norms, count = 0.0, 0
        with torch.no_grad():
            for b in forget_batches:
                h = _hidden(ctx.ref_forward(b, output_hidden_states=True), layer).float()
                m = b["attention_mask"].bool()
                norms += float(h.norm(dim=-1)[m].sum())
                count += int(m.sum())
        coeff = cfg.rmu_steering_scale * norms / max(count, 1)
    ctx.state["rmu_layer"] = layer
    ctx.state["rmu_control"] = coeff * u
    ctx.state["rmu_coeff"] = float(coeff)


@register_method("rmu", needs_reference=True, setup=rmu_setup, default_targets=rmu_targets,
                 description="RMU: forget activations steered to a random direction, retain activations kept")
def rmu_loss(ctx: LossContext, batch: dict) -> dict:
    cfg = ctx.config
    layer = ctx.state["rmu_layer"]
    control = ctx.state["rmu_control"]
    forget = batch["forget"]

    def suppress():
        h = _hidden(ctx.forward(forget, output_hidden_states=True), layer)
        return obj.rmu_forget_loss(h, control.to(h.device), forget["attention_mask"], ctx.denom("forget", "positions"))

    def retain():
        part = batch["retain"]
        h_r = _hidden(ctx.forward(part, output_hidden_states=True), layer)
        h_ref = _hidden(ctx.ref_forward(part, output_hidden_states=True), layer)
        return obj.rmu_retain_loss(h_r, h_ref, part["attention_mask"], ctx.denom("retain", "positions"))

    terms = {"suppress": suppress}
    if cfg.retain and "retain" in batch:
        terms["retain"] = retain
    return ctx.weighted(terms, {"suppress": ctx.weights["suppress_weight"], "retain": ctx.weights["retain_weight"]})

