"""The run folder and what leaves it: rejected input writes nothing to ``--out``, a new run that
stops before its first checkpoint takes its files away, ``--resume`` with other steps keeps the
learning-rate schedule continuous (or refuses), a new adapter drops the old ``eval`` metrics, and an
adapter merged into another model of the same shapes is named in a warning."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nsru
from nsru.cli import rundir as R
from nsru.config import UnlearnConfig
from nsru.methods import METHODS, nsru_loss, register_method
from nsru.schedule import ScheduleError, check_resume, lr_scheduler, restore_scheduler, warmup_steps
from tinylm import one_thread, run_cli, tiny_llama, tiny_world, trained_world_model, word_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nsru.safe_targets import DEFAULT_TEMPLATES

    root = tmp_path_factory.mktemp("rundir")
    forget, retain = tiny_world()
    texts = [r["question"] + " " + r["answer"] for r in forget + retain]
    tok = word_tokenizer(texts + [t.replace("{subject}", "x") for t in DEFAULT_TEMPLATES])
    model = tiny_llama(len(tok), hidden=32, layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    other = tiny_llama(len(tok), seed=1, hidden=32, layers=2)  # same shapes, other weights
    other.save_pretrained(root / "other")
    tok.save_pretrained(root / "other")
    for name, rows in (("forget", forget), ("retain", retain)):
        (root / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": str(root / "model"), "other": str(root / "other"), "tok": tok,
            "forget": str(root / "forget.json"), "retain": str(root / "retain.json")}


def _unlearn(world, out, *opts):
    return ("unlearn", "--model", world["model"], "--forget", world["forget"], "--retain", world["retain"],
            "--out", out, "batch_size=4", "progress=false", "stats=retain", *opts)


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]  # above it, at most the progress bar of a model load


# --------------------------------------------------------------------------------------------
# nothing written before every check passed


@pytest.mark.parametrize("bad,message", [
    ("target_modules=[foo_proj]", r"target_modules=\['foo_proj'\] matched no linear module"),
    ("r=64", r"r=64 is larger than module 'model.layers.0.self_attn.q_proj' allows: .* so r can be at most \d+"),
], ids=["targets", "r"])
def test_input_rejected_after_the_model_loads_leaves_no_run_folder(world, tmp_path, capsys, bad, message):
    out = tmp_path / "runs" / "x"
    rc, _, err = run_cli(capsys, *_unlearn(world, out, "steps=1", bad))
    assert rc == 1 and re.search(message, _last_line(err)), err
    assert not (tmp_path / "runs").exists()  # not even the parent folder
    rc, _, err = run_cli(capsys, *_unlearn(world, out, "steps=1"))  # the corrected rerun is not refused
    assert rc == 0, err
    assert (out / R.CONFIG).is_file() and (out / R.ADAPTER / "adapter.safetensors").is_file()


def test_a_new_run_failing_before_its_first_checkpoint_takes_its_files_away(world, tmp_path, capsys):
    @register_method("nan-at-once", project=True, needs_safe=True, needs_reference=True)
    def _nan(ctx, batch):
        out = nsru_loss(ctx, batch)
        out["loss"] = out["loss"] * float("nan")
        return out

    out = tmp_path / "x"
    try:
        rc, stdout, err = run_cli(capsys, *_unlearn(world, out, "steps=4", "save_every=2", "method=nan-at-once"))
    finally:
        METHODS.pop("nan-at-once", None)
    assert rc == 1 and "NonFiniteLossError: non-finite loss at step 1" in _last_line(err)
    assert not out.exists() and "holds no run: the same command can run again" in stdout
    # a folder that was there before stays, with what it held
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    register_method("nan-at-once", project=True, needs_safe=True, needs_reference=True)(_nan)
    try:
        rc, _, _ = run_cli(capsys, *_unlearn(world, out, "steps=4", "save_every=2", "method=nan-at-once"))
    finally:
        METHODS.pop("nan-at-once", None)
    assert rc == 1 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_out_that_is_a_file_is_named(world, tmp_path, capsys):
    file = tmp_path / "x"
    file.write_text("not a folder")
    for argv in (_unlearn(world, file, "steps=1"),
                 ("merge", "--model", world["model"], "--adapter", tmp_path, "--out", file),
                 ("export", "--adapter", tmp_path, "--out", file)):
        if argv[0] != "unlearn":  # the adapter must pass its own check first
            (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "nsru-adapter", "modules": {}}))
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and err == f"nsru {argv[0]}: --out {file} is a file; expected a folder\n", err
        assert "loading" not in out
    assert file.read_text() == "not a folder"


def test_merge_of_a_peft_adapter_of_another_width_is_one_line(world, tmp_path, capsys):
    wide = tiny_llama(len(world["tok"]), hidden=48, layers=2)
    nsru.apply_nsru(wide, r=4, alpha=8)
    nsru.save_adapter(wide, tmp_path / "peft", format="peft")
    rc, out, err = run_cli(capsys, "merge", "--model", world["model"], "--adapter", tmp_path / "peft", "--out",
                           tmp_path / "merged")
    assert rc == 2 and err.count("nsru merge:") == 1, err
    assert re.fullmatch(r"nsru merge: \S+adapter_model.safetensors: base_model\.model\.model\.layers\.0\.mlp\.down_proj"
                        r"\.lora_A\.weight has shape \(4, 96\) but module 'model\.layers\.0\.mlp\.down_proj' of the "
                        r"model maps 64 -> 32 features, so it needs \(r, 64\); the adapter is of another model",
                        _last_line(err)), err
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------
# the base model's fingerprint


def test_the_adapter_records_its_base_and_warns_on_another_one(world, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["model"])
    before = nsru.adapt.base_fingerprint(model)
    nsru.apply_nsru(model, r=4, alpha=8)
    assert nsru.adapt.base_fingerprint(model) == before  # adapters are not the base
    bf16 = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.bfloat16)
    assert nsru.adapt.base_fingerprint(bf16) == before  # nor is the dtype it was loaded in
    nsru.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_fingerprint"] == before

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nsru.load_adapter(AutoModelForCausalLM.from_pretrained(world["model"]), tmp_path / "a")  # the same: silent
    other = AutoModelForCausalLM.from_pretrained(world["other"])
    theirs = nsru.adapt.base_fingerprint(other)
    with pytest.warns(UserWarning, match=rf"trained on base weights with fingerprint {before} \(of .*model\), but "
                                         rf"this model's weights have fingerprint {theirs}"):
        nsru.load_adapter(other, tmp_path / "a")


def test_merge_into_another_model_of_the_same_shapes_warns_in_one_line(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["model"])
    nsru.apply_nsru(model, r=4, alpha=8)
    nsru.save_adapter(model, tmp_path / "a")
    rc, out, err = run_cli(capsys, "merge", "--model", world["other"], "--adapter", tmp_path / "a", "--out",
                           tmp_path / "m")
    warned = [line for line in err.splitlines() if line.startswith("nsru merge: warning:")]
    assert rc == 0 and len(warned) == 1 and "fingerprint" in warned[0], err
    rc, out, err = run_cli(capsys, "merge", "--model", world["model"], "--adapter", tmp_path / "a", "--out",
                           tmp_path / "m2")
    assert rc == 0 and "warning" not in err


# --------------------------------------------------------------------------------------------
# resuming with other steps: one continuous schedule


def _scheduled(cfg, state=None, start=0):
    """LRs of steps ``start`` to ``cfg.steps - 1``, resuming from ``state`` when given."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_scheduler(opt, cfg)
    if state is not None:
        restore_scheduler(sched, state, cfg)
    lrs = []
    for _ in range(start, cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, sched


def _state_at(cfg, step):
    """A checkpoint's trainer state after ``step`` steps of ``cfg``."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_scheduler(opt, cfg)
    for _ in range(step):
        opt.step()
        sched.step()
    return json.loads(json.dumps({"step": step, "scheduler": sched.state_dict(), "config": cfg.to_dict()}))


def test_the_schedule_is_transformers_bit_for_bit():
    from transformers import get_scheduler

    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    for kind in names:
        for steps, warm in ((10, 0), (10, 2), (60, 0.1), (7, 0.3)):
            cfg = UnlearnConfig(lr=3e-3, steps=steps, warmup_steps=warm, schedule=kind)
            ours, _ = _scheduled(cfg)
            opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
            sched = get_scheduler(names[kind], opt, num_warmup_steps=warmup_steps(cfg), num_training_steps=steps)
            theirs = []
            for _ in range(steps):
                theirs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            assert ours == theirs, (kind, steps, warm)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("steps,at,more", [(10, 4, 40), (10, 4, 7), (20, 1, 60), (10, 10, 30)])
def test_resume_with_other_steps_continues_the_schedule(kind, steps, at, more):
    """No step at LR 0 after the warm-up, no jump larger than a step of either schedule, the
    resumed step at the LR the first run would have used, and the decay still ending at the end."""
    first = UnlearnConfig(lr=1.0, steps=steps, warmup_steps=2, schedule=kind)
    then = first.replace(steps=more)
    state = _state_at(first, at)
    if at == steps and kind != "constant":  # the decay reached 0: no continuous way on
        with pytest.raises(ScheduleError, match=rf"the run finished its {steps} steps and its {kind} schedule"):
            check_resume(state, then)
        return
    check_resume(state, then)
    before, _ = _scheduled(first)
    after, sched = _scheduled(then, state, start=at)
    lrs = before[:at] + after
    assert after[0] == pytest.approx(before[at] if at < steps else 1.0, rel=1e-12)
    assert all(lr > 0 for lr in lrs[2:]), lrs
    own_step = max(abs(a - b) for a, b in zip(before[2:], before[3:])) if kind != "constant" else 0.0
    new_step = max((abs(a - b) for a, b in zip(after, after[1:])), default=0.0)
    jumps = [abs(a - b) for a, b in zip(lrs[2:], lrs[3:])]
    assert max(jumps) <= max(own_step, new_step) + 1e-12, lrs
    if kind != "constant":
        assert all(b <= a for a, b in zip(lrs[2:], lrs[3:]))  # after the warm-up it only decays
        assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # 0 after the last step, as it should
    # a second resume of the stretched schedule, with the same steps, continues it exactly
    mid = at + (more - at) // 2
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = lr_scheduler(opt, then)
    restore_scheduler(resumed, state, then)
    for _ in range(at, mid):
        opt.step()
        resumed.step()
    again = json.loads(json.dumps({"step": mid, "scheduler": resumed.state_dict(), "config": then.to_dict()}))
    assert _scheduled(then, again, start=mid)[0] == after[mid - at:]


def test_an_older_checkpoint_continues_the_same_way():
    """Checkpoints of version 2-3 saved transformers' scheduler state (its lambdas hold nothing):
    the schedule comes from their config, and a new steps continues it as for a new checkpoint."""
    first = UnlearnConfig(lr=1.0, steps=10, warmup_steps=2)
    state = _state_at(first, 4)
    old = {**state, "scheduler": {**state["scheduler"], "lr_lambdas": [{}]}}
    then = first.replace(steps=40)
    assert _scheduled(then, old, start=4)[0] == _scheduled(then, state, start=4)[0]
    del old["scheduler"]  # version 1: no scheduler state at all
    assert _scheduled(then, old, start=4)[0] == _scheduled(then, state, start=4)[0]


def test_resume_refuses_another_lr_schedule_or_warmup_and_fewer_steps():
    cfg = UnlearnConfig(lr=1e-2, steps=10)
    state = _state_at(cfg, 4)
    for change, message in ((dict(lr=2e-2), r"lr=0.02 on resume: the checkpoint's run has lr=0.01"),
                            (dict(schedule="cosine"), r"schedule='cosine' on resume"),
                            (dict(warmup_steps=3), r"warmup_steps=3 on resume"),
                            (dict(steps=3), r"steps=3 on resume: the checkpoint is at step 4 already")):
        with pytest.raises(ScheduleError, match=message):
            check_resume(state, cfg.replace(**change))


def test_resume_with_more_steps_records_a_continuous_lr_in_the_history(tmp_path):
    """End to end through the trainer: a run cut at its step-2 checkpoint, resumed with 8× the
    steps. Before, the resumed steps followed the new schedule from its start (a jump up to
    nearly the peak)."""
    model, tok, forget, retain = trained_world_model()
    opts = dict(batch_size=4, lr=1e-2, progress=False, seed=0, stats="retain", save_every=2,
                output_dir=str(tmp_path / "ckpt"))

    class Cut(Exception):
        pass

    def cut_at_3(model, step):
        if step == 3:
            raise Cut()
        return {}

    with one_thread(), pytest.raises(Cut):
        nsru.unlearn(model, tok, forget=forget, retain=retain, steps=4, eval_every=1, eval_fn=cut_at_3, **opts)
    model, tok, forget, retain = trained_world_model()
    with one_thread():
        result = nsru.unlearn(model, tok, forget=forget, retain=retain, steps=32, resume=True, **opts)
    lrs = [h["lr"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, 33))
    assert lrs[:3] == pytest.approx([1e-2, 1e-2 * 3 / 4, 1e-2 / 2], rel=1e-12)  # steps 1-2, then the first run's
    assert all(lr > 0 for lr in lrs) and all(b <= a for a, b in zip(lrs, lrs[1:])), lrs
    assert max(a - b for a, b in zip(lrs, lrs[1:])) <= 1e-2 / 4 + 1e-12


def test_cli_resume_that_cannot_continue_the_schedule_changes_nothing(world, tmp_path, capsys):
    out = tmp_path / "x"
    assert run_cli(capsys, *_unlearn(world, out, "steps=2", "save_every=1"))[0] == 0
    config, log = (out / R.CONFIG).read_text(), (out / R.LOG).read_text()
    rc, stdout, err = run_cli(capsys, "unlearn", "--out", out, "--resume", "steps=4")
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(r"--resume .*x: steps=4 on resume: the run finished its 2 steps and its linear schedule", err)
    assert (out / R.CONFIG).read_text() == config and (out / R.LOG).read_text() == log
    assert "loading" not in stdout


def test_a_new_adapter_drops_the_old_eval_metrics(world, tmp_path, capsys):
    out = tmp_path / "x"
    assert run_cli(capsys, *_unlearn(world, out, "steps=2", "save_every=1", "schedule=constant"))[0] == 0
    R.RunDir(out, echo=False).update_metrics("eval", {"forget_prob": 0.5})
    assert set(json.loads((out / R.METRICS).read_text())) == {"train", "eval"}
    rc, _, err = run_cli(capsys, "unlearn", "--out", out, "--resume", "steps=3")  # a constant schedule extends
    assert rc == 0, err
    metrics = json.loads((out / R.METRICS).read_text())
    assert set(metrics) == {"train"} and metrics["train"]["steps"] == 3
    lrs = [json.loads(line)["lr"] for line in (out / R.HISTORY).read_text().splitlines()]
    assert len(lrs) == 3 and lrs[1] == lrs[2] > 0


def test_log_lines_from_before_the_folder_existed_are_kept(world, tmp_path, capsys):
    out = tmp_path / "x"
    assert run_cli(capsys, *_unlearn(world, out, "steps=1"))[0] == 0
    lines = (out / R.LOG).read_text().splitlines()
    assert re.search(r"loading .*model", lines[0]) and "new run in" in lines[1], lines
    assert sum("new run in" in line for line in lines) == 1
