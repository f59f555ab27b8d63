"""The unlearning pipeline: :func:`unlearn` (``nsru.unlearn``), one call from a model, a tokenizer
and forget/retain data to an unlearned model, and :func:`fit_retain_bases`, its statistics -> bases
-> leakage step (which ``nsru subspace`` runs alone).

    result = nsru.unlearn(model, tokenizer, forget="forget10.json", retain="retain90.json")
    result.model        # the same model object, adapted in place (adapters unmerged)
    result.history      # per-step loss terms
    result.bases_info   # per module: k (retain-subspace size) and leakage on the retain data

Steps: load and tokenise the data; add adapters; collect the retain statistics (all-reduced
across processes) and set the retain bases (:func:`fit_retain_bases`, which ``nsru subspace`` runs
too), or set the bases given; initialise the adapters; train the method's loss.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nsru.adapt import apply_nsru, check_bases
from nsru.adapter_init import init_adapters
from nsru.checkpoint import OutputDirError, check_output_dir
from nsru.config import UnlearnConfig
from nsru.data import encode_qa, encode_text, input_batches, is_qa, keep_fact_labels, load_rows, pad_token_id
from nsru.distributed import dist_info, init_distributed_from_env, run_on_rank0
from nsru.layer import model_device, nsru_modules
from nsru.methods import LossContext, Method, get_method
from nsru.safe_targets import SafeTargets
from nsru.self_samples import row_subjects
from nsru.stats_sources import describe, global_source_means, source_holding, stats_encodings
from nsru.stopping import ForgetCheck
from nsru.sampler import Stream
from nsru.subspace import (SavedBases, SecondMoments, basis_info, collect_second_moments, read_bases,
                           retain_subspaces, set_retain_bases, summarize_bases)
from nsru.targets import TargetData, target_rows
from nsru.train import Trainer


@dataclass
class UnlearnResult:
    model: nn.Module
    history: list[dict]
    bases_info: dict[str, dict]
    config: UnlearnConfig
    init_info: dict[str, dict] = field(default_factory=dict)
    stats_info: dict[str, dict] = field(default_factory=dict)  # rows and tokens of each statistics source
    method_state: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    seconds: float = 0.0
    # targets=: the rows the model wrote about the names (report: what was asked, kept and dropped,
    # report["seconds"]: the generation's wall time, included in ``seconds``); None without targets
    generated: TargetData | None = None

    def summary(self) -> dict:
        """Mean k, mean leakage and the last step's losses, for printing."""
        bases = summarize_bases(self.bases_info)
        return {
            "method": self.config.method,
            "modules": bases["modules_count"],
            "mean_k": bases["mean_k"],
            "mean_leakage": bases["mean_leakage"],
            "last": self.history[-1] if self.history else {},
            "seconds": self.seconds,
        }


def resolve_config(method: str | None, config: UnlearnConfig | Mapping | None, options: Mapping) -> tuple[UnlearnConfig, Method]:
    """Merge ``config`` and ``options``; apply the method's ablation switches and defaults."""
    if config is None:
        base = {}
    elif isinstance(config, UnlearnConfig):
        base = config.to_dict()
    else:
        base = dict(config)
    values = {**base, **options}
    if method is not None:
        values["method"] = method
    cfg = UnlearnConfig.from_dict(values)
    m = get_method(cfg.method)
    changes = dict(m.overrides)
    if cfg.project is None and "project" not in changes:
        changes["project"] = m.project
    changes.update(m.weights(cfg))
    return (cfg.replace(**changes) if changes else cfg), m


def _encode_forget(rows, tokenizer, cfg, method: Method) -> list[dict]:
    qa = is_qa(rows)
    wants_safe = qa and method.wants_safe_targets(cfg)
    targets = SafeTargets(cfg.templates, seed=cfg.seed, name_subject=cfg.name_subject).all(rows) if wants_safe else None
    out = []
    for i, row in enumerate(rows):
        limits = {"max_length": cfg.max_length, "too_long": cfg.too_long, "where": f"forget row {i}"}
        if qa:
            ex = {"forget": encode_qa(tokenizer, row["question"], row["answer"], **limits)}
            if cfg.suppress_tokens == "facts":
                ex["forget"] = keep_fact_labels(tokenizer, ex["forget"], row["question"], row["answer"],
                                                row.get("subject"))
            if targets is not None:
                ex["safe"] = encode_qa(tokenizer, row["question"], targets[i], **limits)
        else:
            ex = {"forget": encode_text(tokenizer, row["text"], **limits)}
        out.append(ex)
    return out


