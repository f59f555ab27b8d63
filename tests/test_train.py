import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import nsru
from nsru.atomic import atomic_write
from nsru.checkpoint import latest_checkpoint
from nsru.config import UnlearnConfig
from nsru.methods import METHODS, nsru_loss, register_method
from nsru.sampler import Stream
from nsru.schedule import lr_scheduler, warmup_steps
from nsru.train import NonFiniteLossError
from tinylm import one_thread, trained_world_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in nsru.nsru_modules(model).items()
            for p in ("lora_A", "lora_B")}


def _lrs(**kw) -> list[float]:
    """The LR of each optimizer step, stepping the scheduler as the Trainer does."""
    cfg = UnlearnConfig(lr=1.0, steps=10, **kw)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule():
    # transformers' warm-up: step / warmup, so the first step of a warm-up runs at 0.
    linear = _lrs(warmup_steps=2, schedule="linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[9] == pytest.approx(1 / 8)
    cos = _lrs(warmup_steps=0, schedule="cosine")
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5)
    assert warmup_steps(UnlearnConfig(steps=10, warmup_steps=0.2)) == 2  # below 1: a fraction of the steps
    assert _lrs(schedule="constant", warmup_steps=0.2) == [0.0, 0.5] + [1.0] * 8


def test_stream_is_deterministic_and_resumable():
    ex = [{"x": {"input_ids": [i]}} for i in range(5)]
    a = Stream(ex, batch_size=3, seed=1)
    first = [a.next_indices() for _ in range(4)]
    assert sorted(first[0] + first[1][:2]) == list(range(5))  # one epoch, then the next
    b = Stream(ex, batch_size=3, seed=1)
    b.next_indices()
    state = b.state_dict()
    c = Stream(ex, batch_size=3, seed=1)
    c.load_state_dict(state)
    assert [c.next_indices() for _ in range(3)] == first[1:]
    assert Stream(ex, batch_size=3, seed=2).next_indices() != first[0]


def _run(tmp_path, **kw):
    model, tok, forget, retain = trained_world_model()
    opts = dict(steps=8, batch_size=4, lr=1e-2, progress=False, seed=0)
    opts.update(kw)
    return nsru.unlearn(model, tok, forget=forget, retain=retain, **opts)


def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    full = _run(tmp_path, output_dir=str(tmp_path / "full"), save_every=4)
    reference = adapter_params(full.model)

    class Crash(Exception):
        pass

    def crash_at_6(model, step):
        if step == 6:
            raise Crash()
        return {}

    with pytest.raises(Crash):
        _run(tmp_path, output_dir=str(tmp_path / "run"), save_every=4, eval_every=1, eval_fn=crash_at_6)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    resumed = _run(tmp_path, output_dir=str(tmp_path / "run"), save_every=4, resume=True)
    got = adapter_params(resumed.model)
    for name, value in reference.items():
        assert torch.equal(got[name], value), name
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]  # the schedule resumed in place

    # A version-1 checkpoint (no scheduler state) resumes to the same bits: the position follows the step.
    old = tmp_path / "v1" / "checkpoint-4"
    shutil.copytree(tmp_path / "run" / "checkpoint-4", old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["scheduler"]
    (old / "trainer_state.json").write_text(json.dumps({**state, "version": 1}))
    again = _run(tmp_path, output_dir=str(tmp_path / "v1"), resume=str(old))
    assert all(torch.equal(adapter_params(again.model)[k], v) for k, v in reference.items())

    ckpt = tmp_path / "run" / "checkpoint-8"
    assert {p.name for p in ckpt.iterdir()} == {
        "trainable.safetensors", "adapter", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"}
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in ckpt.rglob("*"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 8 and len(state["history"]) == 8
    assert load_file(str(ckpt / "optimizer.safetensors"))  # AdamW moments as safetensors
    # The adapter folder loads like any adapter.
    model, tok, forget, retain = trained_world_model()
    nsru.load_adapter(model, ckpt / "adapter")
    assert all(torch.equal(v, adapter_params(model)[k]) for k, v in reference.items())


def test_atomic_write_keeps_the_old_copy_when_writing_fails(tmp_path):
    """The helper behind checkpoints, adapter files and the model cache."""
    target = tmp_path / "checkpoint-1"
    assert atomic_write(target, lambda d: (d / "a").write_text("1"), directory=True)

    def fail(d):
        (d / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail, directory=True)
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert not atomic_write(target, lambda d: (d / "a").write_text("2"), directory=True, replace=False)
    assert (target / "a").read_text() == "1"  # replace=False: the first finished copy stays
    assert atomic_write(target, lambda d: (d / "b").write_text("3"), directory=True)
    assert [p.name for p in target.iterdir()] == ["b"]  # a folder is replaced as a whole
    pointer = tmp_path / "latest"
    for text in ("x", "y"):
        atomic_write(pointer, lambda f: f.write_text(text))
    assert pointer.read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]


@register_method("nan-after-3", project=True, needs_safe=True, needs_reference=True)
def _nan_after_3(ctx, batch):
    out = nsru_loss(ctx, batch)
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    if ctx.state["calls"] > 3:
        out["suppress"] = out["suppress"] * float("nan")
        out["loss"] = out["loss"] * float("nan")
    return out


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    try:
        with pytest.raises(NonFiniteLossError, match=r"step 4 \(suppress = nan.*checkpoint-2"):
            _run(tmp_path, method="nan-after-3", output_dir=str(tmp_path), save_every=2, keep_checkpoints=5)
    finally:
        METHODS.pop("nan-after-3", None)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()


def test_batch_size_is_global_and_checked(tmp_path):
    with pytest.raises(ValueError, match="multiple of world size 1 × grad_accum 3"):
        _run(tmp_path, batch_size=4, grad_accum=3, steps=1)
    res = _run(tmp_path, batch_size=4, grad_accum=2, steps=2)
    assert len(res.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
