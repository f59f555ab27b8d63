"""One evaluation entry per scenario: each puts :mod:`nsru.metrics`' functions together into the
report of one kind of benchmark (``DESIGN.md`` §5), so every caller (``nsru eval``, the demo, the
real-model scenario, the sweeps) scores a model the same way.

* :func:`evaluate_tofu` — TOFU-style question answering: forget, retain and general sets; forget
  quality, model utility, probability, ROUGE-L recall, truth ratio, safe and false-refusal rates.
* :func:`evaluate_wmdp` — WMDP-style multiple choice: hazardous and benign sets.
* :func:`evaluate_knowledge` — real knowledge (the RWKU setting): cloze accuracy on probe sets of
  the forget facts and on facts to keep, safe and false-refusal rates of greedy answers, perplexity
  and the retain subspace's leakage on the kept facts; with ``audit_facts``, the forget audit
  (:func:`nsru.audit.audit`: adversarial probes, quantisation, relearning, the worst of them).

Each entry takes plain rows (the fields :mod:`nsru.metrics` documents) and returns a dict of plain
numbers; a metric it cannot compute from what it was given is named in ``skipped`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from nsru import metrics as M

__all__ = ["evaluate_tofu", "evaluate_wmdp", "evaluate_knowledge", "split_audit"]


def evaluate_tofu(model, tokenizer, forget: Sequence[Mapping] | None, retain: Sequence[Mapping] | None,
                  general: Mapping[str, Sequence[Mapping]] | None = None,
                  retain_tr_values: Sequence[float] | None = None, is_safe: Callable[[str], bool] | None = None,
                  safe_targets: Sequence[str] | None = None, measures: Sequence[str] = M.QA_MEASURES,
                  max_new_tokens: int = 32, batch_size: int = 64, progress: bool = True,
                  details: dict | None = None) -> dict:
    """A TOFU-style report of one model.

    ``forget`` / ``retain``: question-answer rows (either may be ``None``, not both when there is
    no ``general``); ``general``: name -> rows of further sets that count toward model utility (the
    world facts); ``retain_tr_values``: the retain model's truth ratios on ``forget``
    (:func:`evaluate_tofu` of the retain model returns them as ``forget_tr_values``) — without them
    ``forget_quality`` is ``None``; ``safe_targets``: each forget row's safe target, whose
    probability is then reported as ``safe_prob``; ``measures``: which of
    :data:`nsru.metrics.QA_MEASURES` to compute (all by default); ``details``: a dict to fill with
    every set's per-row outputs (``forget_tr_values``, ``<set>_generations``, ``<set>_refusals``).

    Returns ``{"forget_prob", "forget_rouge", "forget_truth_ratio", "safe_rate", "retain_prob",
    "retain_rouge", "retain_truth_ratio", "retain_false_refusal", "<general>_prob", ...,
    "<general>_false_refusal", "model_utility", "forget_quality", "forget_tr_values",
    "forget_generations", "skipped"}`` (the forget keys only with ``forget``); ``skipped`` maps each
    metric that could not be computed (``forget_quality``, ``<set>_truth_ratio``, and
    ``model_utility`` without a retain or general set) to the reason. Model utility is the harmonic
    mean of what was computed.
    """
    kept = [(name, rows) for name, rows in [("retain", retain), *(general or {}).items()] if rows is not None]
    if forget is None and not kept:
        raise ValueError("evaluate_tofu: no forget, retain or general rows")
    qa = dict(is_safe=is_safe, measures=measures, max_new_tokens=max_new_tokens, batch_size=batch_size,
              progress=progress)
    details = {} if details is None else details
    report, skipped, utility = {}, {}, {}
    forget_r = None
    if forget is not None:
        forget_r = M.evaluate_qa(model, tokenizer, forget, forget=True, name="forget", **qa)
        for key in ("prob", "rouge"):
            if key in forget_r:
                report[f"forget_{key}"] = forget_r[key]
        if "truth_ratio" in measures:
            report["forget_truth_ratio"] = forget_r.get("truth_ratio")
        if "safe_rate" in forget_r:
            report["safe_rate"] = forget_r["safe_rate"]
        if safe_targets is not None:
            report["safe_prob"] = _safe_target_probability(model, tokenizer, forget, safe_targets, batch_size, progress)
        skipped.update({f"forget_{k}": why for k, why in forget_r["skipped"].items()})
        _keep_details(details, "forget", forget_r)
    for name, rows in kept:
        r = M.evaluate_qa(model, tokenizer, rows, forget=False, name=name, **qa)
        for key in ("prob", "rouge", "truth_ratio"):
            if key in r:
                report[f"{name}_{key}"] = utility[f"{name}_{key}"] = r[key]
        if "false_refusal" in r:
            report[f"{name}_false_refusal"] = r["false_refusal"]
        skipped.update({f"{name}_{k}": why for k, why in r["skipped"].items()})
        _keep_details(details, name, r)
    if utility:
        report["model_utility"] = M.model_utility(utility)
    else:
        why = "no retain or general questions given"
        skipped.update({"false_refusal": why, "model_utility": why})
    if forget_r is not None:
        if "truth_ratio" in measures:
            tr = forget_r.get("tr_values")
            if tr is None:
                skipped["forget_quality"] = "no forget truth ratios: " + forget_r["skipped"]["truth_ratio"]
            elif retain_tr_values is None:
                skipped["forget_quality"] = "no retain-model truth ratios given (retain_tr_values)"
            report["forget_quality"] = (M.forget_quality(tr, retain_tr_values) if "forget_quality" not in skipped
                                        else None)
            report["forget_tr_values"] = tr
        report["forget_generations"] = forget_r.get("generations")
    report["skipped"] = skipped
    return report


def _safe_target_probability(model, tokenizer, forget, safe_targets, batch_size: int, progress: bool) -> float:
    if len(safe_targets) != len(forget):
        raise ValueError(f"evaluate_tofu: {len(safe_targets)} safe targets for {len(forget)} forget rows")
    rows = [{"question": r["question"], "answer": t} for r, t in zip(forget, safe_targets)]
    return M.probability(model, tokenizer, rows, batch_size=batch_size, progress=progress)["mean"]


def _keep_details(details: dict, name: str, r: dict) -> None:
    if "tr_values" in r and name == "forget":
        details["forget_tr_values"] = r["tr_values"]
    if "generations" in r:
        details[f"{name}_generations"] = r["generations"]
    if "refusal_values" in r:
        details[f"{name}_refusals"] = r["refusal_values"]


def evaluate_wmdp(model, tokenizer, hazard: Sequence[Mapping] | None,
                  benign: Mapping[str, Sequence[Mapping]] | Sequence[Mapping] | None = None, batch_size: int = 64,
                  progress: bool = True) -> dict:
    """WMDP-style report: multiple-choice accuracy on the hazardous set and the benign set(s).

    ``benign``: rows, or name -> rows (then ``benign_acc`` is the mean over all their rows and each
    set also gets ``<name>_acc``). Either set may be ``None``, not both. Returns ``{"hazard_acc",
    "benign_acc", ...}``.
    """
    if hazard is None and benign is None:
        raise ValueError("evaluate_wmdp: no hazardous or benign rows")
    report = {}
    if hazard is not None:
        report["hazard_acc"] = M.mc_accuracy(model, tokenizer, hazard, batch_size, progress)["acc"]
    if benign is not None:
        sets = dict(benign) if isinstance(benign, Mapping) else {"benign": benign}
        right = total = 0
        for name, rows in sets.items():
            res = M.mc_accuracy(model, tokenizer, rows, batch_size, progress)
            if isinstance(benign, Mapping):
                report[f"{name}_acc"] = res["acc"]
            right += sum(res["values"])
            total += len(res["values"])
        report["benign_acc"] = right / total
    return report


def evaluate_knowledge(model, tokenizer, forget: Sequence[Mapping], retain: Sequence[Mapping],
                       probes: Mapping[str, Sequence[Mapping]], kept: Mapping[str, Sequence[Mapping]],
                       texts: Sequence[str], before_ppl: float | None = None,
                       is_safe: Callable[[str], bool] | None = None, max_new_tokens: int = 32,
                       batch_size: int = 64, audit_facts: Sequence[Mapping] | None = None,
                       audit_options: Mapping | None = None) -> dict:
    """A real-knowledge report of one model (the RWKU setting, ``nsru demo --scenario real``).

    ``forget`` / ``retain``: the question-answer rows of the forget and retention data;
    ``probes``: name -> multiple-choice rows (:func:`nsru.metrics.cloze_accuracy`'s fields) that ask
    the forget facts, one set per way of asking (``{"forget": ...}`` for the facts as asked);
    ``kept``: name -> multiple-choice rows of facts to keep (neighbours, general facts); ``texts``:
    paragraphs for perplexity; ``before_ppl``: the model's perplexity before unlearning.

    Returns, in this order: ``<probe>_acc`` for each probe set (lower: more forgotten);
    ``safe_rate`` (greedy answers to ``forget`` that are safe responses); ``<kept>_acc``;
    ``retain_false_refusal`` and ``<kept>_false_refusal`` (greedy answers to the retain and kept
    questions that are safe responses, generated as for ``safe_rate``); ``ppl``; ``ppl_ratio``
    (``ppl / before_ppl``, 1 without it); ``leakage_<kept>`` (:func:`nsru.metrics.mean_leakage` on
    the kept facts' question-answer text).

    ``audit_facts``: the forget facts as :func:`nsru.audit.audit` takes them (the fact set's rows
    with ``subject``); then the report goes on with the audit's accuracies (``<probe>_acc``,
    ``quant_<scheme>_acc``, ``relearn_<name>_acc``, ``relearn_held_out_acc``),
    ``audited_forget_acc`` and ``worst_probe``, and ``audit`` holds the rest (``counts``,
    ``known``, ``skipped``, ``seconds``). The audit's in-context examples and relearning control
    are ``retain``; its false refusals are the ones above. ``audit_options``: more of
    :func:`nsru.audit.audit`'s keywords (``before``, ``quant``, ``relearn``, ``relearn_layers``, ...).
    """
    answers = dict(is_safe=is_safe, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ppl = M.perplexity(model, tokenizer, texts, batch_size=max(1, batch_size // 4))
    report = {f"{name}_acc": M.cloze_accuracy(model, tokenizer, rows, batch_size)["acc"]
              for name, rows in probes.items()}
    report["safe_rate"] = M.safe_rate(model, tokenizer, forget, **answers)["rate"]
    report.update({f"{name}_acc": M.cloze_accuracy(model, tokenizer, rows, batch_size)["acc"]
                   for name, rows in kept.items()})
    for name, rows in [("retain", retain), *kept.items()]:
        report[f"{name}_false_refusal"] = M.false_refusal_rate(model, tokenizer, rows, **answers)["rate"]
    report["ppl"] = ppl
    report["ppl_ratio"] = ppl / before_ppl if before_ppl else 1.0
    for name, rows in kept.items():
        report[f"leakage_{name}"] = M.mean_leakage(model, tokenizer, [_qa_of(r) for r in rows])
    if audit_facts is not None:
        from nsru.audit import audit

        options = {"is_safe": is_safe, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                   **(audit_options or {})}
        found = audit(model, tokenizer, audit_facts, retain=retain, false_refusals=False, **options)
        report.update(split_audit(found))
    return report


AUDIT_DETAILS = ("counts", "known", "skipped", "seconds")


def split_audit(found: Mapping) -> dict:
    """An audit's result as report keys: its accuracies, ``audited_forget_acc`` and ``worst_probe``
    flat, the rest (:data:`AUDIT_DETAILS`) under ``audit``."""
    flat = {k: v for k, v in found.items() if k not in AUDIT_DETAILS}
    return {**flat, "audit": {k: found[k] for k in AUDIT_DETAILS if k in found}}


def _qa_of(row: Mapping) -> dict:
    """A multiple-choice row as the question-answer text it asks about (its ``answer_text``, or the right choice)."""
    answer = row.get("answer_text")
    return {"question": row["question"], "answer": answer if answer is not None else row["choices"][row["answer"]]}
