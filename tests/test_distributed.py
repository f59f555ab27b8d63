"""Two processes (torchrun, gloo, CPU) give the adapter of one process on the same global batch.

One torchrun launch runs every two-process case (starting two interpreters costs more than the
training), and the one-process references run here, on the same base weights and data.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nsru
from nsru.checkpoint import latest_checkpoint
from tinylm import one_thread, trained_world_model

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# No clipping and few steps: the first step's gradient is compared as it is.
# 256 self-samples: the setting TOL was fixed at (with 64 the null space is wider, the adapter moves
# more, and float reduction order shows up to 2e-5 in its weights)
OPTIONS = {"steps": 4, "batch_size": 4, "lr": 1e-2, "max_grad_norm": None, "progress": False, "seed": 0,
           "self_samples": 256}
TOL = 1e-5


def ragged_world(steps: int = 250):
    """The tiny world with answers of different lengths, so that the two processes' shards hold
    different numbers of tokens and a per-process mean would weight tokens unequally. (``steps=0``:
    the untrained model, for callers that load the trained weights from a file.)"""
    model, tok, forget, retain = trained_world_model(steps=steps)
    forget = [{**r, "answer": r["answer"] + " ." * (3 * i)} for i, r in enumerate(forget)]
    retain = [{**r, "answer": r["answer"] + " ." * (i % 5)} for i, r in enumerate(retain)]
    return model, tok, forget, retain


SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import nsru, nsru.checkpoint, nsru.train
    from nsru.methods import METHODS
    from safetensors.torch import load_file, save_file
    from test_distributed import OPTIONS, ragged_world

    out, rank = {out!r}, int(os.environ["RANK"])
    nsru.distributed.init_distributed_from_env()
    writes = []
    real_save = nsru.train.save_checkpoint
    def recording_save(*args, **kwargs):
        writes.append(rank)
        return real_save(*args, **kwargs)
    nsru.train.save_checkpoint = recording_save

    def adapter(model):
        return {{f"{{n}}.{{p}}": getattr(m, p).detach().clone() for n, m in nsru.nsru_modules(model).items()
                for p in ("lora_A", "lora_B", "retain_basis")}}

    def first_grads(name):
        def fn(model, step):  # after the optimizer step; .grad still holds the step's gradient
            if step == 1:
                save_file({{f"{{n}}.{{p}}": getattr(m, p).grad.contiguous() for n, m in nsru.nsru_modules(model).items()
                           for p in ("lora_A", "lora_B")}}, f"{{out}}/{{name}}-grad-{{rank}}.safetensors")
            return {{}}
        return fn

    def run(name, **extra):
        model, tok, forget, retain = ragged_world(steps=0)
        model.load_state_dict(load_file(out + "/base.safetensors"))
        res = nsru.unlearn(model, tok, forget=forget, retain=retain, **{{**OPTIONS, **extra}}, eval_every=1,
                           eval_fn=first_grads(name))
        save_file(adapter(model), f"{{out}}/{{name}}-{{rank}}.safetensors")
        return model, res

    run("ddp", output_dir=out + "/ckpt", save_every=2)
    model, _ = run("fsdp", fsdp=True)
    run("fsdp-band", fsdp=True, layers="1")  # adapters in the top block only: a frozen bottom
    def sharded_first():  # adapters added and the model sharded before nsru.unlearn: statistics run sharded too
        model, tok, forget, retain = ragged_world(steps=0)
        model.load_state_dict(load_file(out + "/base.safetensors"))
        nsru.apply_nsru(model, r=8, alpha=16.0)
        nsru.distributed.shard_model(model)
        nsru.unlearn(model, tok, forget=forget, retain=retain, **OPTIONS, fsdp=True)
        save_file(adapter(model), f"{{out}}/fsdp-early-{{rank}}.safetensors")
    sharded_first()
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    shard = {{"type": type(w).__name__, "local": list(w.to_local().shape), "full": list(w.shape),
              "lora_A": type(model.model.layers[0].self_attn.q_proj.lora_A).__name__}}
    nsru_loss = METHODS["nsru"].loss
    def local_mean_loss(ctx, batch):  # a method that never asks ctx.denom: the old per-process mean
        counts, ctx.counts = ctx.counts, None
        try:
            return nsru_loss(ctx, batch)
        finally:
            ctx.counts = counts
    METHODS["nsru"] = dataclasses.replace(METHODS["nsru"], loss=local_mean_loss)
    run("local")
    open(out + "/a-file", "w").close()
    try:  # rank 0 checks the folder; every rank must fail with its message, none may hang
        run("unwritable", output_dir=out + "/a-file/out")
        refused = None
    except nsru.checkpoint.OutputDirError as err:
        refused = str(err)
    with open(f"{{out}}/report-{{rank}}.json", "w") as f:
        json.dump({{"writes": writes, "shard": shard, "refused": refused}}, f)
    """
)


