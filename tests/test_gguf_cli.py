"""A GGUF file as ``--model`` of the command line: ``nsru unlearn``, ``--resume``, ``eval`` and ``merge``
in this process on the tiny Llama GGUF of test_pretrained, converted once into the cache; and the
one-line refusal of a file that is not GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

import nsru.gguf as G  # noqa: E402
from nsru.cli import common  # noqa: E402
from test_pretrained import write_tiny_llama_gguf  # noqa: E402
from tinylm import run_cli, tiny_world  # noqa: E402

FAST = ("steps=2", "batch_size=4", "stats=retain", "max_length=64", "schedule=constant", "progress=false")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny GGUF, TOFU-style forget/retain files, and a cache of this module's own (empty)."""
    root = tmp_path_factory.mktemp("gguf_cli")
    gguf_file = root / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(gguf_file)
    forget, retain = tiny_world()

    def jsonl(name, rows):
        rows = [{**r, "paraphrased_answer": r["answer"],
                 "perturbed_answer": [rows[(i + 1) % len(rows)]["answer"]]} for i, r in enumerate(rows)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / name

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NSRU_CACHE", str(root / "cache"))
        yield {"root": root, "gguf": gguf_file, "forget": jsonl("forget.json", forget),
               "retain": jsonl("retain.json", retain), "cache": root / "cache"}


def _no_dequantising(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dequantised the GGUF again although it is cached")

    monkeypatch.setattr(G, "_dequantise", refuse)


def test_unlearn_resume_eval_merge_on_a_gguf_file(files, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    import nsru
    from nsru.cli import rundir as R

    model, run_dir = files["gguf"], tmp_path / "run"
    rc, out, err = run_cli(capsys, "unlearn", "--model", model, "--forget", files["forget"], "--retain",
                           files["retain"], "--out", run_dir, *FAST)
    assert rc == 0, err
    log = (run_dir / R.LOG).read_text()
    assert f"dequantising {model}" in log and "writing a safetensors copy" in log
    (entry,) = (files["cache"] / "gguf").iterdir()
    assert entry.name.startswith("tiny-llama.F32-") and (entry / "model.safetensors").is_file()
    run_cfg, _ = R.RunDir(run_dir).read_config()
    assert run_cfg["model"] == str(model.resolve())
    adapter_cfg = json.loads((run_dir / R.ADAPTER / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(model.resolve())

    _no_dequantising(monkeypatch)  # from here on, every load reads the cached copy
    rc, out, err = run_cli(capsys, "unlearn", "--out", run_dir, "--resume", "steps=3")  # the model from config.yaml
    assert rc == 0, err
    assert len((run_dir / R.HISTORY).read_text().splitlines()) == 3
    assert "dequantising" not in (run_dir / R.LOG).read_text().split("resuming run")[1]

    rc, out, err = run_cli(capsys, "eval", "--model", model, "--adapter", run_dir, "--forget", files["forget"],
                           "--retain", files["retain"], "--max-new-tokens", 4, "--out", run_dir)
    assert rc == 0, err
    assert "dequantising" not in out
    assert json.loads((run_dir / R.METRICS).read_text())["eval"]["forget_prob"] is not None

    merged = tmp_path / "merged"
    rc, out, err = run_cli(capsys, "merge", "--model", model, "--adapter", run_dir, "--out", merged)
    assert rc == 0, err
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # a plain transformers model, not a GGUF-quantised one
    assert json.loads((merged / "nsru_merge.json").read_text())["base_model"] == str(model.resolve())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base, _ = G.load_gguf(model)
    with torch.no_grad():
        before = base(ids).logits
        nsru.load_adapter(base, run_dir / R.ADAPTER)
        after = base(ids).logits
    assert (after - before).abs().max() > 1e-5  # the adapter moved the model, and the merge holds it
    torch.testing.assert_close(plain(ids).logits, after, atol=1e-4, rtol=1e-4)


def test_load_model_honours_dtype_and_a_gguf_tokenizer(files, monkeypatch):
    G.gguf_folder(files["gguf"])  # converted (if no test before did)
    _no_dequantising(monkeypatch)
    lines = []
    lm, tok = common.load_model(str(files["gguf"]), tokenizer=str(files["gguf"]), dtype="bfloat16", device="cpu",
                                log=lines.append)
    assert lm.dtype == torch.bfloat16 and not lm.training
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.eos_token
    assert len(lines) == 1 and lines[0].startswith(f"loading {files['gguf']}")
    auto, _ = common.load_model(str(files["gguf"]), device="cpu", log=lines.append)
    assert auto.dtype == torch.float32  # "auto": as the cached copy was saved


def _one_line(rc, err, command, *parts):
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"nsru {command}: "), err
    for part in parts:
        assert part in err, err


@pytest.mark.parametrize("command", ["unlearn", "eval", "subspace", "merge"])
def test_a_file_that_is_not_gguf_is_refused(files, tmp_path, capsys, command):
    notes = tmp_path / "weights.bin"
    notes.write_bytes(b"PK\x03\x04 not a model")
    extra = {"unlearn": ["--forget", files["forget"], "--retain", files["retain"], "--out", tmp_path / "o"],
             "eval": ["--forget", files["forget"]],
             "subspace": ["--retain", files["retain"], "--out", tmp_path / "o"],
             "merge": ["--adapter", tmp_path, "--out", tmp_path / "o"]}[command]
    rc, out, err = run_cli(capsys, command, "--model", notes, *extra)
    _one_line(rc, err, command, f"--model {notes}: a file but not a GGUF one",
              "expected a model folder written by save_pretrained or a .gguf file")
    rc, out, err = run_cli(capsys, command, "--model", tmp_path / "missing.gguf", *extra)
    _one_line(rc, err, command, f"--model {tmp_path / 'missing.gguf'}: no such file")
    assert not (tmp_path / "o").exists()


def test_gguf_package_missing_says_how_to_install(files, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    rc, out, err = run_cli(capsys, "eval", "--model", files["gguf"], "--forget", files["forget"])
    _one_line(rc, err, "eval", "needs the gguf package: pip install gguf")


def test_cache_folder_is_per_content(tmp_path):
    """A file rewritten in place (same name and size, other weights) gets an entry of its own."""
    a = tmp_path / "m.gguf"
    write_tiny_llama_gguf(a)
    key = G._cache_key(a)
    data = bytearray(a.read_bytes())
    data[-8:] = bytes(8)  # the end of the last tensor
    a.write_bytes(bytes(data))
    assert G._cache_key(a) != key and len(data) == os.path.getsize(a)
    assert G.is_gguf(a) and not G.is_gguf(tmp_path) and not G.is_gguf(tmp_path / "none.gguf")
    with pytest.raises(ValueError, match=r"x\.gguf: not a GGUF file"):
        (tmp_path / "x.gguf").write_text("hello")
        G.gguf_folder(tmp_path / "x.gguf", cache=tmp_path)


def test_default_cache_root_is_nsru_cache(files):
    assert G.gguf_folder(files["gguf"]).parent == Path(os.environ["NSRU_CACHE"]) / "gguf"
