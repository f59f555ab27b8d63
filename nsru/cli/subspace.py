"""``nsru subspace``: the retain statistics and bases of a model, without training.

Writes to ``--out``: ``bases.safetensors`` (the retain basis U, in × k, of every group of modules
that read the same tensor, under the group's first module name),
``moments.safetensors`` (the input second moments they came from, one per group of modules that
read the same tensor, as a sum and a count: each statistics source's mean counts once), ``subspace.json`` (modules, groups, rule, data) and
``basis_report.json`` (k and leakage per module). ``nsru unlearn --bases OUT`` trains on these
bases instead of collecting the statistics again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nsru.cli.common import (UsageError, add_model_args, build_config, check_dtype_device, check_model_path,
                             load_model, load_rows, options_help, read_config_file, wrap, writable_dir)

NAME = "subspace"
FORMAT = "nsru-subspace"
BASES = "bases.safetensors"
MOMENTS = "moments.safetensors"
META = "subspace.json"
REPORT = "basis_report.json"
# The UnlearnConfig options this command uses; the others are accepted (one config file serves
# `nsru subspace` and `nsru unlearn`) and ignored.
USED = ("target_modules", "layers", "subspace", "stats", "stats_tokens", "self_samples", "self_max_new_tokens",
        "max_length", "seed", "progress")


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
    out = Path(args.out)
    if (out / BASES).exists():
        raise UsageError(f"--out {out} already holds bases ({BASES}); choose another --out")
    writable_dir(out)

    lm, tok = load_model(model, tokenizer=pick("tokenizer"), dtype=pick("dtype"), device=pick("device"),
                         trust_remote_code=bool(pick("trust_remote_code")))
    meta, report = compute_and_save(lm, tok, cfg, retain, forget, out, model_name=model)
    print(f"{len(meta['modules'])} modules, {len(set(meta['groups'].values()))} statistics; mean k "
          f"{report['mean_k']:.1f}, mean leakage {report['mean_leakage']:.4f} ({cfg.subspace}); wrote {out}")
    return 0


def compute_and_save(model, tokenizer, cfg, retain, forget, out: Path, model_name: str | None = None,
                     **meta_extra) -> tuple[dict, dict]:
    """Add rank-1 adapters (only their hooks matter), collect the statistics, write the files."""
    from safetensors.torch import save_file

    from nsru.adapt import apply_nsru
    from nsru.atomic import atomic_write
    from nsru.data import input_batches, pad_token_id
    from nsru.layer import model_device
    from nsru.stats_sources import collect_statistics, describe, encode_rows, stats_encodings
    from nsru.subspace import leakage, retain_subspaces, set_retain_bases

    layers = apply_nsru(model, target_modules=cfg.target_modules, r=1, alpha=1.0, layers=cfg.layers)
    device, pad = model_device(model), pad_token_id(tokenizer)
    encoded = stats_encodings(
        cfg.stats_sources(has_retain=retain is not None), model=model, tokenizer=tokenizer, retain_rows=retain, forget_rows=forget or [],
        max_length=cfg.max_length, tokens=cfg.stats_tokens, self_samples=cfg.self_samples,
        self_max_new_tokens=cfg.self_max_new_tokens, seed=cfg.seed)
    sources = describe(encoded)
    moments, batches = collect_statistics(model, encoded, lambda enc: input_batches(enc, pad, device))
    subspaces = retain_subspaces(moments, cfg.subspace_rule)
    set_retain_bases(model, {n: s.basis for n, s in subspaces.items()})

    leaks = {"leakage": leakage(model, batches, progress=False)}
    if retain is not None and sources.keys() != {"retain"}:
        batches = input_batches(encode_rows(retain, tokenizer, cfg.max_length), pad, device)
        leaks["leakage_retain"] = leakage(model, batches, progress=False)
    if forget is not None:
        batches = input_batches(encode_rows(forget, tokenizer, cfg.max_length), pad, device)
        leaks["leakage_forget"] = leakage(model, batches, progress=False)
    modules = {name: {"k": layer.k, "in_features": layer.in_features, "capped": subspaces[name].capped,
                      **{key: values[name] for key, values in leaks.items()}} for name, layer in layers.items()}
    report = {"rule": cfg.subspace, "stats": sources, **summarize(modules), "modules": modules}
    meta = {"format": FORMAT, "version": 1, "model": model_name, "rule": cfg.subspace,
            "target_modules": cfg.target_modules, "layers": cfg.layers, "stats": cfg.stats,
            "stats_tokens": cfg.stats_tokens, "max_length": cfg.max_length, "sources": sources,
            "modules": list(layers), "groups": dict(moments.groups), **meta_extra}

    # One tensor per group: q/k/v (and gate/up) read the same input and share one basis.
    bases = {key: layers[key].retain_basis.detach().cpu().contiguous() for key in set(moments.groups.values())}
    sums = {}
    for key in moments.sums:
        sums[f"{key}.sum"] = moments.sums[key].detach().cpu().contiguous()
        sums[f"{key}.tokens"] = moments.tokens[key].detach().cpu().reshape(1).contiguous()
    atomic_write(out / BASES, lambda p: save_file(bases, str(p), metadata={"format": "pt"}))
    atomic_write(out / MOMENTS, lambda p: save_file(sums, str(p), metadata={"format": "pt"}))
    _write_json(out / META, meta)
    _write_json(out / REPORT, report)
    return meta, report


def summarize(modules: dict) -> dict:
    ks = [m["k"] for m in modules.values()]
    leaks = [m["leakage"] for m in modules.values() if m.get("leakage") is not None]
    return {"modules_count": len(modules), "mean_k": sum(ks) / len(ks) if ks else 0.0,
            "mean_leakage": sum(leaks) / len(leaks) if leaks else None}


def _write_json(path: Path, data) -> None:
    import json

    from nsru.atomic import atomic_write

    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_bases(folder: str | Path, flag: str = "--bases") -> tuple[dict, dict, dict]:
    """``(meta, bases, report)`` of a folder written by ``nsru subspace``; checked, not applied."""
    import json

    folder = Path(folder)
    meta_file = folder / META
    if not meta_file.is_file() or not (folder / BASES).is_file():
        raise UsageError(f"{flag} {folder}: not a folder written by `nsru subspace` (no {META} / {BASES})")
    try:
        meta = json.loads(meta_file.read_text())
        report = json.loads((folder / REPORT).read_text()) if (folder / REPORT).is_file() else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"{meta_file}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{meta_file}: not an nsru subspace file (format {meta.get('format')!r})")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        bases = load_file(str(folder / BASES))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{folder / BASES}: cannot read ({e})") from None
    groups = meta.get("groups", {})
    missing = [n for n in meta["modules"] if groups.get(n, n) not in bases]
    if missing:
        raise UsageError(f"{folder / BASES}: no basis for module {missing[0]!r}")
    return meta, {n: bases[groups.get(n, n)] for n in meta["modules"]}, report
