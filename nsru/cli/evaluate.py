"""``nsru eval``: TOFU metrics, multiple-choice accuracy and perplexity of a model (with an adapter).

Metrics are :mod:`nsru.metrics`' (open-unlearning's definitions): on forget data probability,
ROUGE-L recall, truth ratio and safe-response rate; on retain and ``--general`` sets probability,
ROUGE-L recall and truth ratio, whose harmonic mean is model utility, and the false-refusal rate
(greedy answers that refuse a question the model should still answer); forget quality (with
``--retain-model``); WMDP-style accuracy (``--mc``, ``--benign-mc``); perplexity (``--text``);
and lm-eval-harness tasks (``--lm-eval``) when it is installed. A metric that cannot be computed
from what was given is printed as skipped, with the reason, and listed under ``skipped``.

``--audit`` audits the forget rows (``nsru.audit``): each fact asked forward, paraphrased, in
reverse, as a cloze, after solved examples (the retain and general rows), under role-play and
prefix injection, and open-ended; the merged model at 8 and 4 bits, the adapter on a 4-bit base,
the GGUF type a GGUF model shipped in; a relearning attack on half of the facts (``--audit-relearn``)
beside the same steps on the retain rows. Each is scored on the items the model knew with its
adapter disabled (without ``--adapter`` the model is its own before), and ``audited_forget_acc``
is the worst (highest) of them. The probes read the fact set's fields (``paraphrase``, ``choices``
+ ``correct`` or ``perturbed_answer``, ``reverse``, ``cloze``, ``subject``); a probe no row can
serve is skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from nsru.cli.common import (UsageError, adapter_folder, add_model_args, check_dtype_device, check_model_path,
                             load_mc, load_model, load_rows, named_files, read_config_file, writable_dir)

NAME = "eval"
DETAILS = "eval_details.json"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        NAME, help="evaluate a model or an adapter: TOFU metrics, multiple choice, perplexity, lm-eval tasks",
        description=__doc__.split("\n\n", 1)[1].replace("``", "").replace(":mod:", "").replace("`", ""),
        usage="nsru eval --model PATH [--adapter DIR] [--forget FILE] [--retain FILE] [--general NAME=FILE] "
              "[--retain-model PATH] [--mc FILE] [--benign-mc NAME=FILE] [--text FILE] [--lm-eval TASKS] "
              "[--audit] [--out DIR]")
    add_model_args(p)
    p.add_argument("--adapter", metavar="DIR", help="an adapter folder (NSRU or PEFT) or a run folder of "
                                                    "`nsru unlearn`; without it the model is scored as it is")
    p.add_argument("--forget", metavar="FILE", help="forget question-answer rows (TOFU fields)")
    p.add_argument("--retain", metavar="FILE", help="retain question-answer rows (count toward model utility)")
    p.add_argument("--general", metavar="NAME=FILE", action="append",
                   help="more question-answer sets that count toward model utility (repeatable)")
    p.add_argument("--retain-model", metavar="PATH", help="a model never trained on the forget data (TOFU's retain "
                                                          "model): forget quality = KS test of the truth ratios")
    p.add_argument("--mc", metavar="FILE", help="hazardous multiple-choice rows (question, choices, answer index)")
    p.add_argument("--benign-mc", metavar="NAME=FILE", action="append",
                   help="benign multiple-choice sets (repeatable)")
    p.add_argument("--text", metavar="FILE", help="text corpus (text field, or .txt lines) for perplexity")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval-harness tasks (needs `pip install "
                                                      "lm-eval`, and its data sets)")
    p.add_argument("--audit", action="store_true",
                   help="audit the --forget rows: adversarial probes, quantisation, relearning; the worst of them")
    p.add_argument("--audit-quant", metavar="LIST", default="int8,int4,int4_base,gguf",
                   help="quantisations the audit tries: int8, int4, int4_base, gguf (the model's own GGUF type), "
                        "gguf:TYPE; 'none' for none (default: all four)")
    p.add_argument("--audit-relearn", metavar="STEPS:LR,...", default="20:5e-5,20:2e-4",
                   help="relearning attacks (fine-tuning steps and learning rate each); 'none' for none "
                        "(default 20:5e-5,20:2e-4)")
    p.add_argument("--audit-layers", metavar="LAYERS",
                   help="blocks the relearning attack fine-tunes, e.g. 20-29 (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="greedy answer length for ROUGE, safe rate and false-refusal rate")
    p.add_argument("--out", metavar="DIR", help="write metrics.json (its 'eval' section; a run folder keeps its "
                                                "'train' section) and eval_details.json here")
    p.add_argument("--config", metavar="YAML", help="config file whose run: section gives --model (and dtype, device)")
    return p


def run(args, overrides: dict) -> int:
    if overrides:
        raise UsageError(f"nsru eval takes no key=value options (got {', '.join(overrides)})")
    file_run, _ = read_config_file(args.config)
    pick = lambda key: getattr(args, key, None) if getattr(args, key, None) is not None else file_run.get(key)  # noqa: E731
    model = check_model_path(pick("model"))
    check_dtype_device(pick("dtype"), pick("device"))
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    if not any((args.forget, args.retain, args.general, args.mc, args.benign_mc, args.text, args.lm_eval)):
        raise UsageError("nothing to evaluate: give --forget, --retain, --general, --mc, --benign-mc, --text or "
                         "--lm-eval")
    adapter = adapter_folder(args.adapter) if args.adapter else None
    retain_model = check_model_path(args.retain_model, "--retain-model") if args.retain_model else None
    sets = {"forget": load_rows(args.forget, "--forget"), "retain": load_rows(args.retain, "--retain")}
    general = {name: load_rows(spec, f"--general {name}") for name, spec in named_files(args.general, "--general").items()}
    for name, rows in [*sets.items(), *general.items()]:
        if rows is not None and "question" not in rows[0]:
            raise UsageError(f"the {name} set has text rows; the TOFU metrics need question/answer rows")
    if retain_model and sets["forget"] is None:
        raise UsageError("--retain-model is for forget quality: give --forget too")
    if retain_model and not all(r.get("paraphrased_answer") and r.get("perturbed_answer") for r in sets["forget"]):
        raise UsageError("forget quality (--retain-model) needs paraphrased_answer and perturbed_answer in every "
                         "forget row (TOFU's *_perturbed splits have them)")
    hazard = load_mc(args.mc, "--mc") if args.mc else None
    benign = {name: load_mc(spec, f"--benign-mc {name}") for name, spec in named_files(args.benign_mc, "--benign-mc").items()}
    text = load_rows(args.text, "--text") if args.text else None
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else []
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--lm-eval needs lm-eval-harness: pip install lm-eval")
    audit = _audit_settings(args, sets) if args.audit else None
    out = writable_dir(args.out) if args.out else None

    started = time.perf_counter()
    retain_tr = None
    if retain_model is not None:  # the retain model's forget-set truth ratios, for forget quality
        from nsru import metrics as M

        ref, ref_tok = load_model(retain_model, dtype=pick("dtype"), device=pick("device"),
                                  trust_remote_code=bool(pick("trust_remote_code")))
        retain_tr = M.truth_ratio(ref, ref_tok, sets["forget"], batch_size=args.batch_size)["values"]
        del ref
    lm, tok = load_model(model, tokenizer=pick("tokenizer"), dtype=pick("dtype"), device=pick("device"),
                         trust_remote_code=bool(pick("trust_remote_code")))
    if adapter is not None:
        lm = _with_adapter(lm, *adapter)
    report, details = _evaluate(lm, tok, sets, general, hazard, benign, text, retain_tr, args)
    if audit is not None:
        _audit(lm, tok, sets, general, audit, args, report, details)
    if tasks:
        report["lm_eval"] = _lm_eval(lm, tok, tasks, args.batch_size)
    report["seconds"] = time.perf_counter() - started
    report["model"] = model
    report["adapter"] = str(adapter[0]) if adapter else None

    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key:24s} {value:.4g}")
        elif key == "worst_probe" and value is not None:
            print(f"{key:24s} {value}")
    for key, why in report["skipped"].items():
        print(f"skipped: {key} ({why})")
    if out is not None:
        from nsru.cli.rundir import RunDir

        run_dir = RunDir(out, echo=False)
        run_dir.update_metrics("eval", report)
        run_dir.write_json(DETAILS, details)
        print(f"wrote {out / 'metrics.json'} and {out / DETAILS}")
    return 0


def _with_adapter(model, folder: Path, kind: str):
    if kind == "peft":
        import peft

        return peft.PeftModel.from_pretrained(model, str(folder)).eval()
    from nsru.adapt import load_adapter

    try:
        load_adapter(model, folder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return model.eval()


# Why a metric was skipped, in this command's words (its flags), where the entry's words differ.
NOT_GIVEN = {"false_refusal": "no --retain or --general questions given",
             "model_utility": "no --retain or --general questions given",
             "forget_quality": "no --retain-model given"}


def _evaluate(model, tok, sets, general, hazard, benign, text, retain_tr, args) -> tuple[dict, dict]:
    """:func:`nsru.evaluation.evaluate_tofu` on the question-answer sets given,
    :func:`nsru.evaluation.evaluate_wmdp` on the multiple-choice ones, perplexity on the text: the
    report (metrics left out where they could not be computed; ``skipped`` says why) and the
    per-row details (generations, refusals, truth ratios)."""
    from nsru import evaluation as E
    from nsru import metrics as M

    bs = args.batch_size
    report, details, skipped, quality = {}, {}, {}, None
    if sets["forget"] is not None or sets["retain"] is not None or general:
        tofu = E.evaluate_tofu(model, tok, sets["forget"], sets["retain"], general, retain_tr_values=retain_tr,
                               max_new_tokens=args.max_new_tokens, batch_size=bs, progress=False, details=details)
        skipped = tofu.pop("skipped")
        quality = tofu.pop("forget_quality", None)
        per_row = ("forget_tr_values", "forget_generations")  # in details
        report = {k: v for k, v in tofu.items() if v is not None and k not in per_row}
        for key, why in NOT_GIVEN.items():
            if key in skipped and (key != "forget_quality" or retain_tr is None):
                skipped[key] = why
    if hazard is not None or benign:
        report.update(E.evaluate_wmdp(model, tok, hazard, benign or None, batch_size=bs, progress=False))
    if text is not None:
        report["perplexity"] = M.perplexity(model, tok, [r["text"] for r in text], batch_size=max(1, bs // 2))
    report["skipped"] = skipped
    if quality is not None:
        report["forget_quality"] = quality
    return report, details


def _audit_settings(args, sets) -> dict:
    """The audit's options from the flags, checked before any model loads."""
    if sets["forget"] is None:
        raise UsageError("--audit audits the forget facts: give --forget")
    if "question" not in sets["forget"][0]:
        raise UsageError("--audit needs question-answer rows in --forget")
    from nsru.audit import QUANT

    quant = [] if args.audit_quant.strip() == "none" else [q.strip() for q in args.audit_quant.split(",") if q.strip()]
    for q in quant:
        if q not in QUANT and not (q.startswith("gguf:") and len(q) > 5):
            raise UsageError(f"--audit-quant: unknown quantisation {q!r}; choose from {', '.join(QUANT)} or gguf:TYPE")
    relearn = {}
    if args.audit_relearn.strip() != "none":
        for i, spec in enumerate(filter(None, (x.strip() for x in args.audit_relearn.split(",")))):
            steps, colon, lr = spec.partition(":")
            try:
                pair = (int(steps), float(lr))
            except ValueError:
                pair = None
            if not colon or pair is None or pair[0] < 1 or not pair[1] > 0:
                raise UsageError(f"--audit-relearn: {spec!r} is not STEPS:LR with STEPS >= 1 and LR > 0 (e.g. 20:5e-5)")
            relearn[str(i + 1)] = pair
    if args.audit_layers is not None:
        from nsru.adapt import parse_layers

        try:
            parse_layers(args.audit_layers)
        except ValueError as e:
            raise UsageError(f"--audit-layers: {e}") from None
    return {"quant": quant, "relearn": relearn, "relearn_layers": args.audit_layers}


def _audit(model, tok, sets, general, settings, args, report: dict, details: dict) -> None:
    """:func:`nsru.audit.audit` of the forget rows into ``report`` (accuracies, ``audited_forget_acc``,
    ``worst_probe``; its skipped probes as ``<probe>_acc`` in ``skipped``) and ``details`` (which
    items were known before, how many each accuracy counts)."""
    from nsru.audit import audit

    kept = [*(sets["retain"] or []), *(r for rows in general.values() for r in rows)]
    found = audit(model, tok, sets["forget"], retain=sets["retain"], examples=kept, false_refusals=False,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **settings)
    for key in ("counts", "known", "seconds"):
        details[f"audit_{key}"] = found.pop(key)
    for name, why in found.pop("skipped").items():
        report["skipped"][f"{name}_acc"] = why
    report.update({k: v for k, v in found.items() if v is not None})


def _lm_eval(model, tok, tasks: list[str], batch_size: int) -> dict:
    """lm-eval-harness's scores of ``tasks`` on the in-memory model (``lm_eval.simple_evaluate``)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=tasks)
    return json.loads(json.dumps(results.get("results", {}), default=str))
