"""Faults: a killed run resumes to the same adapter, damaged checkpoints are named and skipped, an
output folder that cannot take the checkpoints fails before training, and NaN/Inf stops the run
naming the step and the module while the last good checkpoint stays."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nsru
import nsru.checkpoint
from nsru.checkpoint import CheckpointError, OutputDirError, find_resumable, latest_checkpoint, read_checkpoint
from nsru.methods import METHODS, nsru_loss, register_method
from nsru.train import NonFiniteLossError
from tinylm import one_thread, trained_world_model

HERE = Path(__file__).parent
OPTIONS = {"steps": 10, "batch_size": 4, "lr": 1e-2, "progress": False, "seed": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _run(**kw):
    model, tok, forget, retain = trained_world_model()
    return nsru.unlearn(model, tok, forget=forget, retain=retain, **{**OPTIONS, **kw})


def _adapter(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in nsru.nsru_modules(model).items()
            for p in ("lora_A", "lora_B")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted():
    with one_thread():
        return _adapter(_run().model)


# --------------------------------------------------------------------------------------------
# kill and resume

KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import nsru
    from safetensors.torch import load_file
    from test_faults import OPTIONS
    from tinylm import trained_world_model

    model, tok, forget, retain = trained_world_model(steps=0)  # the tokenizer; the weights come from the file
    model.load_state_dict(load_file({base!r}))
    slow = lambda model, step: time.sleep(0.15) or {{}}  # room to be killed between checkpoints
    nsru.unlearn(model, tok, forget=forget, retain=retain, **OPTIONS, output_dir={out!r}, save_every=2,
                 eval_every=1, eval_fn=slow)
    """
)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if it ends first."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting for a checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL




def _leave_a_half_written_checkpoint(folder: Path) -> None:
    """What a kill inside a checkpoint write leaves: a temporary folder, never renamed."""
    tmp = folder / ".checkpoint-999.999-deadbeef.tmp"
    tmp.mkdir()
    (tmp / "trainable.safetensors").write_bytes(b"\0" * 10)


@pytest.mark.slow  # the same kill through `nsru unlearn` runs below; this one kills nsru.unlearn itself
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_adapter(tmp_path, uninterrupted):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in trained_world_model()[0].state_dict().items()}, str(base))
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(HERE), base=str(base), out=str(tmp_path / "run")))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: (latest_checkpoint(tmp_path / "run") or Path("checkpoint-0")).name == "checkpoint-4")
    _leave_a_half_written_checkpoint(tmp_path / "run")

    resumed = _run(output_dir=str(tmp_path / "run"), save_every=2, resume=True)
    assert resumed.history[0]["step"] == 1 and len(resumed.history) == OPTIONS["steps"]
    assert _same(_adapter(resumed.model), uninterrupted)
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # the leftover was cleared


# --------------------------------------------------------------------------------------------
# damaged checkpoints


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: safetensors alone would load it
    file.write_bytes(bytes(data))


class _Crash(Exception):
    pass


def _crash_at(at: int):
    def fn(model, step):
        if step == at:
            raise _Crash()
        return {}
    return fn


def test_damaged_checkpoints_are_named_and_the_previous_good_one_is_used(tmp_path, uninterrupted):
    out = tmp_path / "run"
    with pytest.raises(_Crash):  # checkpoints 2, 4, 6, 8 of a 10-step run; then two are damaged
        _run(output_dir=str(out), save_every=2, keep_checkpoints=4, eval_every=1, eval_fn=_crash_at(9))
    _truncate(out / "checkpoint-8" / "optimizer.safetensors")
    _flip_byte(out / "checkpoint-6" / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint-8/optimizer.safetensors: truncated \(\d+ bytes, \d+ were"):
        read_checkpoint(out / "checkpoint-8")
    with pytest.raises(CheckpointError, match=r"checkpoint-6/trainable.safetensors: corrupted"):
        read_checkpoint(out / "checkpoint-6")
    with pytest.warns(UserWarning) as caught:
        resumed = _run(output_dir=str(out), save_every=2, keep_checkpoints=4, resume=True)
    said = " | ".join(str(w.message) for w in caught)
    assert "checkpoint-8/optimizer.safetensors: truncated" in said and "checkpoint-6/trainable.safetensors: corrupted" in said
    assert "resuming from " + str(out / "checkpoint-4") in said
    assert _same(_adapter(resumed.model), uninterrupted)  # steps 5-10 again, to the same adapter


def test_a_truncated_state_file_is_named_and_no_usable_checkpoint_is_an_error(tmp_path):
    out = tmp_path / "run"
    _run(output_dir=str(out), save_every=2, steps=4)  # keeps 2 and 4
    _truncate(out / "checkpoint-4" / "trainer_state.json")
    with pytest.warns(UserWarning, match=r"checkpoint-4/trainer_state.json: truncated or corrupted.*resuming from"):
        assert find_resumable(out).path.name == "checkpoint-2"
    (out / "checkpoint-2" / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoint-4/trainer_state.json.*"
                                              r"checkpoint-2/rng.safetensors: missing"):
        find_resumable(out)


def test_a_pickle_in_a_checkpoint_is_refused_and_never_loaded(tmp_path):
    import pickle

    out = tmp_path / "run"
    _run(output_dir=str(out), steps=2)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state.pop("files")  # an older checkpoint without hashes: the file format itself must refuse it
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "optimizer.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: not a readable safetensors file"):
        read_checkpoint(ckpt)
    assert not marker.exists()


class _Boom:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


# --------------------------------------------------------------------------------------------
# the output folder


def test_an_unwritable_output_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(OutputDirError, match=r"output_dir .*a-file/out is not writable \(.*\); nothing was trained"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, **OPTIONS, output_dir=str(blocker / "out"))
    assert not nsru.nsru_modules(model)  # no adapters were even added: nothing ran


def test_a_read_only_output_dir_fails_before_any_work(tmp_path):
    """Root writes into a folder whatever its mode bits (CI runs as root): sysfs refuses it too."""
    if os.geteuid() != 0:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    elif Path("/sys/kernel").is_dir():
        out = Path("/sys/kernel/nsru-read-only-test")
    else:
        pytest.skip("running as root without a sysfs to stand for a read-only folder")
    try:
        with pytest.raises(OutputDirError, match="is not writable"):
            _run(output_dir=str(out))
    finally:
        if out.is_relative_to(tmp_path):
            out.chmod(0o755)


def test_a_full_disk_fails_before_training(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(nsru.checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=200 * 1024))
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(OutputDirError, match=r"has 0.2 MiB free but the run's checkpoints need about [\d.]+ MiB; "
                                             "nothing was trained"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, **OPTIONS, output_dir=str(tmp_path))
    assert all(float(m.lora_B.detach().abs().max()) == 0 for m in nsru.nsru_modules(model).values())  # B starts at 0
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_disk_filling_up_mid_run_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    real = nsru.checkpoint.save_file
    calls = {"n": 0}

    def fill_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(nsru.checkpoint, "save_file", fill_up)
    with pytest.raises(OutputDirError, match=r"could not write checkpoint .*checkpoint-4 \(OSError: \[Errno 28\] No "
                                             r"space left on device\); the earlier checkpoints are untouched \(latest: "
                                             r".*checkpoint-2\)"):
        _run(output_dir=str(tmp_path), save_every=2)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "checkpoint-2").state["step"] == 2
    assert not list(tmp_path.glob(".checkpoint-*"))  # the half-written folder went with the error


