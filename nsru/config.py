"""``UnlearnConfig``: every option of :func:`nsru.unlearn` in one typed dataclass.

Fill it from keyword arguments, a dict, or a YAML file (the CLI does the latter); unknown keys are
an error that suggests the closest field, and every value is checked for its type and range when the
config is built, before any model is loaded. Defaults come from ``benchmarks/sweep_defaults.py``;
:data:`HELP` says what each option does (``nsru unlearn --help`` prints it).

The module imports neither torch nor the rest of the library at import time, so the CLI can show
its help and reject a bad option in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Equal to nsru.ops.DEFAULT_RULE (tests/test_cli.py checks it): spelled out so that this module
# stays free of torch, which nsru.ops imports.
DEFAULT_RULE = "energy=0.9"


class ConfigError(ValueError):
    """An option that does not exist or has an unusable value."""


def read_yaml_mapping(file: Path) -> dict:
    """The mapping a YAML file holds (empty for an empty file); a clear error for anything else."""
    import yaml

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


@dataclass
class UnlearnConfig:
    # --- method and its switches (DESIGN §1; the ablations turn one part off)
    method: str = "nsru"
    safe: bool = True
    suppress: bool = True
    retain: bool = True
    project: bool | None = None  # None: the method decides (on for nsru, off for the baselines)
    suppress_loss: str = "npo"  # npo | unlikelihood | dpo
    suppress_tokens: str = "answer"  # answer | facts: the answer tokens the forget-side loss acts on
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
    r: int = 8  # the adapters' inner dimension: A is r × in, B is out × r (PEFT's name)
    alpha: float = 16.0
    init: str = "random"  # random (then projected) | forget (top-r eigvecs of P⊥ C_forget P⊥)
    subspace: str = DEFAULT_RULE  # retain-subspace rule, e.g. "energy=0.9", "k=16", "tail=1e-3,min_null=8"
    # Data of the retain statistics (nsru.stats_sources): "auto" (retain data and self-samples),
    # "retain", "self", "neighbours", a corpus (path or rows), or a list of them, each source
    # weighing equally; stats_tokens bounds their tokens, shared equally between the sources.
    stats: Any = "auto"
    stats_tokens: int | None = None
    stats_avoid: Any = ()  # names kept out of the generated sources ("self", "neighbours"), e.g. those you evaluate on
    self_samples: int = 64  # texts the model writes itself for "self"; leakage curve: 64 within 0.004 of 256
    self_max_new_tokens: int = 64
    layers: Any = None  # adapt only these layers: "10-19", [10, 11, ...] or None (all)

    # --- safe targets
    templates: Any = None  # list of templates or a file; None: built-in refusals
    name_subject: bool = True

    # --- data
    max_length: int = 256
    too_long: str = "cut"  # an example longer than max_length: cut | warn (cut, naming it) | error
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
    stop_at: float | None = None  # stop once the forget answers' median token-probability ratio to before is ≤ this
    stop_every: int = 5  # steps between those checks
    max_grad_norm: float | None = 1.0
    sam_rho: float = 0.0  # > 0: suppression at the adapted base weights moved this far (per weight) against it
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
    fsdp: bool = False  # shard the frozen base weights across the processes (FSDP2); adapters stay whole

    # ------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from nsru.adapt import parse_layers
        from nsru.ops.subspace_update import SubspaceRule

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        _check_types(self)

        need(self.suppress_tokens in ("answer", "facts"),
             f"suppress_tokens must be answer or facts, got {self.suppress_tokens!r}")
        need(self.suppress_loss in ("npo", "unlikelihood", "dpo"),
             f"suppress_loss must be npo, unlikelihood or dpo, got {self.suppress_loss!r}")
        need(self.retain_loss in ("nll", "kl"), f"retain_loss must be nll or kl, got {self.retain_loss!r}")
        need(self.finetune in ("adapter", "full"), f"finetune must be 'adapter' or 'full', got {self.finetune!r}")
        need(not (self.fsdp and self.finetune == "full"),
             "fsdp shards the frozen base weights around the adapters; finetune='full' trains every weight, "
             "which this trainer does not shard (use finetune='adapter', or fsdp=False)")
        need(self.init in ("random", "forget"), f"init must be 'random' or 'forget', got {self.init!r}")
        need(self.schedule in ("linear", "cosine", "constant"),
             f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        need(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
             f"r (the adapters' inner dimension) must be a positive integer, got {self.r!r}")
        try:
            self.subspace = str(SubspaceRule.parse(self.subspace))
        except ValueError as e:
            raise ConfigError(f"subspace: {e}") from None
        try:
            parse_layers(self.layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        sources = self.stats_sources()
        need(len(sources) > 0, "stats must name at least one source: 'retain', 'self', 'neighbours', a corpus, or a list")
        for source in sources:
            if isinstance(source, (str, os.PathLike)) and str(source) not in ("auto", "retain", "self", "neighbours"):
                need(Path(source).is_file(), f"stats source {str(source)!r} is neither 'auto', 'retain', 'self', "
                                             "'neighbours' nor an existing JSON/JSONL file")
        need(isinstance(self.stats_avoid, (list, tuple)) and all(isinstance(n, str) for n in self.stats_avoid),
             f"stats_avoid must be a list of names, got {self.stats_avoid!r}")
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
        need(self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        need(self.max_length >= 1, f"max_length must be at least 1, got {self.max_length!r}")
        need(self.too_long in ("cut", "warn", "error"), f"too_long must be cut, warn or error, got {self.too_long!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)!r}")
        need(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be positive or null (no clipping), got {self.max_grad_norm!r}")
        need(self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0 (0: off)")
        need(self.stop_at is None or 0.0 < self.stop_at < 1.0,
             f"stop_at must lie between 0 and 1 (a fraction of the probability before training), got {self.stop_at!r}")
        need(self.sam_rho >= 0, f"sam_rho must be >= 0 (0: off), got {self.sam_rho!r}")
        need(self.stop_every >= 1, f"stop_every must be at least 1, got {self.stop_every!r}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {self.keep_checkpoints!r}")
        need(self.rmu_layer is None or self.rmu_layer >= 0, f"rmu_layer must be >= 0, got {self.rmu_layer!r}")
        need(self.rmu_steering is None or self.rmu_steering > 0, f"rmu_steering must be positive, got {self.rmu_steering!r}")
        need(self.rmu_steering_scale > 0, f"rmu_steering_scale must be positive, got {self.rmu_steering_scale!r}")

    def stats_sources(self, has_retain: bool = True) -> list:
        """:attr:`stats` as a list of sources, ``"auto"`` resolved: the retain data and ``"self"``,
        or ``"self"`` alone where there is no retain data (``has_retain``)."""
        if isinstance(self.stats, str) and self.stats == "auto":
            return ["retain", "self"] if has_retain else ["self"]
        return list(self.stats) if isinstance(self.stats, (list, tuple)) else [self.stats]

    def projects(self) -> bool:
        """Whether updates are confined to the null space: adapters (not full fine-tuning) with
        ``project`` on (once the method has decided it)."""
        return self.finetune == "adapter" and bool(self.project)

    def needs_retain_data(self, method=None, *, bases: bool = False) -> str | None:
        """What needs retain data under these options, or ``None``: ``"retention"`` where
        ``method`` (a :class:`nsru.methods.Method`, with the method's switches applied to this
        config) has a retention term that is on; ``"statistics"`` where the retain statistics are
        collected and ``stats`` names ``"retain"``. They are collected for projected adapters
        unless ``bases`` are given, and always without a ``method`` (``nsru subspace``)."""
        if method is not None and self.retain and method.needs_retain:
            return "retention"
        collected = method is None or (self.projects() and not bases)
        if collected and "retain" in self.stats_sources(has_retain=False):
            return "statistics"
        return None

    @property
    def subspace_rule(self):
        """:attr:`subspace` as a :class:`nsru.ops.SubspaceRule`."""
        from nsru.ops.subspace_update import SubspaceRule

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
        file = Path(path)
        data = read_yaml_mapping(file)
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
    """Light type coercion for YAML/CLI strings: ints, floats and bools where the field wants them.
    What cannot be converted is left as it is, for :func:`_check_types` to reject by name."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(key)
    if value is None or hint is None:
        return value
    args = typing.get_args(hint) or (hint,)
    if key == "adam_betas":
        parts = value.split(",") if isinstance(value, str) else value
        try:
            return tuple(float(x) for x in parts)
        except (TypeError, ValueError):
            return value
    if isinstance(value, str):
        if bool in args and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if value.lower() in ("null", "none", "~") and type(None) in args:
            return None
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


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _accepts(t, value) -> bool:
    if t is typing.Any:
        return True
    if t is type(None):
        return value is None
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(t)
    if origin is tuple:
        inner = typing.get_args(t)
        return isinstance(value, (tuple, list)) and len(value) == len(inner) and all(
            _accepts(i, v) for i, v in zip(inner, value))
    return isinstance(value, origin or t)