def _encode_retain(rows, tokenizer, cfg) -> list[dict]:
    limits = {"max_length": cfg.max_length, "too_long": cfg.too_long}
    if is_qa(rows):
        return [{"retain": encode_qa(tokenizer, r["question"], r["answer"], where=f"retain row {i}", **limits)}
                for i, r in enumerate(rows)]
    return [{"retain": encode_text(tokenizer, r["text"], where=f"retain row {i}", **limits)} for i, r in enumerate(rows)]


def _stat_batches(encodings: Sequence[dict], pad_id: int, device):
    """This process's share of ``encodings`` as padded batches for ``model(**batch)`` (no labels)."""
    rank, world = dist_info()
    return input_batches(list(encodings)[rank::world], pad_id, device)


_NO_RETAIN = {  # UnlearnConfig.needs_retain_data's answers, without retain data
    "retention": "method {method!r} has a retain term but no retain data was given; pass retain=... or "
                 "retain=False to switch the term off",
    "statistics": "the null-space projection needs data for its statistics: pass retain=..., stats='self' or a "
                  "corpus, bases=..., or project=False (plain LoRA)",
}


@dataclass
class RetainBases:
    """What :func:`fit_retain_bases` found: ``modules`` (per adapter: k, in_features, capped and
    the leakage on each data set), ``sources`` (rows and tokens of each statistics source) and,
    where asked for, the ``moments`` the bases came from."""

    modules: dict[str, dict]
    sources: dict[str, dict]
    moments: SecondMoments | None = None


def fit_retain_bases(
    model: nn.Module,
    tokenizer,
    cfg: UnlearnConfig,
    *,
    retain_rows: Sequence[Mapping] | None = None,
    forget_rows: Sequence[Mapping] = (),
    retain: Sequence[dict] | None = None,
    forget: Sequence[dict] | None = None,
    progress: bool = False,
    keep_moments: bool = False,
) -> RetainBases:
    """Statistics -> bases -> leakage for the adapters ``model`` holds: encode the statistics
    sources of ``cfg.stats`` (``retain_rows``; ``forget_rows`` name the subjects kept out of the
    self-samples), collect their statistics (each source's mean weighing equally, over every
    process), give every adapter its retain basis by ``cfg.subspace``, and measure the leakage on
    the statistics data (``leakage``), on the ``retain`` encodings where the statistics are not
    the retain data alone (``leakage_retain``) and on the ``forget`` encodings (``leakage_forget``).
    ``progress``: bars for the self-samples, the statistics and the leakage passes."""
    device, pad_id = model_device(model), pad_token_id(tokenizer)
    stats = cfg.stats_sources(has_retain=retain_rows is not None)
    sources = stats_encodings(
        stats, model=model, tokenizer=tokenizer, retain_rows=retain_rows, forget_rows=forget_rows,
        max_length=cfg.max_length, tokens=cfg.stats_tokens, self_samples=cfg.self_samples,
        self_max_new_tokens=cfg.self_max_new_tokens, seed=cfg.seed, avoid=cfg.stats_avoid, progress=progress)
    moments, source_batches = global_source_means(model, sources, lambda enc: _stat_batches(enc, pad_id, device),
                                                  progress=progress)
    subspaces = retain_subspaces(moments, cfg.subspace_rule)
    kept = moments if keep_moments else None
    del moments  # d² floats per module group: not kept through training unless asked for
    set_retain_bases(model, {n: s.basis for n, s in subspaces.items()})
    # One leakage pass, one forward per distinct batch: the retain (or forget) encodings that a
    # statistics source already holds (the retain rows usually are one) reuse its batches.
    data = {("source", name): batches for name, batches in source_batches.items()}
    sets = {"leakage": list(data)}
    for key, encodings in (("leakage_retain", retain if stats != ["retain"] else None), ("leakage_forget", forget)):
        if encodings is not None:
            same = source_holding(sources, encodings)
            if same is None:
                data[key] = _stat_batches(encodings, pad_id, device)
            sets[key] = [key if same is None else ("source", same)]
    modules = basis_info(model, data, sets=sets, capped={n: s.capped for n, s in subspaces.items()}, progress=progress)
    return RetainBases(modules, describe(sources), kept)


