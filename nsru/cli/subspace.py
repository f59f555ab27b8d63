"""``nsru subspace``: the retain statistics and bases of a model, without training.

Writes the bases folder of :mod:`nsru.subspace` to ``--out``: ``bases.safetensors`` (the retain
basis U, in × k, of every group of modules that read the same tensor, under the group's first module
name), ``moments.safetensors`` (the input second moments they came from, one per group, as a sum and
a count: each statistics source's mean counts once), ``subspace.json`` (modules, groups, rule, data)
and ``basis_report.json`` (k and leakage per module). ``nsru unlearn --bases OUT`` (and
``nsru.unlearn(..., bases=OUT)``) trains on these bases instead of collecting the statistics again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nsru.cli.common import (UsageError, add_model_args, build_config, check_dtype_device, check_model_path,
                             load_model, load_rows, options_help, read_config_file, wrap, writable_dir)

NAME = "subspace"
# The UnlearnConfig options this command uses; the others are accepted (one config file serves
# `nsru subspace` and `nsru unlearn`) and ignored.
USED = ("target_modules", "layers", "subspace", "stats", "stats_tokens", "stats_avoid", "self_samples",
        "self_max_new_tokens", "max_length", "seed", "progress")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="retain statistics and bases only (reused by `nsru unlearn --bases`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=wrap("Collect the input statistics of the modules that would get adapters, on the statistics data "
                    "(stats=..., default the retain set), and write their retain bases with a report of k and "
                    "leakage per module. Nothing is trained."),
        usage="nsru subspace --model PATH --retain FILE --out DIR [--forget FILE] [--config YAML] [key=value ...]",
        epilog="key=value options used here (any other `nsru unlearn` option is accepted and ignored):\n"
               + options_help(USED))
    add_model_args(p)
    p.add_argument("--retain", metavar="FILE", help="retain data (JSON/JSONL with question/answer or text, or a "
                                                    "datasets name); the default statistics source")
    p.add_argument("--forget", metavar="FILE", help="forget data: its subjects are kept out of stats=self samples, "
                                                    "and the report gives the leakage on it")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the bases and the report")
    p.add_argument("--config", metavar="YAML", help="config file (sections run: and unlearn:)")
    return p


def run(args, overrides: dict) -> int:
    file_run, file_unlearn = read_config_file(args.config)
    cfg = build_config(file_unlearn, overrides, args.config or "")
    pick = lambda key: getattr(args, key, None) if getattr(args, key, None) is not None else file_run.get(key)  # noqa: E731
    model = check_model_path(pick("model"))
    check_dtype_device(pick("dtype"), pick("device"))
    retain = load_rows(pick("retain"), "--retain")
    forget = load_rows(pick("forget"), "--forget")
    if retain is None and cfg.needs_retain_data() is not None:
        raise UsageError("--retain is required: the statistics come from the retain data (stats=retain); "
                         "or name other data with stats=self or stats=FILE")
    from nsru.subspace import BASES_FILE

    out = Path(args.out)
    if (out / BASES_FILE).exists():
        raise UsageError(f"--out {out} already holds bases ({BASES_FILE}); choose another --out")
    writable_dir(out)

    lm, tok = load_model(model, tokenizer=pick("tokenizer"), dtype=pick("dtype"), device=pick("device"),
                         trust_remote_code=bool(pick("trust_remote_code")))
    meta, report = compute_and_save(lm, tok, cfg, retain, forget, out, model_name=model)
    print(f"{len(meta['modules'])} modules, {len(set(meta['groups'].values()))} statistics; mean k "
          f"{report['mean_k']:.1f}, mean leakage {report['mean_leakage']:.4f} ({cfg.subspace}); wrote {out}")
    return 0


def compute_and_save(model, tokenizer, cfg, retain, forget, out: Path, model_name: str | None = None) -> tuple[dict, dict]:
    """Add adapters with r=1 (only their hooks matter), fit the retain bases, write the bases folder."""
    from nsru.adapt import apply_nsru
    from nsru.stats_sources import encode_rows
    from nsru.subspace import save_bases, summarize_bases
    from nsru.pipeline import fit_retain_bases

    apply_nsru(model, target_modules=cfg.target_modules, r=1, alpha=1.0, layers=cfg.layers)
    encode = lambda rows: encode_rows(rows, tokenizer, cfg.max_length) if rows is not None else None  # noqa: E731
    fit = fit_retain_bases(model, tokenizer, cfg, retain_rows=retain, forget_rows=forget or [], retain=encode(retain),
                           forget=encode(forget), progress=cfg.progress, keep_moments=True)
    report = {"rule": cfg.subspace, "stats": fit.sources, **summarize_bases(fit.modules), "modules": fit.modules}
    meta = {"model": model_name, "rule": cfg.subspace, "target_modules": cfg.target_modules, "layers": cfg.layers,
            "stats": cfg.stats, "stats_tokens": cfg.stats_tokens, "max_length": cfg.max_length, "sources": fit.sources}
    save_bases(out, model, fit.moments, meta, report)
    return {**meta, "modules": list(fit.modules), "groups": dict(fit.moments.groups)}, report