def _describe_type(t) -> str:
    if typing.get_origin(t) is tuple:
        return f"a list of {len(typing.get_args(t))} numbers"
    return _TYPE_WORDS.get(t, getattr(t, "__name__", str(t)))


def _check_types(config: UnlearnConfig) -> None:
    """Every field holds a value of its annotated type (``Any`` fields are checked by ``validate``)."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not any(_accepts(t, value) for t in args):
            words = [_describe_type(t) for t in args]
            wanted = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
            raise ConfigError(f"option {name!r} must be {wanted}, got {value!r} ({type(value).__name__})")


# What each option does, for ``nsru unlearn --help`` (tests/test_cli.py checks every field has one).
HELP = {
    "method": "unlearning method: nsru, ga, graddiff, npo, simnpo, idkdpo, rmu, or an ablation such as "
              "nsru-no-project (plain LoRA with NSRU's losses)",
    "safe": "safe-target term: learn a refusal for every forget question (ablation switch)",
    "suppress": "suppression term: push the original forget answers down (ablation switch)",
    "retain": "retention term on the retain data (ablation switch)",
    "project": "confine the adapter to the null space of the retain statistics (null: the method decides)",
    "suppress_loss": "suppression loss: npo, unlikelihood or dpo (chosen = safe target)",
    "suppress_tokens": "answer tokens the forget-side loss acts on: answer (all) or facts (the words of the answer "
                       "that its question and subject do not say)",
    "retain_loss": "retention loss: nll on the retain answers, or kl to the model before unlearning",
    "safe_weight": "weight of the safe-target term (null: the method's default; NSRU 1.0)",
    "suppress_weight": "weight of the forget-side term of every method (null: the method's default; NSRU 0.3)",
    "retain_weight": "weight of the retention term (null: the method's default; NSRU 3.0)",
    "beta": "inverse temperature of NPO, DPO and IdkDPO",
    "simnpo_beta": "SimNPO's beta",
    "simnpo_delta": "SimNPO's reward margin",
    "simnpo_gamma": "SimNPO's weight of its retain term",
    "rmu_layer": "RMU: the layer whose activations are steered (null: 7/32 of the depth)",
    "rmu_steering": "RMU: steering norm (null: rmu_steering_scale x the mean hidden norm on forget data)",
    "rmu_steering_scale": "RMU: steering norm as a multiple of the mean hidden norm",
    "finetune": "what trains: adapter (the factors A and B) or full (every parameter; baselines only)",
    "target_modules": "modules that get adapters, as PEFT: all-linear, a list of names, or a regex on full names",
    "r": "inner dimension of the adapters: A is r x in, B is out x r",
    "alpha": "adapter scale numerator: the update is (alpha / r) B A",
    "init": "adapter A init: random (then projected) or forget (directions forget data uses, retain data not)",
    "subspace": "retain-subspace rule: energy=0.9 (fraction of the trace), k=16, abs=X, tail=X, mean=X; "
                "add ,min_null=N to keep N free directions per module",
    "stats": "data of the retain statistics: auto (retain and self), retain, self (text the model writes "
             "before training), neighbours (its answers about other entities of the forget subjects' kind), "
             "a JSON/JSONL corpus, or a list of them (each source weighs equally)",
    "stats_avoid": "names kept out of the self and neighbours statistics texts (e.g. the entities you evaluate on)",
    "stats_tokens": "at most this many tokens of statistics data, shared equally between the sources (null: all)",
    "self_samples": "texts the model writes for the 'self' statistics source",
    "self_max_new_tokens": "length of each of those texts, in tokens",
    "layers": "adapt only these transformer blocks: '10-19', '3,5,7' or a list (null: all)",
    "templates": "safe-target templates: a list of strings with {subject}, or a file of them (null: built-in refusals)",
    "name_subject": "whether safe targets name the question's subject",
    "max_length": "longest tokenised example; longer ones are handled as too_long says",
    "too_long": "an example longer than max_length: cut (silently), warn (cut, naming the row) or error",
    "batch_size": "global batch size (each of N processes takes batch_size / N)",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "learning rate of the adapter factors (or of every parameter with finetune=full)",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas, e.g. [0.9, 0.999]",
    "adam_eps": "AdamW epsilon",
    "warmup_steps": "warm-up: steps, or a fraction of the steps when below 1",
    "schedule": "learning-rate schedule after warm-up: linear, cosine or constant",
    "steps": "optimizer steps",
    "max_grad_norm": "gradient clipping norm (null: no clipping)",
    "sam_rho": "sharpness-aware forgetting: the suppression term is computed with every base weight of the "
               "adapted modules moved this far along the sign of its gradient, as a relearning attack's AdamW step "
               "at this learning rate would (0: off; each step then runs the suppression twice)",
    "seed": "seed of the data order, the adapter init and the safe-target choice",
    "bf16": "autocast to bfloat16 on CUDA (ignored on the CPU)",
    "output_dir": "where checkpoints go (the CLI sets it to OUT/checkpoints)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue from the latest checkpoint in output_dir, or from a checkpoint path (the CLI: --resume)",
    "eval_every": "call the evaluation callback every N steps (0: never)",
    "stop_at": "stop before steps once the forget answers' median per-token probability is at most this fraction of "
               "its value before training (null: run every step)",
    "stop_every": "steps between the stop_at checks",
    "progress": "show a progress bar",
    "device": "move the model here before training (null: leave it where it is)",
    "fsdp": "under torchrun, shard the frozen base weights across the processes (FSDP2); adapters stay whole",
}
