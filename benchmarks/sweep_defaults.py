"""Sweep of NSRU's defaults on the offline world (DESIGN §1.4, issue 5 "Defaults from evidence").

One factor at a time around a base configuration, several seeds, on the tiny finetuned model of
:mod:`nsru.bench.models` whose forget and retain people share name tokens. For every run:

* ``forget``: probability of the forget10 answers (lower = forgotten),
* ``safe``: probability of the safe targets on the forget queries, and the safe-response rate of
  greedy answers,
* ``retain``: probability of the retain_perturbed answers (these people are in the retain loss and
  the statistics),
* ``held-out``: probability of the world-facts answers (never in the retain loss or statistics:
  where the null-space constraint has to show its worth).

Plain LoRA (``project=False``, same losses) runs beside NSRU at several budgets so the two can be
compared at equal forgetting.

    OMP_NUM_THREADS=1 python benchmarks/sweep_defaults.py --seeds 3
    OMP_NUM_THREADS=1 python benchmarks/sweep_defaults.py --quick      # 1 seed, fewer configs

Writes ``benchmarks/results/sweep_defaults.json`` (every run) and ``sweep_defaults.md`` (means and
standard deviations over seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import nsru
from nsru.atomic import atomic_write
from nsru.bench import models as bm
from nsru.bench import report
from nsru.bench.world import make_world
from nsru.evaluation import evaluate_tofu
from nsru.safe_targets import SafeTargets

RESULTS = Path(__file__).parent / "results"

BASE = dict(steps=60, batch_size=8, lr=1e-2, r=8, alpha=16, subspace="energy=0.9", safe_weight=1.0, suppress_weight=0.3,
            retain_weight=3.0, init="random")

CONFIGS: list[tuple[str, dict]] = [
    ("nsru base (τ 0.9, r 8, lr 1e-2, 60 steps, w 1/0.3/3)", {}),
    ("plain LoRA (project off)", {"project": False}),
    ("τ 0.5", {"subspace": "energy=0.5"}),
    ("τ 0.8", {"subspace": "energy=0.8"}),
    ("τ 0.95", {"subspace": "energy=0.95"}),
    ("τ 0.99", {"subspace": "energy=0.99"}),
    ("rank 4", {"r": 4, "alpha": 8}),
    ("lr 3e-3", {"lr": 3e-3}),
    ("lr 3e-3, 180 steps", {"lr": 3e-3, "steps": 180}),
    ("plain LoRA, lr 3e-3, 180 steps", {"lr": 3e-3, "steps": 180, "project": False}),
    ("30 steps", {"steps": 30}),
    ("plain LoRA, 30 steps", {"steps": 30, "project": False}),
    ("120 steps", {"steps": 120}),
    ("plain LoRA, 120 steps", {"steps": 120, "project": False}),
    ("suppress weight 1", {"suppress_weight": 1.0}),
    ("suppress weight 0 (no NPO)", {"suppress_weight": 0.0}),
    ("retain weight 1", {"retain_weight": 1.0}),
    ("init forget", {"init": "forget"}),
    # where the statistics come from (issue 10) and the subspace rules beside τ
    ("stats retain+self", {"stats": ["retain", "self"]}),
    ("stats retain+self, τ 0.95", {"stats": ["retain", "self"], "subspace": "energy=0.95"}),
    ("stats self", {"stats": "self"}),
    ("tail 1e-2", {"subspace": "tail=1e-2"}),
    ("tail 1e-3", {"subspace": "tail=1e-3"}),
    ("mean 0.1", {"subspace": "mean=0.1"}),
    ("stats retain+self, tail 1e-2", {"stats": ["retain", "self"], "subspace": "tail=1e-2"}),
    ("τ 0.99, min_null 16", {"subspace": "energy=0.99,min_null=16"}),
]

QUICK = {CONFIGS[0][0], "plain LoRA (project off)", "τ 0.99", "init forget"}


def refusal_rows(world, n: int = 200, seed: int = 0) -> list[dict]:
    """Questions about people the world does not contain, answered with refusals.

    A real LLM knows how to refuse; a tiny model that never saw refusals has untrained output rows
    for their tokens, and all such rows look alike, so no adapter on the hidden layers could make it
    say them without disturbing everything else (measured: held-out facts 0.89 -> 0.54 when the
    safe term is added on the plain finetuned model). The sweep's model therefore also learns to
    refuse questions about unknown people, with the same templates NSRU uses.
    """
    import random

    rows = world.split("full")
    used = {r["subject"] for r in rows}
    firsts = sorted({s.split()[0] for s in used})
    lasts = sorted({s.split()[-1] for s in used})
    rng = random.Random(seed)
    targets = SafeTargets(seed=seed + 1)
    out = []
    while len(out) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name in used:
            continue
        row = rng.choice(rows)
        q = row["question"].replace(row["subject"], name)
        out.append({"question": q, "answer": targets({"question": q, "subject": name}), "subject": name})
    return out


def sweep_model(progress: bool = False):
    """The benchmark's finetuned model recipe plus refusals for unknown people (cached on disk)."""
    import hashlib
    from transformers import AutoModelForCausalLM

    from nsru.data import encode_qa

    world = make_world()
    spec = bm.TargetSpec(kind="finetuned")
    tok = bm.load_tokenizer(spec.world, spec.model.vocab_size)
    examples = bm.training_examples(world, tok, "finetuned", None, spec.train.max_length)
    examples += [encode_qa(tok, r["question"], r["answer"], spec.train.max_length) for r in refusal_rows(world)]
    digest = hashlib.sha256(spec.key().encode())
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    path = bm.cache_dir() / f"sweep-refusal-{digest.hexdigest()[:16]}"
    if not path.exists():
        model = bm._llama(spec.model, tok, spec.train.seed)
        bm.train_lm(model, examples, tok, spec.train, desc="training the sweep model", progress=progress)
        atomic_write(path, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)), directory=True,
                     replace=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tok, path