def _rel_err(got: dict, want: dict) -> float:
    """‖got − want‖ / ‖want‖ over every tensor of ``want`` together (step 1's lora_A gradients
    are zero, since B starts at zero)."""
    keys = sorted(want)
    g, w = (torch.cat([d[k].flatten() for k in keys]) for d in (got, want))
    return float((g - w).norm() / w.norm())


def _max_diff(a: dict, b: dict, keys=None) -> float:
    keys = keys or [k for k in a if not k.endswith("retain_basis")]
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def _one_process(out: Path, **extra) -> tuple[dict, dict]:
    """The one-process adapter and first-step gradients on the same base weights and data."""
    model, tok, forget, retain = ragged_world()
    model.load_state_dict(load_file(str(out / "base.safetensors")))
    grads = {}

    def keep(m, step):
        if step == 1:
            grads.update({f"{n}.{p}": getattr(l, p).grad.clone() for n, l in nsru.nsru_modules(m).items()
                          for p in ("lora_A", "lora_B")})
        return {}

    with one_thread():
        nsru.unlearn(model, tok, forget=forget, retain=retain, **{**OPTIONS, **extra}, eval_every=1, eval_fn=keep)
    params = {f"{n}.{p}": getattr(l, p).detach().clone() for n, l in nsru.nsru_modules(model).items()
              for p in ("lora_A", "lora_B", "retain_basis")}
    return params, grads


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    model = ragged_world()[0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "base.safetensors"))
    script = out / "run.py"
    script.write_text(SCRIPT.format(tests=str(HERE), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(out: Path, name: str) -> list[dict]:
    return [load_file(str(out / f"{name}-{r}.safetensors")) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(two_processes):
    return _one_process(two_processes)


def test_two_processes_give_the_one_process_adapter(two_processes, one_process):
    """Global-batch normalisation: the per-process losses add up to the one-process loss, so the
    first step's summed gradient and the final adapter match one process within 1e-5, every rank
    holds the same bases and adapter, and only rank 0 writes checkpoints."""
    out = two_processes
    ref, ref_grads = one_process
    r0, r1 = _load(out, "ddp")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # identical on both ranks, bases included
    for key in (k for k in ref if k.endswith("retain_basis")):  # the same subspace as one process
        u, v = r0[key], ref[key]
        assert u.shape == v.shape and float((u @ u.T - v @ v.T).abs().max()) < TOL, key
    g0, g1 = _load(out, "ddp-grad")
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert _rel_err(g0, ref_grads) < TOL
    assert _max_diff(r0, ref) < TOL
    reports = [json.loads((out / f"report-{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["writes"] == [0, 0] and reports[1]["writes"] == []  # checkpoints 2 and 4, by rank 0
    assert reports[0]["refused"] == reports[1]["refused"] and "a-file/out is not writable" in reports[1]["refused"]
    assert latest_checkpoint(out / "ckpt").name == "checkpoint-4"


def test_a_per_process_mean_would_differ(two_processes, one_process):
    """The shards hold different token counts, so the old per-process mean gives another adapter:
    the comparison above can fail."""
    ref, _ = one_process
    local = _load(two_processes, "local")[0]
    assert _max_diff(local, ref) > 100 * TOL


def test_fsdp_shards_the_base_weights_and_gives_the_one_process_adapter(two_processes, one_process):
    out = two_processes
    ref, ref_grads = one_process
    r0, r1 = _load(out, "fsdp")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert _max_diff(r0, ref) < TOL
    g0, _ = _load(out, "fsdp-grad")
    assert _rel_err(g0, ref_grads) < TOL
    early = _load(out, "fsdp-early")[0]  # sharded before the statistics
    assert _max_diff(early, ref) < TOL
    band, _ = _one_process(out, layers="1")  # one process caches the frozen block's outputs; FSDP runs it
    assert _max_diff(_load(out, "fsdp-band")[0], band) < TOL
    shard = json.loads((out / "report-0.json").read_text())["shard"]
    assert shard["type"] == "DTensor" and shard["local"][0] * 2 == shard["full"][0]  # half the rows each
    assert shard["lora_A"] == "Parameter"  # the adapters stay whole


def test_gradient_accumulation_gives_the_one_batch_adapter(tmp_path):
    model = ragged_world()[0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base.safetensors"))
    big, big_grads = _one_process(tmp_path)
    accum, accum_grads = _one_process(tmp_path, grad_accum=2)
    assert _rel_err(accum_grads, big_grads) < TOL
    assert _max_diff(accum, big) < TOL


def test_every_loss_adds_up_over_shards_with_the_global_count():
    """Each objective's sum over shards, each divided by the global count, is its full-batch mean:
    the identity the trainer's normalisation rests on."""
    from nsru import objectives as obj

    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(6, 9, 11, generator=g), torch.randn(6, 9, 11, generator=g)
    labels = torch.randint(0, 11, (6, 9), generator=g)
    labels[torch.rand(6, 9, generator=g) < 0.4] = obj.IGNORE_INDEX
    mask = (torch.rand(6, 9, generator=g) < 0.7).long()
    hidden, ref_hidden, control = torch.randn(6, 9, 5, generator=g), torch.randn(6, 9, 5, generator=g), torch.randn(5)
    logp, ref_logp, lengths = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randint(1, 9, (6,))
    losses = {
        "tokens": [lambda s, d: obj.nll_loss(logits[s], labels[s], d),
                   lambda s, d: obj.unlikelihood_loss(logits[s], labels[s], denom=d),
                   lambda s, d: obj.kl_loss(logits[s], ref_logits[s], labels[s], d)],
        "sequences": [lambda s, d: obj.npo_loss(logp[s], ref_logp[s], 0.1, d),
                      lambda s, d: obj.simnpo_loss(logp[s], lengths[s], denom=d),
                      lambda s, d: obj.dpo_loss(logp[s], ref_logp[s], ref_logp[s] * 0.5, logp[s] * 0.3, denom=d)],
        "positions": [lambda s, d: obj.rmu_forget_loss(hidden[s], control, mask[s], d),
                      lambda s, d: obj.rmu_retain_loss(hidden[s], ref_hidden[s], mask[s], d)],
    }
    shards = [slice(0, 1), slice(1, 4), slice(4, 6)]  # unequal shards, unequal token counts
    whole = obj.batch_counts(labels, mask)
    for kind, fns in losses.items():
        for fn in fns:
            total = sum(fn(s, whole[kind]) for s in shards)
            assert torch.allclose(total, fn(slice(None), None), atol=1e-6), (kind, fn)
            assert not torch.allclose(sum(fn(s, None) for s in shards) / 3, fn(slice(None), None), atol=1e-4)


# --------------------------------------------------------------------------------------------
# the command line under torchrun


@pytest.mark.slow
def test_nsru_unlearn_under_torchrun_writes_one_run_with_the_one_process_adapter(tmp_path, capsys):
    """The README's command (`torchrun --nproc_per_node 2 -m nsru unlearn ... --out x`; here with
    --standalone, for a free port) on a fresh --out: rank 0 owns the run folder, both processes
    train, and the adapter is the one of one process; log.txt holds one run's lines."""
    from nsru import cli
    from nsru.safe_targets import DEFAULT_TEMPLATES
    from tinylm import tiny_llama, tiny_world, word_tokenizer

    forget, retain = tiny_world()
    texts = [r["question"] + " " + r["answer"] for r in forget + retain]
    tok = word_tokenizer(texts + [t.replace("{subject}", "x") for t in DEFAULT_TEMPLATES])
    tiny_llama(len(tok), hidden=32, layers=2).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, rows in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    args = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.json"), "--retain",
            str(tmp_path / "retain.json"), "steps=2", "batch_size=4", "lr=1e-2", "max_grad_norm=null",
            "stats=retain", "progress=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nsru",
           *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=HERE.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("new run in") == 1  # rank 0 prints, the other process does not

    with one_thread():
        assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter.safetensors"))
    assert two.keys() == one.keys()
    assert _max_diff(two, one) < TOL
    for key in (k for k in one if k.endswith("retain_basis")):  # the same subspace (eigenvector signs may differ)
        u, v = two[key], one[key]
        assert u.shape == v.shape and float((u @ u.T - v @ v.T).abs().max()) < TOL, key
    log = (tmp_path / "two" / "log.txt").read_text().splitlines()
    for line in ("loading ", "nsru unlearn: new run in", "done: 2 steps", "wrote "):
        assert sum(line in entry for entry in log) == 1, (line, log)
    history = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["step"] for h in history] == [1, 2]
