"""``nsru unlearn``: :func:`nsru.unlearn` on a model and data files, into a run folder.

Everything the command can check is checked before the model loads: the options (names, types,
ranges), the method, the model folder, every data row, the bases folder and the output folder; the
target modules and their r right after it loads. Nothing is written to ``--out`` before all of these
passed, and a new run that stops before its first checkpoint takes its files away again, so the
same command can run again. Under ``torchrun`` rank 0 owns the run folder (its checks, config, log,
history and adapter); the other processes share its verdicts and train beside it.
See :mod:`nsru.cli.rundir` for what the run folder holds.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from nsru.cli import rundir as R
from nsru.cli.common import (RUN_KEYS, UsageError, add_model_args, build_config, check_dtype_device,
                             check_model_path, load_model, load_rows, options_help, read_config_file, wrap)

NAME = "unlearn"
CHECKPOINTS_PER_RUN = 10  # save_every's default here: a checkpoint every tenth of the steps, for --resume
NO_RETAIN = {  # UnlearnConfig.needs_retain_data's answers, without --retain
    "retention": "method {method!r} has a retention term: give --retain FILE, or retain=false to switch the term off",
    "statistics": "the null-space projection needs statistics data: give --retain FILE, stats=self or stats=FILE, "
                  "--bases DIR, or project=false (plain LoRA)",
}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="unlearn forget data from a model; writes a run folder with the adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="nsru unlearn --model PATH (--forget FILE | --target NAME ...) [--retain FILE] --out DIR "
              "[--config YAML] [--bases DIR] [--resume] [key=value ...]",
        description=wrap("Train NSRU (or a baseline: method=...) adapters that make the model refuse the forget "
                    "questions, suppress its old answers and keep the retain data, with updates confined to the "
                    "null space of each module's retain statistics. Data: TOFU-style JSON/JSONL (question, answer; "
                    "optional paraphrased_answer, perturbed_answer, subject, safe_answer), text corpora (text), or "
                    "a datasets name NAME[:CONFIG][@SPLIT] such as locuslab/TOFU:forget10. Or name what to forget "
                    "(--target NAME): the model writes its own forget rows, and retain rows about similar entities "
                    "without --retain, into OUT/generated/.\n\n"
                    "The run folder gets config.yaml (resolved), log.txt, history.jsonl (one line per step), "
                    "basis_report.json (k and leakage per module), adapter/, metrics.json and checkpoints/."),
        epilog=wrap("Options as key=value (after the flags or among them; they override the config file). Values "
               "are YAML: lr=3e-3, target_modules=[q_proj,v_proj] (or q_proj,v_proj), stats=[retain,self], "
               "project=false, rmu_layer=null. Here save_every defaults to a tenth of the steps.")
               + "\n" + options_help())
    add_model_args(p)
    p.add_argument("--forget", metavar="FILE", help="forget data (here or in the config's run section; optional "
                                                    "with --target)")
    p.add_argument("--target", action="append", metavar="NAME",
                   help="forget what the model knows about NAME (repeatable): it writes question-answer rows about "
                        "the name (and, without --retain, about other entities of its kind, the retain rows) into "
                        "OUT/generated/forget.jsonl and retain.jsonl, to read or edit; a rerun or --resume of OUT "
                        "reuses them. Used beside --forget rows when both are given")
    p.add_argument("--retain", metavar="FILE", help="retain data: the retention loss and (stats=retain) the statistics")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (must not hold a run unless --resume)")
    p.add_argument("--config", metavar="YAML", help="config file: sections run: (model, forget, retain, dtype, "
                                                    "device, bases) and unlearn: (the key=value options)")
    p.add_argument("--bases", metavar="DIR", help="reuse the retain bases written by `nsru subspace --out DIR` instead "
                                                  "of collecting the statistics again")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint, with its config.yaml (key=value "
                        "options still apply, e.g. steps=200 to train longer)")
    return p


def _run_values(args, file_run: dict, previous: dict) -> dict:
    values = {**previous, **file_run}
    for key in RUN_KEYS:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    for key in ("model", "tokenizer", "forget", "retain", "bases"):  # local paths absolute, so config.yaml works anywhere
        if values.get(key) is not None and Path(str(values[key])).expanduser().exists():
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    return values


def run(args, overrides: dict) -> int:
    out = Path(args.out)
    owner = _start_distributed()  # under torchrun: rank 0 owns the run folder, the others share its verdicts
    previous_run, previous_unlearn = {}, {}
    if args.resume:
        previous_run, previous_unlearn = _on_owner(lambda: _previous_config(out))
    file_run, file_unlearn = read_config_file(args.config)
    values = _run_values(args, file_run, previous_run)
    explicit = {**file_unlearn, **overrides}
    cfg = build_config({**previous_unlearn, **file_unlearn}, overrides, args.config or "")

    from nsru.pipeline import resolve_config

    resolved, method = resolve_config(None, cfg, {})  # the method's switches and loss weights filled in
    model = check_model_path(values.get("model"))
    check_dtype_device(values.get("dtype"), values.get("device"))
    names = _target_names(args.target or values.get("target"))
    generated = _on_owner(lambda: _read_generated(out, names, args.resume)) if names or args.resume else None
    reused = generated is not None
    if not values.get("forget") and not names and not reused:
        raise UsageError("--forget is required (a JSON/JSONL file of question/answer or text rows, or a datasets "
                         "name), or --target NAME (a name whose forget rows the model writes itself)")
    forget = load_rows(values.get("forget"), "--forget")
    if forget is not None and (names or reused) and "question" not in forget[0]:
        raise UsageError("--target makes question-answer rows, and --forget holds text rows: give question-answer "
                         "rows, or leave out one of the two")
    retain = load_rows(values.get("retain"), "--retain")
    project = resolved.project
    has_retain = retain is not None or (reused and bool(generated.retain))
    need = resolved.needs_retain_data(method, bases=bool(values.get("bases"))) if not has_retain else None
    if need is not None and not (names and not reused and retain is None):  # else: the model writes retain rows
        raise UsageError(NO_RETAIN[need].format(method=cfg.method))
    bases = None
    if values.get("bases"):
        from nsru.subspace import BasesFileError, read_bases

        if not resolved.projects():
            raise UsageError(f"--bases applies to projected adapters; method {cfg.method!r} with "
                             f"finetune={resolved.finetune}, project={project} has none")
        for key in ("target_modules", "layers"):
            if key in explicit and not args.resume:
                raise UsageError(f"--bases fixes the adapted modules (those of the subspace run); drop {key}=")
        try:
            bases = read_bases(values["bases"])
        except BasesFileError as e:
            raise UsageError(f"--bases {e}") from None
        resolved = resolved.replace(target_modules=bases.meta["target_modules"], layers=bases.meta["layers"])

    save_every = resolved.save_every if "save_every" in explicit or previous_unlearn else max(
        1, resolved.steps // CHECKPOINTS_PER_RUN)
    run_dir = R.RunDir(out, owner=owner)
    resolved = resolved.replace(save_every=save_every, output_dir=str(run_dir / R.CHECKPOINTS), resume=args.resume)
    _on_owner(lambda: R.RunDir.check(out, args.resume))
    if args.resume:
        _on_owner(lambda: _check_schedule(out, resolved))

    lm, tok = load_model(model, tokenizer=values.get("tokenizer"), dtype=values.get("dtype"),
                         device=values.get("device"), trust_remote_code=bool(values.get("trust_remote_code")),
                         log=run_dir.log)
    if bases is not None:  # the modules need the model; checked before the folder is made
        from nsru.adapt import check_bases

        try:
            check_bases(lm, bases.bases, resolved.r)
        except ValueError as e:
            raise UsageError(f"--bases: {e}") from None
    elif resolved.finetune == "adapter":
        from nsru.adapt import check_targets

        targets = resolved.target_modules
        if method.default_targets is not None and targets == "all-linear":
            targets = method.default_targets(lm, resolved)
        check_targets(lm, targets, resolved.r, resolved.layers)
    if reused:
        run_dir.log(f"reusing {out / R.GENERATED} ({len(generated.forget)} forget, {len(generated.retain)} retain "
                    "rows) instead of generating them again")
    elif names:
        generated = _generate(lm, tok, names, forget, retain, resolved, out, run_dir, owner)
        if need is not None and not generated.retain:
            raise UsageError(NO_RETAIN[need].format(method=cfg.method)
                             + f" (the model wrote no retain rows about neighbours of {_quoted(names)})")

    config_values = {k: v for k, v in resolved.to_dict().items() if k not in ("output_dir", "resume")}
    _on_owner(lambda: run_dir.create(values, config_values, args.resume))
    n_forget = len(forget or []) + (len(generated.forget) if generated is not None else 0)
    n_retain = len(retain) if retain is not None else len(generated.retain) if generated is not None else 0
    run_dir.log(f"nsru unlearn: {'resuming' if args.resume else 'new'} run in {out} (method {resolved.method}, "
                f"{resolved.steps} steps, {n_forget} forget rows, {n_retain} retain rows)")
    if bases is not None:
        run_dir.log(f"reusing the retain bases of {len(bases.bases)} modules from "
                    f"{bases.meta.get('model') or 'a subspace run'} ({bases.meta.get('rule')})")
    import nsru

    started = time.perf_counter()
    try:
        result = nsru.unlearn(lm, tok, forget, retain, config=resolved, bases=bases, targets=generated)
    except BaseException as e:
        if owner:
            _failed(run_dir, e, time.perf_counter() - started)
        raise
    if not owner:
        return 0

    run_dir.write_history(result.history)
    report = _basis_report(result, bases)
    run_dir.write_json(R.BASIS_REPORT, report)
    nsru.save_adapter(lm, run_dir / R.ADAPTER, base_model_name_or_path=model)
    last = result.history[-1] if result.history else {}
    train = {"method": resolved.method, "steps": len(result.history), "seconds": result.seconds,
             "last": last, "modules": report["modules_count"], "mean_k": report["mean_k"],
             "mean_leakage": report["mean_leakage"], "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    if generated is not None:
        train["generated"] = {"targets": generated.subjects, "forget": len(generated.forget),
                              "retain": len(generated.retain), "seconds": generated.report.get("seconds"),
                              "reused": reused}
    run_dir.update_metrics("train", train, drop=("eval",))  # an eval of the adapter just replaced no longer holds
    losses = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("step", "lr", "grad_norm")
                       and isinstance(v, float))
    leak = f"{report['mean_leakage']:.4f}" if report["mean_leakage"] is not None else "n/a"
    run_dir.log(f"done: {train['steps']} steps in {result.seconds:.1f}s; last {losses}; {report['modules_count']} "
                f"modules, mean k {report['mean_k']:.1f}, mean leakage {leak}")
    run_dir.log(f"wrote {run_dir / R.ADAPTER} (nsru export --adapter {out} --out DIR: a PEFT copy; nsru merge: "
                "a plain model)")
    return 0


def _target_names(given) -> list[str] | None:
    """The ``--target`` names, blanks squeezed, each once; ``None`` without any."""
    if not given:
        return None
    names: list[str] = []
    for name in given:
        name = " ".join(str(name).split())
        if not name:
            raise UsageError("--target needs a name, e.g. --target 'Albert Einstein'")
        if name not in names:
            names.append(name)
    return names


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def _read_generated(out: Path, names: list[str] | None, resume: bool):
    """The rows an earlier try of this run generated (``OUT/generated``; perhaps edited since), as
    :class:`nsru.targets.TargetData`, or ``None`` when there are none to reuse. They must be about
    the same names as ``--target`` (when given), each the subject of a forget row."""
    import json

    from nsru.data import DataError, load_qa
    from nsru.targets import TargetData

    folder = out / R.GENERATED
    if not (folder / "forget.jsonl").is_file() or (not resume and (out / R.CONFIG).is_file()):
        return None  # nothing to reuse (a finished run in --out is refused by RunDir.check)

    def rows(name: str) -> list[dict]:
        file = folder / name
        try:
            if not file.is_file() or not file.read_text(encoding="utf-8").strip():
                return []
            return load_qa(file, str(file))
        except DataError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot read {file}: {e.strerror or e}") from None

    forget, retain = rows("forget.jsonl"), rows("retain.jsonl")
    report = {}
    if (folder / "report.json").is_file():
        try:
            report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{folder / 'report.json'}: not readable JSON ({e}); delete it or the folder") from None
    recorded = list(report.get("targets") or {}) if isinstance(report, dict) else []
    if names and recorded and set(names) != set(recorded):
        raise UsageError(f"{folder} holds rows generated about {_quoted(recorded)}, not --target {_quoted(names)}: "
                         "delete it to generate them again, or choose another --out")
    names = names or recorded or sorted({r["subject"] for r in forget if isinstance(r.get("subject"), str)})
    for name in names:
        if not any(r.get("subject") == name for r in forget):
            raise UsageError(f"{folder / 'forget.jsonl'}: no row has subject {name!r}; add rows about {name!r}, or "
                             f"delete {folder} and leave out --target {name!r}")
    report = dict(report) if isinstance(report, dict) else {}
    report["targets"] = {n: (report.get("targets") or {}).get(n, {}) for n in names}
    return TargetData(forget=forget, retain=retain, report=report)


def _generate(lm, tok, names: list[str], forget, retain, cfg, out: Path, run_dir: R.RunDir, owner: bool):
    """Rows about ``names`` from the model (:func:`nsru.targets.target_rows`), written to
    ``OUT/generated`` by the owner; a name the model knows nothing about is a ``UsageError`` after
    what was generated is written there."""
    from nsru.pipeline import target_data
    from nsru.targets import NothingToForget

    folder = out / R.GENERATED
    run_dir.log(f"asking the model about {_quoted(names)}"
                + (" and neighbours of the same kind" if retain is None else "") + " for the forget rows")
    try:
        data = target_data(lm, tok, names, None, forget_rows=forget or [], own_retain=retain is not None,
                            seed=cfg.seed, progress=cfg.progress and owner)
    except NothingToForget as e:
        partial = e.data
        _on_owner(lambda: partial.write(folder))
        raise UsageError(f"{e}; what was generated is in {folder}") from None
    _on_owner(lambda: data.write(folder))
    run_dir.log(f"generated {len(data.forget)} forget and {len(data.retain)} retain rows in "
                f"{data.report.get('seconds', 0):.1f}s into {folder} (forget.jsonl, retain.jsonl: read or edit them; "
                "a rerun or --resume reuses them)")
    return data


def _start_distributed() -> bool:
    """Join the process group when launched by ``torchrun``; whether this process owns the run
    folder (rank 0, or the only process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from nsru.distributed import dist_info, init_distributed_from_env

    init_distributed_from_env()
    return dist_info()[0] == 0


def _on_owner(fn):
    """``fn()`` on the process that owns the run folder; every process gets its result or its
    error (a ``UsageError`` stays one, so every process exits with the same line)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return fn()
    from nsru.distributed import run_on_rank0

    return run_on_rank0(fn, UsageError)


def _previous_config(out: Path) -> tuple[dict, dict]:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder")
    if not (out / R.CONFIG).is_file():
        raise UsageError(f"--resume: {out} holds no run to continue (no {R.CONFIG}); start it without --resume")
    return R.RunDir(out).read_config()


def _check_schedule(out: Path, cfg) -> None:
    """Refuse, before anything is written, a resume whose options cannot continue the newest
    checkpoint's learning-rate schedule (the trainer checks again on the checkpoint it loads)."""
    import json

    from nsru.checkpoint import STATE_FILE, latest_checkpoint
    from nsru.schedule import ScheduleError, check_resume

    folder = out / R.CHECKPOINTS
    found = latest_checkpoint(folder) if folder.is_dir() else None
    try:
        state = json.loads((found / STATE_FILE).read_text()) if found is not None else None
    except (OSError, ValueError):
        return  # unreadable: the trainer names it and falls back to an older checkpoint
    if state is not None:
        try:
            check_resume(state, cfg)
        except ScheduleError as e:
            raise UsageError(f"--resume {out}: {e}") from None


def _failed(run_dir: R.RunDir, error: BaseException, seconds: float) -> None:
    """Log the failure; keep the checkpointed history, or, before the first checkpoint of a new
    run, remove the run folder's files so the same command can run again."""
    kept = run_dir.history_from_checkpoint()
    if kept:
        run_dir.write_history(kept)
    run_dir.log(f"failed after {seconds:.1f}s: {type(error).__name__}: {error}"
                + (f"; history.jsonl holds the {len(kept)} checkpointed steps, --resume continues" if kept else ""))
    if run_dir.discard():
        print(f"nothing was checkpointed, so {run_dir.path} holds no run: the same command can run again", flush=True)


def _basis_report(result, bases) -> dict:
    """k and leakage per module; with ``--bases`` the subspace run's rule and statistics, and
    ``from: bases``."""
    from nsru.subspace import summarize_bases

    made = bases.meta if bases is not None else {"rule": result.config.subspace, "stats": result.config.stats}
    report = {"rule": made.get("rule"), "stats": made.get("stats"), **summarize_bases(result.bases_info),
              "modules": result.bases_info, "init": result.init_info}
    if bases is not None:
        report["from"] = "bases"
    return report