def evaluate(model, tok, sets: dict, safe_targets: list[str]) -> dict:
    """Answer probability on each set, the safe targets' probability on the forget questions and the
    safe-response rate of greedy answers to them (:func:`nsru.evaluation.evaluate_tofu`, these
    measures only)."""
    general = {name: rows for name, rows in sets.items() if name not in ("forget", "retain")}
    rep = evaluate_tofu(model, tok, sets["forget"], sets["retain"], general, safe_targets=safe_targets,
                        measures=("prob", "safe_rate"), max_new_tokens=24, progress=False)
    return {**{name: rep[f"{name}_prob"] for name in sets}, "safe": rep["safe_prob"], "safe_rate": rep["safe_rate"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="substrings of config names to run")
    ap.add_argument("--templates", choices=("world", "default"), default="world",
                    help="safe-target templates: the refusals the world's target model learnt (default; a real "
                         "LLM knows how to refuse, a tiny one only the phrasings it saw) or nsru's built-in ones")
    ap.add_argument("--refusals", action=argparse.BooleanOptionalAction, default=False,
                    help="add refusals of unknown people to the finetuned recipe (needed for worlds before "
                         "10df6bd, whose models never saw a refusal; see refusal_rows)")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweep_defaults.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    world = make_world()
    base_model, tok, path = sweep_model(progress=True) if args.refusals else bm.finetuned_model(progress=False)
    forget = world.split("forget10")
    retain = world.split(world.retain_split_of("forget10"))
    sets = {"forget": forget, "retain": world.split("retain_perturbed"), "held-out": world.split("world_facts")}
    templates = None
    if args.templates == "world":
        from nsru.bench.world import UNKNOWN_ANSWERS

        templates = [t.replace("{name}", "{subject}") for t in UNKNOWN_ANSWERS]
    targets = SafeTargets(templates, seed=0).all(forget)

    configs = [c for c in CONFIGS if not args.quick or c[0] in QUICK]
    if args.only:
        configs = [c for c in configs if any(s in c[0] for s in args.only)]
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    runs = []
    start = time.perf_counter()
    before = evaluate(base_model, tok, sets, targets)
    runs.append({"config": "finetuned (before)", "seed": None, **before, "seconds": 0.0})
    print(f"model {path}\nforget {len(forget)} rows, retain {len(retain)} rows; before: {before}", flush=True)
    for seed in seeds:
        for name, options in configs:
            model = copy.deepcopy(base_model)
            opts = {**BASE, **options, "seed": seed, "progress": False, "templates": templates}
            t = time.perf_counter()
            result = nsru.unlearn(model, tok, forget=forget, retain=retain, **opts)
            secs = time.perf_counter() - t
            model.eval()
            row = {"config": name, "seed": seed, **evaluate(model, tok, sets, targets), "seconds": round(secs, 2),
                   "mean_k_frac": statistics.mean(v["k"] / v["in_features"] for v in result.bases_info.values()),
                   "mean_leakage": statistics.mean(v["leakage"] for v in result.bases_info.values()),
                   "options": opts}
            runs.append(row)
            print(f"[{time.perf_counter() - start:6.0f}s] seed {seed} {name:38s} forget {row['forget']:.3f} "
                  f"safe {row['safe']:.3f} rate {row['safe_rate']:.2f} retain {row['retain']:.3f} "
                  f"held-out {row['held-out']:.3f} ({secs:.1f}s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"base": BASE, "model": str(path), "runs": runs}, indent=1) + "\n")
    command = " ".join(["python benchmarks/sweep_defaults.py", *(argv if argv is not None else sys.argv[1:])])
    table = markdown(runs, [c[0] for c in configs], seeds, command, refusals=args.refusals,
                     templates=args.templates)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def markdown(runs: list[dict], names: list[str], seeds: list[int], command: str, refusals: bool = False,
             templates: str = "world") -> str:
    cols = ["forget", "safe", "safe_rate", "retain", "held-out", "mean_k_frac", "mean_leakage", "seconds"]
    lines = [
        f"Defaults sweep: tiny finetuned model{' (+ refusals of unknown people)' if refusals else ''}, "
        f"forget10 of the offline world, safe targets from the {templates} templates, "
        f"seeds {seeds}; mean ± std over seeds. forget/safe/retain/held-out: answer probability "
        "exp(-mean token NLL); safe_rate: greedy answers that refuse.",
        f"Command: `OMP_NUM_THREADS=1 {command}`",
        "",
    ]
    rows = {"finetuned (before)": next(r for r in runs if r["seed"] is None)}
    for name in names:
        done = [r for r in runs if r["config"] == name]
        if done:
            rows[name] = report.aggregate(done, cols)
    lines.append(report.markdown_table(rows, cols, "config", default="{:.3f}", std_format="{:.3f}", missing=""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
