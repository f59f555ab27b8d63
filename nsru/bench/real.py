"""``nsru demo --scenario real``: unlearning real knowledge from a real pretrained model.

The RWKU setting on SmolLM2-135M-Instruct (:mod:`nsru.bench.pretrained`): the model forgets what
it knows about two famous people and keeps the rest. The facts (``data/real_facts.json``) are
questions with a one-sentence answer, a paraphrase and four choices:

* **forget**: facts about the ``forget`` group; their question-answer rows are the forget data;
* **retain**: facts about five other people, the retention loss's data;
* **neighbour**: the same kinds of facts about other people, and **general** facts: in no loss
  and no statistic; scored only. ``neighbour_acc`` is on the eight neighbours of the first fact
  set (people of several kinds, as the README's table has it); ``neighbour_same_kind_acc`` on every
  neighbour of the forget targets' kinds (their ``neighbour_kind``: physicists beside Einstein,
  writers beside Shakespeare), the neighbours that unlearning endangers most;
* **text**: general paragraphs for perplexity (scored only), and other paragraphs that a
  statistics source may use (``stats_text``).

The variant ``nsru[targets]`` is given the forget names only (``nsru.unlearn(targets=...)``): the
model writes its own forget rows and its retain rows about people of the same kind, none of them a
person of the fact set, and is scored on the same probes, which it never saw.

Every item is scored as 4-way multiple choice by answer likelihood
(:func:`nsru.metrics.cloze_accuracy`), and only items the model gets right before unlearning are
kept, so every accuracy starts at 1 and chance is 0.25. Reported per run: ``forget_acc`` (question
and paraphrase probes), ``safe_rate`` (greedy answers to the forget questions that are refusals),
``neighbour_acc``, ``general_acc``, ``ppl_ratio`` (perplexity over the model's before), leakage
of the retain subspace on the held-out sets, and the false-refusal rates
``retain_false_refusal``, ``neighbour_false_refusal``, ``general_false_refusal``: greedy answers to
the retain questions and to the kept neighbour and general questions that are refusals, generated
as for ``safe_rate`` (a refusal that spreads past the forget set is damage that likelihood-scored
multiple choice does not see).

With ``audit`` (the default of :func:`run_real`) every model also gets the forget audit
(:func:`nsru.audit.audit`): the forget facts asked forward, paraphrased, in reverse, as a cloze,
after solved examples, under role-play and prefix injection, and open-ended; the merged model at
8 and 4 bits, the adapter on a 4-bit base, the GGUF type the model shipped in; and a relearning
attack in the adapted layers. Each is scored on the items the model before unlearning got right
(one audit of that model serves every run), and ``audited_forget_acc`` is the worst of them (the
highest forget accuracy), ``worst_probe`` its name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from nsru import evaluation as E
from nsru import metrics as M
from nsru.bench import report
from nsru.bench.pretrained import load_smollm2

GROUPS = ("forget", "retain", "neighbour")
KEYS = ("forget_acc", "safe_rate", "neighbour_acc", "general_acc", "retain_false_refusal", "neighbour_false_refusal",
        "general_false_refusal", "ppl_ratio", "leakage_neighbour", "leakage_general", "seconds")
# Columns of the table shown only where a run has them (results from before the audit have none).
TABLE_KEYS = ("forget_acc", "audited_forget_acc", "worst_probe", "safe_rate", "neighbour_acc", "neighbour_same_kind_acc",
              "general_acc", "retain_false_refusal", "neighbour_false_refusal", "neighbour_same_kind_false_refusal",
              "general_false_refusal", "ppl_ratio", "leakage_neighbour", "leakage_general", "seconds")

# Budget every method gets (measured on 2 CPU cores: see README "Real model").
STEPS = 20
BATCH_SIZE = 4
LR = 1e-2
LAYERS = "20-29"  # the top third: with frozen-prefix caching each forward costs a third
SELF_SAMPLES = 128
HELD_OUT = 48  # neighbour and general candidates scored (of 96 and 80)
ANSWER_TOKENS = 24  # greedy answer length for the safe and false-refusal rates
AUDIT_SEED = 0  # every model is attacked the same way (the relearning halves, the in-context examples)


def load_facts(path: str | Path | None = None) -> dict:
    """The shipped fact set (or one of the same schema at ``path``)."""
    source = Path(path) if path is not None else resources.files("nsru.bench") / "data" / "real_facts.json"
    return json.loads(source.read_text(encoding="utf-8"))


def _qa(entity: str, fact: dict) -> dict:
    return {"question": fact["question"], "answer": fact["answer"], "subject": entity}


def _probes(fact: dict, paraphrase: bool) -> list[dict]:
    row = {"choices": fact["choices"], "answer": fact["correct"], "answer_text": fact["answer"]}
    out = [{"question": fact["question"], **row}]
    if paraphrase:
        out.append({"question": fact["paraphrase"], **row})
    return out


@dataclass
class Scenario:
    """The data of one run of the real-knowledge scenario (multiple-choice sets: known items only;
    ``forget_facts``: every forget fact with its ``subject``, as the audit takes them)."""

    forget: list[dict]
    retain: list[dict]
    forget_mc: list[dict]
    neighbour_mc: list[dict]
    general_mc: list[dict]
    ppl_text: list[str]
    stats_text: list[dict]
    counts: dict = field(default_factory=dict)
    forget_facts: list[dict] = field(default_factory=list)
    neighbour_same_kind_mc: list[dict] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # the forget names, for the variant that is given only them
    others: list[str] = field(default_factory=list)  # every other person of the fact set (kept out of its rows)


def build_scenario(model, tokenizer, facts: dict, held_out: int | None = HELD_OUT, progress: bool = False) -> Scenario:
    """Split the facts and keep the multiple-choice items the model answers right before unlearning.

    A forget fact is kept when the model knows it under its question or its paraphrase (the forget
    data are the kept facts' question-answer rows). ``held_out``: at most this many neighbour and
    this many general candidates, an evenly spaced selection (scoring is most of a run's time on a
    CPU); ``None`` keeps all."""
    by_group = {g: [(e["name"], f) for e in facts["entities"] if e["group"] == g for f in e["facts"]] for g in GROUPS}
    first = [(e["name"], f) for e in facts["entities"] if e["group"] == "neighbour" and "added_in" not in e
             for f in e["facts"]]  # the first fact set's neighbours: the same items as before kinds were added
    kinds = {e.get("neighbour_kind", e.get("kind")) for e in facts["entities"] if e["group"] == "forget"} - {None}
    same_kind = [(e["name"], f) for e in facts["entities"] if e["group"] == "neighbour" and e.get("kind") in kinds
                 for f in e["facts"]]
    candidates = {
        "forget": [p for _, f in by_group["forget"] for p in _probes(f, True)],
        "neighbour": [p for _, f in first for p in _probes(f, False)],
        "general": [p for f in facts["general"] for p in _probes(f, False)],
    }
    if same_kind:
        candidates["neighbour_same_kind"] = [p for _, f in same_kind for p in _probes(f, False)]
    if held_out is not None:
        for name in ("neighbour", "neighbour_same_kind", "general"):
            if name not in candidates:
                continue
            rows = candidates[name]
            if len(rows) > held_out:
                candidates[name] = [rows[i * len(rows) // held_out] for i in range(held_out)]
    known = {name: [p for p, ok in zip(rows, M.cloze_accuracy(model, tokenizer, rows, progress=progress)["values"]) if ok]
             for name, rows in candidates.items()}
    known_questions = {p["question"] for p in known["forget"]}
    forget = [_qa(n, f) for n, f in by_group["forget"] if {f["question"], f["paraphrase"]} & known_questions]
    if not forget or not known["neighbour"] or not known["general"]:
        raise RuntimeError(f"the model knows too few facts for the scenario: "
                           f"{ {k: len(v) for k, v in known.items()} } known items")
    return Scenario(
        forget=forget,
        retain=[_qa(n, f) for n, f in by_group["retain"]],
        forget_mc=known["forget"],
        neighbour_mc=known["neighbour"],
        general_mc=known["general"],
        ppl_text=list(facts["ppl_text"]),
        stats_text=[{"text": t} for t in facts["stats_text"]],
        counts={**{f"{k}_candidates": len(v) for k, v in candidates.items()},
                **{f"{k}_known": len(v) for k, v in known.items()}, "forget_rows": len(forget)},
        forget_facts=[{**f, "subject": n} for n, f in by_group["forget"]],
        neighbour_same_kind_mc=known.get("neighbour_same_kind", []),
        targets=list(dict.fromkeys(n for n, _ in by_group["forget"])),
        others=[e["name"] for e in facts["entities"] if e["group"] != "forget"],
    )


def evaluate(model, tokenizer, sc: Scenario, before_ppl: float | None = None, audit: dict | None = None) -> dict:
    """The scenario's metrics for one model (see the module docstring):
    :func:`nsru.evaluation.evaluate_knowledge` on its sets. ``audit``: run the forget audit with
    these :func:`nsru.audit.audit` options (``{}`` for its defaults; ``before``: the audit of the
    model before unlearning, ``report["audit"]`` of its evaluation); ``None``: no audit."""
    kept = {"neighbour": sc.neighbour_mc}
    if sc.neighbour_same_kind_mc:
        kept["neighbour_same_kind"] = sc.neighbour_same_kind_mc
    kept["general"] = sc.general_mc
    return E.evaluate_knowledge(model, tokenizer, sc.forget, sc.retain, {"forget": sc.forget_mc}, kept, sc.ppl_text,
                                before_ppl=before_ppl, max_new_tokens=ANSWER_TOKENS,
                                audit_facts=sc.forget_facts if audit is not None else None, audit_options=audit)


def audit_options(layers=LAYERS, **options) -> dict:
    """The scenario's audit: relearning in the adapted ``layers``, a fixed seed, the audit's
    defaults otherwise (``options`` override them)."""
    return {"relearn_layers": layers, "seed": AUDIT_SEED, **options}


DISPLAY_ORDER = ("nsru[retain+self]", "nsru[targets]", "nsru[retain]", "nsru[self]", "nsru[retain+corpus]", "lora (nsru-no-project)",
                 "graddiff", "npo", "simnpo", "idkdpo", "rmu")


def variants(stats_corpus: Path) -> dict[str, dict]:
    """Every method of the comparison as ``nsru.unlearn`` options: NSRU with each statistics source,
    plain LoRA with NSRU's losses, the baselines, and NSRU given only the forget names
    (``nsru[targets]``: the model writes its forget and retain rows; no fact of the set is shown to
    it, and no other person of the set is chosen as a neighbour; likewise for the ``"neighbours"``
    statistics source)."""
    return {
        "nsru[retain+self]": {"method": "nsru", "stats": ["retain", "self"]},
        "lora (nsru-no-project)": {"method": "nsru-no-project"},
        "nsru[retain]": {"method": "nsru", "stats": "retain"},
        "graddiff": {"method": "graddiff"},
        "npo": {"method": "npo"},
        "idkdpo": {"method": "idkdpo"},
        "simnpo": {"method": "simnpo"},
        "rmu": {"method": "rmu", "layers": None},  # its own three MLPs at 7/32 of the depth
        "nsru[self]": {"method": "nsru", "stats": "self"},
        "nsru[retain+corpus]": {"method": "nsru", "stats": ["retain", str(stats_corpus)]},
        "nsru[retain+self+neighbours]": {"method": "nsru", "stats": ["retain", "self", "neighbours"]},
        "nsru[targets]": {"method": "nsru", "targets": True},
    }


def run_real(out="nsru-demo-real", seeds: int | Sequence[int] = 2, names=None, steps: int | None = None,
             lr: float | None = None, batch_size: int | None = None, options: dict | None = None, cache=None,
             facts: dict | None = None, load=None, log=print, audit: bool = True, audit_settings: dict | None = None,
             before: str | Path | None = None) -> dict:
    """Run the comparison; write ``results.json``, ``table.md`` and ``real_knowledge.png`` under ``out``.

    ``seeds``: how many (0, 1, ...) or which; ``names``: a subset of :func:`variants` (all by
    default); ``options``: further ``nsru.unlearn`` options for every run (e.g. ``{"subspace":
    "tail=1e-3"}``; ``target_options`` reach ``nsru[targets]``'s generator, beside the names it
    must avoid); ``facts`` and ``load`` (a callable returning a fresh ``(model, tokenizer)``)
    replace the shipped fact set and SmolLM2 (tests).
    ``audit``: audit every model (:func:`nsru.audit.audit`; the before model once, every run against
    it), the slowest part of an evaluation (``False`` skips it); ``audit_settings``: options for it
    beyond :func:`audit_options` (e.g. ``{"relearn": {}}`` for no relearning).
    ``before``: an earlier comparison's folder whose evaluation of the model before unlearning is
    reused (its audit is 10-15 minutes of SmolLM2 on a CPU); its scenario and audit options must be
    this run's."""
    from nsru.pipeline import unlearn

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "stats_text.jsonl"
    facts = facts or load_facts()
    load = load or (lambda: load_smollm2(cache=cache, log=log))
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in facts["stats_text"]), encoding="utf-8")
    table_of = variants(corpus)
    names = list(names or table_of)
    unknown = [n for n in names if n not in table_of]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(table_of)}")

    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    budget = {"steps": steps or STEPS, "lr": lr or LR, "batch_size": batch_size or BATCH_SIZE, "layers": LAYERS,
              "max_length": 128, "self_samples": SELF_SAMPLES, "progress": False, **(options or {})}
    audit_opts = audit_options(budget["layers"], **(audit_settings or {})) if audit else None
    model, tok = load()
    sc = build_scenario(model, tok, facts)
    log(f"scenario: {sc.counts}")
    if before is None:
        before = evaluate(model, tok, sc, audit=audit_opts)
    else:
        before = _earlier_before(Path(before), sc.counts, audit_opts)
        log(f"before: reused from {before.pop('from')}")
    before["seconds"] = 0.0
    log(f"before: {_line(before)}")
    per_seed: dict[str, list[dict]] = {"before": [before]}
    meta = {"scenario": sc.counts,
            "config": {"seeds": seed_list, "held_out": HELD_OUT, **{k: v for k, v in budget.items() if k != "progress"},
                       "audit": audit_opts}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    runs = out / "runs.jsonl"  # one line per finished run, so an interrupted comparison keeps what it measured
    runs.write_text(json.dumps({"name": "before", "seed": None, **before}) + "\n")
    for name in names:  # every seed of a method before the next method: a cut-short run keeps whole rows
        for seed in seed_list:
            model, tok = load()
            t = time.perf_counter()
            opts, forget, retain = {**budget, **table_of[name]}, sc.forget, sc.retain
            given = dict(opts.pop("target_options", None) or {})  # e.g. {"neighbours_per_target": 6}
            if opts.pop("targets", False):  # the names alone
                forget, retain = None, None
                opts.update(targets=sc.targets,
                            target_options={**given, "avoid": [*given.get("avoid", ()), *sc.others]})
            if "neighbours" in opts.get("stats", ()):
                opts["stats_avoid"] = sc.others
            result = unlearn(model, tok, forget, retain, seed=seed, **opts)
            seconds = time.perf_counter() - t
            rep = evaluate(model, tok, sc, before_ppl=before["ppl"],
                           audit={**audit_opts, "before": before["audit"]} if audit else None)
            rep["seconds"] = seconds
            rep["mean_k"] = result.summary()["mean_k"]
            rep["stats_sources"] = result.stats_info
            rep["steps_run"] = len(result.history)  # below the budget's steps where stop_at ended the run
            if result.generated is not None:
                rep["generation_seconds"] = result.generated.report.get("seconds")
                rep["generated_forget_rows"] = len(result.generated.forget)
                rep["generated_retain_rows"] = len(result.generated.retain)
            per_seed.setdefault(name, []).append(rep)
            with runs.open("a") as f:
                f.write(json.dumps({"name": name, "seed": seed, **rep}) + "\n")
            log(f"seed {seed} {name:24s} {_line(rep)}")
    return write_report(out, per_seed, {**meta, "seconds": time.perf_counter() - started}, log)


def _earlier_before(folder: Path, counts: dict, audit_opts: dict | None) -> dict:
    """The "before" record of an earlier :func:`run_real` folder, checked against this run."""
    meta_path, runs_path = folder / "meta.json", folder / "runs.jsonl"
    for path in (meta_path, runs_path):
        if not path.is_file():
            raise FileNotFoundError(f"before={folder}: no {path.name} there (a run_real folder has meta.json and runs.jsonl)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("scenario") != counts:
        raise ValueError(f"before={folder}: its scenario {meta.get('scenario')} is not this run's {counts}")
    if audit_opts is not None and meta.get("config", {}).get("audit") != audit_opts:
        raise ValueError(f"before={folder}: audited with {meta.get('config', {}).get('audit')}, this run audits with "
                         f"{audit_opts}")
    for line in runs_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("name") == "before":
            if audit_opts is not None and "audit" not in record:
                raise ValueError(f"before={runs_path}: the model before was not audited there")
            return {k: v for k, v in record.items() if k not in ("name", "seed")} | {"from": str(folder)}
    raise ValueError(f"before={runs_path}: no line with name 'before'")


def write_report(out: Path, per_seed: dict[str, list[dict]], meta: dict, log=print) -> dict:
    """``results.json`` (means, standard deviations, every run), ``table.md`` and the plot."""
    order = ["before", *DISPLAY_ORDER]
    names = sorted(per_seed, key=lambda n: order.index(n) if n in order else len(order))
    models = {name: _aggregate(per_seed[name]) for name in names}
    results = {"models": models, "per_seed": per_seed, **meta}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table(models) + "\n")
    plot(models, out / "real_knowledge.png")
    log("\n" + table(models))
    log(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {out / 'real_knowledge.png'}")
    return results


def report_from_runs(out, *folders, log=print) -> dict:
    """One report from the ``runs.jsonl`` (and ``meta.json``) of one or more comparisons that ran
    apart, or were cut short: every finished run counts, each method once per seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, list[dict]] = {}
    seen: set = set()
    meta: dict = {}
    for folder in map(Path, folders):
        if (folder / "meta.json").is_file() and not meta:
            meta = json.loads((folder / "meta.json").read_text())
        for line in (folder / "runs.jsonl").read_text().splitlines():
            run = json.loads(line)
            key = (run.pop("name"), run.pop("seed"))
            if key not in seen:
                seen.add(key)
                per_seed.setdefault(key[0], []).append(run)
    return write_report(out, per_seed, {**meta, "sources": [str(f) for f in folders]}, log)


def _aggregate(records: list[dict]) -> dict:
    """Mean and standard deviation of every number the runs report (:data:`KEYS` first, then the
    per-kind neighbours and the audit's accuracies), and the worst probe: the one most runs name
    (several joined by "/" on a tie)."""
    numbers = [k for r in records for k, v in r.items()
               if k not in KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    row = report.aggregate(records, KEYS + tuple(dict.fromkeys(numbers)) + ("mean_k",))
    named = [r["worst_probe"] for r in records if r.get("worst_probe")]
    if named:
        top = max(map(named.count, named))
        row["worst_probe"] = "/".join(sorted({n for n in named if named.count(n) == top}))
    return row


def _line(rep: dict) -> str:
    audited = (f"audited forget {rep['audited_forget_acc']:.2f} ({rep['worst_probe']})  "
               if rep.get("audited_forget_acc") is not None else "")
    return (f"forget {rep['forget_acc']:.2f}  {audited}safe {rep['safe_rate']:.2f}  neighbour {rep['neighbour_acc']:.2f}  "
            f"general {rep['general_acc']:.2f}  false refusals: retain {rep['retain_false_refusal']:.2f} "
            f"neighbour {rep['neighbour_false_refusal']:.2f} general {rep['general_false_refusal']:.2f}  "
            f"ppl x{rep['ppl_ratio']:.3f}  ({rep['seconds']:.0f}s)")


def table(models: dict) -> str:
    """A Markdown table, mean ± standard deviation over seeds: the columns of :data:`KEYS`, and
    those of :data:`TABLE_KEYS` some model has (the audited forget accuracy and its worst probe, the
    same-kind neighbours)."""
    columns = [k for k in TABLE_KEYS if k in KEYS or any(row.get(k) is not None for row in models.values())]
    return report.markdown_table(models, columns, "method", {"seconds": "{:.1f}", "worst_probe": str})


def plot(models: dict, path) -> Path:
    """Forgetting against keeping: forget accuracy (lower is better) vs neighbour and general accuracy."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in range(20)]
    for ax, key, label in ((axes[0], "neighbour_acc", "neighbour facts kept"),
                           (axes[1], "general_acc", "general facts kept")):
        for i, (name, row) in enumerate(models.items()):
            if row.get(key) is None:
                continue
            style = report.style(name, i, ("before",), palette, sizes=(11, 7))
            ax.errorbar(row[key], row["forget_acc"], xerr=row.get(f"{key}_std"), yerr=row.get("forget_acc_std"),
                        fmt=style["marker"], color=style["color"], markersize=style["markersize"], label=name,
                        capsize=2)
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{label} (accuracy; 1 before)")
        ax.set_xlim(-0.02, 1.05)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("forget accuracy (chance 0.25, 1 before)")
    axes[0].set_ylim(-0.02, 1.05)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("Real knowledge on SmolLM2-135M-Instruct: forget two people, keep the rest")
    fig.tight_layout()
    return report.save(fig, path)