def _given_bases(bases) -> SavedBases:
    """``bases=`` of :func:`unlearn` as :class:`SavedBases`: a folder of ``nsru subspace``, its
    :func:`read_bases` result, or a mapping from module name to U (in × k)."""
    if isinstance(bases, SavedBases):
        return bases
    if isinstance(bases, (str, os.PathLike)):
        return read_bases(bases)
    if isinstance(bases, Mapping) and bases and all(isinstance(u, torch.Tensor) for u in bases.values()):
        return SavedBases(meta={"modules": list(bases), "target_modules": list(bases), "layers": None},
                          bases=dict(bases))
    raise TypeError("bases must be a folder written by `nsru subspace`, nsru.subspace.read_bases(folder), or a "
                    f"non-empty dict from module name to its retain basis (in × k), got {type(bases).__name__}")


def target_data(model: nn.Module, tokenizer, targets, options: Mapping | None, *, forget_rows: Sequence[Mapping],
                 own_retain: bool, seed: int, progress: bool) -> TargetData:
    """``targets=`` of :func:`unlearn` (and ``nsru unlearn --target``) as :class:`TargetData`: given
    as one, or generated by :func:`nsru.targets.target_rows` (``options``: its keywords) with no
    neighbour rows when the caller has retain data (``own_retain``) and no neighbour that is a
    subject of ``forget_rows``. Raises :class:`nsru.targets.NothingToForget`."""
    if isinstance(targets, TargetData):
        if options:
            raise ValueError("target_options apply when targets= are names; these targets were already generated")
        return targets
    names = [targets] if isinstance(targets, str) else list(targets)
    settings = {"seed": seed, "progress": progress, **(options or {})}
    subjects = row_subjects(forget_rows)
    if subjects:
        settings["avoid"] = [*settings.get("avoid", ()), *subjects]
    if own_retain:
        settings["neighbours"] = []
    return target_rows(model, tokenizer, names, **settings)


