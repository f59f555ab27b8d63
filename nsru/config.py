"""``UnlearnConfig``: every option of :func:`nsru.unlearn` in one typed dataclass.

Fill it from keyword arguments, a dict, or a YAML file (the CLI does the latter); unknown keys are
an error that suggests the closest field. Defaults come from ``benchmarks/sweep_defaults.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsru.adapt import parse_layers
from nsru.ops.subspace_update import DEFAULT_RULE, SubspaceRule


class ConfigError(ValueError):
    """An option that does not exist or has an unusable value."""


@dataclass
class UnlearnConfig:
    # --- method and its switches (DESIGN §1; the ablations turn one part off)
    method: str = "nsru"
    safe: bool = True
    suppress: bool = True
    retain: bool = True
    project: bool | None = None  # None: the method decides (on for nsru, off for the baselines)
    suppress_loss: str = "npo"  # npo | unlikelihood | dpo
    retain_loss: str = "nll"  # nll | kl
    # Loss weights; None: the method's default (NSRU: from benchmarks/sweep_defaults.py;
    # baselines: open-unlearning's γ = α = 1).
    safe_weight: float | None = None
    suppress_weight: float | None = None  # γ: weight of every method's forget-side term
    retain_weight: float | None = None  # α
    beta: float = 0.1  # NPO, DPO, IdkDPO
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.0
    simnpo_gamma: float = 0.125
    rmu_layer: int | None = None  # None: round(7/32 of the depth), as WMDP's layer 7 of 32
    rmu_steering: float | None = None  # None: rmu_steering_scale × mean hidden norm on forget data
    rmu_steering_scale: float = 4.0

    # --- what is trained
    finetune: str = "adapter"  # adapter (NSRU/LoRA factors) | full (every parameter; baselines)
    target_modules: Any = "all-linear"  # PEFT semantics: list of names, regex, or "all-linear"
    r: int = 8  # adapter rank (PEFT's name)
    alpha: float = 16.0
    init: str = "random"  # random (then projected) | forget (top-r eigvecs of P⊥ C_forget P⊥)
    subspace: str = DEFAULT_RULE  # retain-subspace rule, e.g. "energy=0.9", "k=16", "tail=1e-3,min_null=8"
    # Data of the retain statistics (nsru.stats_sources): "retain", "self", a corpus (path or rows),
    # or a list of them; stats_tokens bounds their tokens, shared equally between the sources.
    stats: Any = "retain"
    stats_tokens: int | None = None
    self_samples: int = 256  # texts the model writes itself for the "self" source
    self_max_new_tokens: int = 64
    layers: Any = None  # adapt only these layers: "10-19", [10, 11, ...] or None (all)

    # --- safe targets
    templates: Any = None  # list of templates or a file; None: built-in refusals
    name_subject: bool = True

    # --- data
    max_length: int = 256
    batch_size: int = 8  # global batch: per-process batch = batch_size / world size
    grad_accum: int = 1

    # --- optimisation
    lr: float = 1e-2  # adapter factors; sweep: 3e-3 needs ~180 steps to forget as much
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: float = 0.1  # < 1: a fraction of steps
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    steps: int = 60  # sweep: 30 forgets too little; 120 forgets more, keeps retain, costs held-out
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)

    # --- run
    output_dir: str | None = None  # checkpoints go here when set
    save_every: int = 0  # checkpoint every N steps (0: only at the end, when output_dir is set)
    keep_checkpoints: int = 2
    resume: bool | str = False  # True: latest checkpoint in output_dir; or a checkpoint path
    eval_every: int = 0
    progress: bool = True
    device: str | None = None  # None: where the model is

    # ------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.suppress_loss in ("npo", "unlikelihood", "dpo"),
             f"suppress_loss must be npo, unlikelihood or dpo, got {self.suppress_loss!r}")
        need(self.retain_loss in ("nll", "kl"), f"retain_loss must be nll or kl, got {self.retain_loss!r}")
        need(self.finetune in ("adapter", "full"), f"finetune must be 'adapter' or 'full', got {self.finetune!r}")
        need(self.init in ("random", "forget"), f"init must be 'random' or 'forget', got {self.init!r}")
        need(self.schedule in ("linear", "cosine", "constant"),
             f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        need(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
             f"r (the adapter rank) must be a positive integer, got {self.r!r}")
        try:
            self.subspace = str(SubspaceRule.parse(self.subspace))
        except ValueError as e:
            raise ConfigError(f"subspace: {e}") from None
        try:
            parse_layers(self.layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        sources = self.stats if isinstance(self.stats, (list, tuple)) else [self.stats]
        need(len(sources) > 0, "stats must name at least one source: 'retain', 'self', a corpus, or a list")
        for source in sources:
            if isinstance(source, (str, os.PathLike)) and str(source) not in ("retain", "self"):
                need(Path(source).is_file(), f"stats source {str(source)!r} is neither 'retain', 'self' nor an "
                                             "existing JSON/JSONL file")
        need(self.stats_tokens is None or self.stats_tokens >= 1, f"stats_tokens must be >= 1, got {self.stats_tokens!r}")
        need(self.self_samples >= 1 and self.self_max_new_tokens >= 1, "self_samples and self_max_new_tokens must be >= 1")
        need(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1")
        need(self.steps >= 1, f"steps must be at least 1, got {self.steps!r}")
        need(self.lr > 0, f"lr must be positive, got {self.lr!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        for name in ("safe_weight", "suppress_weight", "retain_weight"):
            value = getattr(self, name)
            need(value is None or value >= 0, f"{name} must be >= 0, got {value!r}")
        need(self.beta > 0 and self.simnpo_beta > 0, "beta and simnpo_beta must be positive")

    @property
    def subspace_rule(self) -> SubspaceRule:
        return SubspaceRule.parse(self.subspace)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None = None, **more) -> UnlearnConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys raise with a suggestion."""
        values = {**(values or {}), **more}
        known = set(cls.fields())
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown option {key!r}{hint} (options: {', '.join(sorted(known))})")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> UnlearnConfig:
        import yaml

        file = Path(path)
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of option names to values")
        data = data.get("unlearn", data)
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def replace(self, **changes) -> UnlearnConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


def _coerce(cls, key: str, value):
    """Light type coercion for YAML/CLI strings: ints, floats and bools where the field wants them."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(key)
    if value is None or hint is None:
        return value
    args = typing.get_args(hint) or (hint,)
    if key == "adam_betas":
        return tuple(float(x) for x in value)
    if isinstance(value, str):
        if bool in args and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        for t in (int, float):
            if t in args:
                try:
                    return t(value)
                except ValueError:
                    pass
        return value
    if float in args and isinstance(value, int) and not isinstance(value, bool) and int not in args:
        return float(value)
    return value

