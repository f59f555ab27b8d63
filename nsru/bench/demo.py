"""``nsru demo``: NSRU, the baselines and the ablations on the offline world, in two scenarios.

* **TOFU-style**: forget the ``forget10`` people from their question-answer rows, keep the rest
  (``retain90`` is the retain data). Reported: forget quality (KS p-value of the forget-set truth
  ratios against the retain model's), model utility (retain and world-facts probability, ROUGE and
  truth ratio, harmonic mean), forget ROUGE / probability, retain ROUGE, safe-response rate on the
  forget questions, and ``false_refusal``: the retain questions whose greedy answer is a refusal
  (``world_facts_false_refusal`` the same on the world facts, in ``results.json``).
* **WMDP-style**: forget the hazardous domain from its questions (``domain_qa("hazard")``), with
  the same retain data; reported: 4-choice accuracy on the hazardous and the benign domains. The
  benign domains and the world facts are evaluation-only: never in any retention loss or statistic.

Every method gets the same model, data, steps, batch size and learning rate (the defaults of
:class:`nsru.config.UnlearnConfig`); nothing is tuned per method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nsru import evaluation as E
from nsru import metrics as M
from nsru.bench import report
from nsru.bench.models import ModelConfig, TrainConfig, default_threads, target_models
from nsru.bench.world import UNKNOWN_ANSWERS, WorldConfig, make_world

METHODS = (
    "nsru", "ga", "graddiff", "npo", "simnpo", "idkdpo", "rmu",
    "nsru-no-safe", "nsru-no-suppress", "nsru-no-retain", "nsru-no-project",
)
REFERENCES = ("finetuned", "retain")
# The unlearning budget every method gets (batch size and the rest: UnlearnConfig's defaults).
STEPS = 60
QUICK_STEPS = 20
QUICK_STATS_TOKENS = 8192  # about 256 of the 900 retain rows
LR = 3e-3
# Safe targets in the refusal wording the target models already use for people they do not know
# (the sweep measured held-out 0.55 with these against 0.18 with wording the model never saw).
SAFE_TEMPLATES = tuple(t.replace("{name}", "{subject}") for t in UNKNOWN_ANSWERS)
KEYS = ("forget_quality", "model_utility", "forget_rouge", "forget_prob", "retain_rouge", "safe_rate",
        "false_refusal", "world_facts_false_refusal", "hazard_acc", "benign_acc", "seconds")


def _load(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # One "Loading weights" bar per load made 52 of them in a demo's output.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model.eval()
    return model


def check_budget(seeds: int, steps: int | None, lr: float | None, methods) -> None:
    """Raise ``ValueError`` for a budget or method list that cannot run, before any work."""
    from nsru.methods import get_method

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not methods:
        raise ValueError("methods is empty")
    for name in methods:
        get_method(name)  # ValueError naming the known methods


def _tofu_report(model, tok, sets, retain_tr):
    rep = E.evaluate_tofu(model, tok, sets["forget"], sets["retain_eval"], {"world_facts": sets["world_facts"]},
                          retain_tr_values=retain_tr, progress=False)
    rep["false_refusal"] = rep["retain_false_refusal"]
    return rep


def _wmdp_report(model, tok, sets):
    return E.evaluate_wmdp(model, tok, sets["hazard_mc"], sets["benign_mc"], progress=False)


def run_demo(out="nsru-demo", seeds: int = 1, quick: bool = False, methods=METHODS, cache=None,
             steps: int | None = None, lr: float | None = None, world: WorldConfig | None = None,
             model: ModelConfig | None = None, train: TrainConfig | None = None, options: dict | None = None,
             log=print) -> dict:
    """Run both scenarios for ``methods`` over ``seeds`` seeds; write ``results.json`` and
    ``forget_quality_vs_utility.png`` under ``out``; return the results dict.

    ``steps`` / ``lr``: the unlearning budget every method gets (defaults: :data:`STEPS`,
    :data:`QUICK_STEPS`, :data:`LR`); ``world`` / ``model`` / ``train``: the benchmark's settings
    (defaults: the shipped ones; tests pass tiny ones); ``options``: further ``nsru.unlearn`` options
    for every method (e.g. ``{"stats": "self"}``).
    """
    from nsru.pipeline import unlearn

    check_budget(seeds, steps, lr, methods)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(default_threads())
    world_cfg = world or WorldConfig()
    world = make_world(world_cfg)
    log("building or loading the tiny target models (cached after the first run)")
    pair = target_models(world_cfg, model or ModelConfig(), train or TrainConfig(), "forget10", cache=cache)
    (_, tok, ft_path), (_, _, rt_path) = pair["finetuned"], pair["retain"]
    sets = {
        "forget": world.split("forget10"),
        "retain": world.split("retain90"),
        "retain_eval": world.split("retain_perturbed"),
        "world_facts": world.split("world_facts"),
        "hazard_qa": world.domain_qa("hazard"),
        "hazard_mc": world.mc("hazard"),
        "benign_mc": world.mc("benign"),
    }
    n_steps = steps if steps is not None else QUICK_STEPS if quick else STEPS
    lr = lr if lr is not None else LR
    per_seed: dict[str, list[dict]] = {}

    t0 = time.perf_counter()
    retain_model = _load(rt_path)
    rt_rep = _tofu_report(retain_model, tok, sets, None)
    retain_tr = rt_rep["forget_tr_values"]
    rt_rep["forget_quality"] = M.forget_quality(retain_tr, retain_tr)  # the reference itself: 1 by definition
    rt_rep["skipped"].pop("forget_quality", None)
    rt_rep.update(_wmdp_report(retain_model, tok, sets))
    rt_rep["seconds"] = _train_seconds(rt_path)
    ft = _load(ft_path)
    ft_rep = _tofu_report(ft, tok, sets, retain_tr)
    ft_rep.update(_wmdp_report(ft, tok, sets))
    ft_rep["seconds"] = _train_seconds(ft_path)
    per_seed["finetuned"] = [ft_rep]
    per_seed["retain"] = [rt_rep]
    log(f"evaluated the finetuned and retain models in {time.perf_counter() - t0:.1f}s")

    for seed in range(seeds):
        for method in methods:
            common = dict(method=method, steps=n_steps, lr=lr, seed=seed, templates=list(SAFE_TEMPLATES),
                          progress=False, **(options or {}))
            if quick:  # retain statistics and leakage over about a quarter of the retain rows
                common["stats_tokens"] = QUICK_STATS_TOKENS
            t = time.perf_counter()
            model = unlearn(_load(ft_path), tok, sets["forget"], sets["retain"], **common).model
            tofu_s = time.perf_counter() - t
            rep = _tofu_report(model, tok, sets, retain_tr)
            t = time.perf_counter()
            model = unlearn(_load(ft_path), tok, sets["hazard_qa"], sets["retain"], **common).model
            wmdp_s = time.perf_counter() - t
            rep.update(_wmdp_report(model, tok, sets))
            rep["seconds"] = tofu_s + wmdp_s
            per_seed.setdefault(method, []).append(rep)
            log(f"seed {seed} {method:17s} FQ {rep['forget_quality']:.3g}  MU {rep['model_utility']:.3f}  "
                f"safe {rep['safe_rate']:.2f}  false refusal {rep['false_refusal']:.2f}  "
                f"hazard {rep['hazard_acc']:.2f}  benign {rep['benign_acc']:.2f}  "
                f"({rep['seconds']:.1f}s)")

    models = {name: report.aggregate(reps, KEYS, std=seeds > 1 and name not in REFERENCES, keep_missing=True)
              for name, reps in per_seed.items()}
    results = {
        "models": models,
        "config": {"seeds": seeds, "quick": quick, "steps": n_steps, "lr": lr, "forget_split": "forget10",
                   "world": world_cfg.to_dict(), "finetuned_model": str(ft_path), "retain_model": str(rt_path)},
        "seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_path = plot(models, out / "forget_quality_vs_utility.png")
    log("\n" + table(models))
    log(f"\nwrote {out / 'results.json'} and {plot_path} ({results['seconds']:.0f}s)")
    return results


def _train_seconds(path) -> float:
    try:
        return float(json.loads((Path(path) / "nsru_target.json").read_text())["train_seconds"])
    except (OSError, KeyError, ValueError):
        return 0.0


# The table's columns (results.json keeps all of KEYS), and the cells not in report.number's format.
COLUMNS = ("forget_quality", "model_utility", "forget_rouge", "forget_prob", "retain_rouge", "safe_rate",
           "false_refusal", "hazard_acc", "benign_acc", "seconds")
FORMATS = {"forget_quality": lambda v: f"{v:.2e}" if 0 < v < 1e-2 else f"{v:.3f}", "seconds": "{:.1f}"}


def table(models: dict) -> str:
    """A Markdown table of the results."""
    return report.markdown_table(models, COLUMNS, "model", FORMATS)


def figure(models: dict):
    """The demo's figure: TOFU-style forget quality (log, capped at 1) against model utility, and
    WMDP-style hazard accuracy against benign accuracy; one colour per model, one legend."""
    fig, (tofu, wmdp) = report.pyplot().subplots(1, 2, figsize=(13, 5))
    lowest = 1.0
    for i, (name, row) in enumerate(models.items()):
        style = report.style(name, i, REFERENCES)
        fq, mu = row.get("forget_quality"), row.get("model_utility")
        if fq is not None and mu is not None:
            fq = max(fq, 1e-30)
            lowest = min(lowest, fq)
            tofu.errorbar(mu, fq, xerr=row.get("model_utility_std"), fmt=style["marker"], color=style["color"],
                          markersize=style["markersize"], capsize=2, label=name, zorder=3, clip_on=False)
        hz, bn = row.get("hazard_acc"), row.get("benign_acc")
        if hz is not None and bn is not None:
            wmdp.errorbar(bn, hz, xerr=row.get("benign_acc_std"), yerr=row.get("hazard_acc_std"), fmt=style["marker"],
                          color=style["color"], markersize=style["markersize"], capsize=2, label=name, zorder=3,
                          clip_on=False)
    tofu.set_yscale("log")
    tofu.set_ylim(min(lowest, 1e-3) / 10, 1.0)  # a p-value: nothing above 1
    tofu.set_xlabel("model utility (higher: more kept)")
    tofu.set_ylabel("forget quality: KS p-value vs the retain model (higher: closer)")
    tofu.set_title("TOFU-style: forget10 people")
    wmdp.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    wmdp.axvline(0.25, color="grey", linestyle=":", linewidth=1)
    wmdp.set_xlim(0, 1.02)
    wmdp.set_ylim(0, 1.02)
    wmdp.set_xlabel("benign multiple-choice accuracy (higher: more kept)")
    wmdp.set_ylabel("hazardous multiple-choice accuracy (lower: more forgotten; chance 0.25)")
    wmdp.set_title("WMDP-style: the hazardous domain")
    for ax in (tofu, wmdp):
        ax.grid(True, alpha=0.3)
    handles, labels = tofu.get_legend_handles_labels()
    if not handles:
        handles, labels = wmdp.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    return fig


def plot(models: dict, path) -> Path:
    """Save :func:`figure` to ``path``."""
    return report.save(figure(models), path)