def unlearn(
    model: nn.Module,
    tokenizer,
    forget=None,
    retain=None,
    method: str | None = None,
    *,
    targets: str | Sequence[str] | TargetData | None = None,
    target_options: Mapping | None = None,
    config: UnlearnConfig | Mapping | None = None,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    bases=None,
    **options,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``model`` while keeping ``retain``; see :class:`UnlearnConfig` for
    ``options``. ``forget``/``retain``: a JSON/JSONL path, a list of dicts or a ``datasets.Dataset``
    of question-answer rows (TOFU fields) or text rows (``text``). The retain data feeds both the
    retention term and the retain statistics; to keep the statistics but switch the term off use
    ``method="nsru-no-retain"`` or ``config={"retain": False}`` (``retain=False`` drops both).
    ``bases``: retain bases to train on instead of collecting the statistics (a folder written by
    ``nsru subspace``, its :func:`nsru.subspace.read_bases` result, or ``{module name: U}``): the
    adapters go on their modules (``target_modules`` and ``layers`` are theirs), and
    ``bases_info`` reports each module's k and the leakage on the retain and forget data.
    Under ``torchrun`` every process calls this with the same arguments; ``batch_size`` is the
    global batch.

    ``targets``: forget names instead of (or beside) rows, e.g. ``targets=["Albert Einstein"]``
    (a name or a list of names; the RWKU setting). Before any adapter is added, the model writes
    question-answer rows about each name (:func:`nsru.targets.target_rows`, with
    ``target_options`` as its keywords: ``kind``, ``samples``, ``questions``, ...; ``seed`` and
    ``progress`` default to the run's); these are forgotten beside the ``forget`` rows, which must
    then be question-answer rows too. Without ``retain`` (and unless ``retain=False``) its answers
    about neighbours (other entities of the same kind) are the retain data; with ``retain`` none
    are generated. Every name (and its last word) is kept out of the ``"self"`` statistics
    samples, like the subjects of the forget rows. ``targets`` may also be a
    :class:`nsru.targets.TargetData` generated before (and perhaps edited): its rows are used as
    they are. ``result.generated`` holds what was used (``.report["seconds"]``: the generation's
    wall time). A name the model gave no specific, consistent answer about raises
    :class:`nsru.targets.NothingToForget` (a ``ValueError`` whose ``data`` holds what was
    generated). Give ``forget``, ``targets`` or both.
    """
    started = time.perf_counter()
    if forget is None and targets is None:
        raise ValueError("nothing to unlearn: give forget= (rows to forget) or targets= (names whose rows the "
                         "model writes itself), or both")
    if target_options is not None and targets is None:
        raise ValueError("target_options= apply to targets=, which was not given")
    no_retain = retain is False  # no generated retain rows either
    if isinstance(retain, bool):  # retain=False: no retain data and no retain term
        options["retain"] = retain
        retain = None
    cfg, m = resolve_config(method, config, options)
    given = _given_bases(bases) if bases is not None else None
    if given is not None:
        if not cfg.projects():
            raise ValueError(f"bases= applies to projected adapters; method {cfg.method!r} with "
                             f"finetune={cfg.finetune}, project={cfg.project} has none")
        cfg = cfg.replace(target_modules=given.meta.get("target_modules", list(given.bases)),
                          layers=given.meta.get("layers"))
    init_distributed_from_env()
    if cfg.output_dir:  # before any work: a run that cannot checkpoint fails now, not after the statistics
        run_on_rank0(lambda: check_output_dir(cfg.output_dir), OutputDirError)
    # Imported here: transformers' trainer utilities import peft when it is installed, which added
    # 4.4 s to `import nsru` (measured); the Trainer's scheduler needs the same import anyway.
    from transformers import set_seed

    set_seed(cfg.seed)  # Python, NumPy and torch (CPU and every CUDA device)
    if cfg.device is not None:
        model.to(cfg.device)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)

    forget_rows = load_rows(forget, "forget") if forget is not None else []
    retain_rows = load_rows(retain, "retain") if retain is not None else None
    generates_retain = targets is not None and retain_rows is None and not no_retain
    need = cfg.needs_retain_data(m, bases=given is not None) if retain_rows is None else None
    if need is not None and not generates_retain:
        raise ValueError(_NO_RETAIN[need].format(method=cfg.method))
    generated = None
    named = forget_rows  # rows whose subjects are kept out of the "self" statistics samples
    if targets is not None:
        if forget_rows and not is_qa(forget_rows):
            raise ValueError("targets= make question-answer rows, so forget= must hold question-answer rows too "
                             "(it holds text rows)")
        generated = target_data(model, tokenizer, targets, target_options, forget_rows=forget_rows,
                                 own_retain=not generates_retain, seed=cfg.seed,
                                 progress=cfg.progress and dist_info()[0] == 0)
        if not generated.forget and not forget_rows:
            raise ValueError("targets= hold no forget rows and no forget= was given: nothing to unlearn")
        forget_rows = forget_rows + list(generated.forget)
        if generates_retain and generated.retain:
            retain_rows = list(generated.retain)
        if need is not None and retain_rows is None:
            raise ValueError(_NO_RETAIN[need].format(method=cfg.method)
                             + " (the model wrote no retain rows about the targets' neighbours)")
        named = forget_rows + [{"subject": s} for s in generated.subjects]  # also a target whose rows were edited out
    forget_ex = _encode_forget(forget_rows, tokenizer, cfg, m)
    retain_ex = _encode_retain(retain_rows, tokenizer, cfg) if retain_rows is not None else None

    adapters: dict = {}
    ref_model = None
    needs_ref = m.needs_reference or cfg.retain_loss == "kl"
    if cfg.finetune == "adapter":
        adapters = nsru_modules(model)
        if not adapters and given is not None:
            check_bases(model, given.bases, cfg.r)  # before the first module is replaced
            adapters = apply_nsru(model, target_modules=list(given.bases), r=cfg.r, alpha=cfg.alpha)
        elif not adapters:
            targets = cfg.target_modules
            if m.default_targets is not None and targets == "all-linear":
                targets = m.default_targets(model, cfg)
            adapters = apply_nsru(model, target_modules=targets, r=cfg.r, alpha=cfg.alpha, layers=cfg.layers)
        if given is not None:
            if set(adapters) != set(given.bases):
                raise ValueError(f"bases= holds {len(given.bases)} modules but the model has {len(adapters)} other "
                                 "adapters; give a model without adapters, or bases for exactly its adapters")
            set_retain_bases(model, given.bases)
        params = {}
        for name, adapter in adapters.items():
            params[f"{name}.lora_A"] = adapter.lora_A
            params[f"{name}.lora_B"] = adapter.lora_B
            adapter.lora_A.requires_grad_(True)
            adapter.lora_B.requires_grad_(True)
    else:
        if needs_ref:
            # Full fine-tuning has no adapter to switch off: the reference is a frozen copy.
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    bases_info: dict[str, dict] = {}
    stats_report: dict = {}
    progress = cfg.progress and dist_info()[0] == 0  # the trainer's rule: bars on the first process only
    retain_enc = [e["retain"] for e in retain_ex] if retain_ex is not None else None
    forget_enc = [e["forget"] for e in forget_ex]
    if adapters and given is not None:  # no statistics: the leakage of the given bases on this run's data
        leaks = {"leakage": retain_enc, "leakage_forget": forget_enc}
        capped = {n: info.get("capped", False) for n, info in given.report.get("modules", {}).items()}
        bases_info = basis_info(model, {key: _stat_batches(enc, pad_id, device) for key, enc in leaks.items()
                                        if enc is not None}, capped=capped, progress=progress)
    elif adapters and cfg.project:
        fit = fit_retain_bases(model, tokenizer, cfg, retain_rows=retain_rows, forget_rows=named,
                               retain=retain_enc, forget=forget_enc, progress=progress)
        bases_info, stats_report = fit.modules, fit.sources
    else:
        # No projection: the adapter may move every direction (leakage 1 by definition).
        bases_info = {name: {"k": 0, "in_features": adapter.in_features, "capped": False, "leakage": 1.0}
                      for name, adapter in adapters.items()}

    init_info: dict = {}
    if adapters:
        forget_moments = None
        if cfg.init == "forget":
            fb = _stat_batches(forget_enc, pad_id, device)
            forget_moments = collect_second_moments(model, fb, progress=progress, desc="forget statistics").all_reduce()
        init_info = init_adapters(adapters, cfg.init, seed=cfg.seed, forget_moments=forget_moments)

    ctx = LossContext(model, cfg, ref_model=ref_model)
    if m.setup is not None:
        m.setup(ctx, _stat_batches(forget_enc, pad_id, device))

    streams = {"forget": Stream(forget_ex, cfg.batch_size, seed=cfg.seed, salt=1, pad_id=pad_id)}
    if retain_ex is not None and cfg.retain:
        streams["retain"] = Stream(retain_ex, cfg.batch_size, seed=cfg.seed, salt=2, pad_id=pad_id)
    stop_fn = None
    if cfg.stop_at is not None:  # measured before the first step: the adapters still add nothing
        stop_fn = ForgetCheck(model, [ex["forget"] for ex in forget_ex], pad_id, cfg.stop_at)
    trainer = Trainer(model, cfg, m, ctx, streams, params, adapters=adapters, eval_fn=eval_fn, stop_fn=stop_fn)
    history = trainer.train()
    if cfg.finetune == "full":
        model.requires_grad_(False)
    return UnlearnResult(
        model=model,
        history=history,
        bases_info=bases_info,
        config=cfg,
        init_info=init_info,
        stats_info=stats_report,
        method_state={k: v for k, v in ctx.state.items()},
        checkpoint=trainer.last_checkpoint,
        seconds=time.perf_counter() - started,
        generated=generated,
    )