# --------------------------------------------------------------------------------------------
# NaN / Inf


def test_inf_in_a_weight_stops_naming_the_step_and_the_module(tmp_path):
    def poison_after_3(model, step):
        if step == 3:
            model.model.layers[1].mlp.down_proj.base_layer.weight[0, 0] = float("inf")
        return {}

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 \(.*= nan.*\) in module "
                                                 r"'model.layers.1.mlp.down_proj' \(the first output with NaN/Inf, on "
                                                 r"the \w+ batch\).*weights of step 3; last good checkpoint: .*checkpoint-2"):
        _run(output_dir=str(tmp_path), save_every=2, eval_every=1, eval_fn=poison_after_3)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2" and not (tmp_path / "checkpoint-4").exists()
    assert read_checkpoint(tmp_path / "checkpoint-2").state["step"] == 2  # whole and readable


@register_method("nan-gradient", project=True, needs_safe=True, needs_reference=True)
def _nan_gradient(ctx, batch):
    """A finite loss whose gradient is NaN at one module: d sqrt(x)/dx at x = 0 is inf, times 0."""
    out = nsru_loss(ctx, batch)
    a = ctx.model.model.layers[0].self_attn.o_proj.lora_A
    out["loss"] = out["loss"] + torch.sqrt(a.abs() * 0).sum()
    return out


def test_a_nan_gradient_stops_naming_the_step_and_the_module(tmp_path):
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at step 1 \(gradient norm = nan\) in module "
                                                     r"'model.layers.0.self_attn.o_proj'; stopped.*weights of step 0"):
            _run(method="nan-gradient", max_grad_norm=None)
    finally:
        METHODS.pop("nan-gradient", None)


def test_nan_in_the_retain_statistics_names_the_module():
    model, tok, forget, retain = trained_world_model()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"retain statistics of module 'model.layers.1.mlp.gate_proj'"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, stats="retain", **OPTIONS)
    # a model that cannot write its own samples says so
    with pytest.raises(FloatingPointError, match="NaN/Inf while writing its own samples"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, stats="self", **OPTIONS)


# --------------------------------------------------------------------------------------------
# the same through the command line


@pytest.fixture
def cli_world(tmp_path):
    model, tok, forget, retain = trained_world_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, rows in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    return tmp_path


def _cli(world: Path, out: str, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "nsru", "unlearn", "--model", str(world / "model"), "--forget",
           str(world / "forget.json"), "--retain", str(world / "retain.json"), "--out", str(world / out),
           "--device", "cpu", "steps=16", "batch_size=4", "save_every=2", "lr=1e-2", "seed=0", "progress=false",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_sigkill_then_resume_gives_the_uninterrupted_adapter(cli_world):
    proc = _cli(cli_world, "killed", wait=False)
    ckpts = cli_world / "killed" / "checkpoints"
    _kill_when(proc, lambda: ckpts.is_dir() and latest_checkpoint(ckpts) is not None)
    _leave_a_half_written_checkpoint(ckpts)
    resumed = _cli(cli_world, "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(ckpts.glob(".checkpoint-*"))  # the leftover was cleared
    # The uninterrupted run, here rather than through a third command (the CLI's run is bit for bit this one).
    full = _adapter(_run(steps=16).model)
    got = load_file(str(cli_world / "killed" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in full.items())


def test_cli_unwritable_out_fails_before_loading_the_model(cli_world):
    (cli_world / "a-file").write_text("x")
    proc = _cli(cli_world, "a-file/out")
    assert proc.returncode != 0 and "a-file/out" in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stdout.lower()
