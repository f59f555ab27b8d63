"""Hostile inputs: each gets an error (or, where configured, a warning) that names the file, line or
module and says what was expected (DESIGN §8)."""

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nsru
from nsru.config import ConfigError, UnlearnConfig
from nsru.data import DataError, encode_qa, encode_text, load_rows
from tinylm import one_thread, tiny_llama, trained_world_model

ROW = {"question": "Where does Anna Novak live ?", "answer": "Anna Novak lives in Oslo ."}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# --------------------------------------------------------------------------------------------
# data files


def test_malformed_json_array_names_file_and_line(tmp_path):
    bad = tmp_path / "forget.json"
    bad.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "c", "answer": "d",}\n]\n')
    with pytest.raises(DataError, match=r"forget.json: line 3: invalid JSON \(.+\)$"):  # our words; the parser's inside
        load_rows(bad, "forget")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "retain.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n" + '{"question": "x", "answer": \n')
    with pytest.raises(DataError, match=r"retain.jsonl: line 3: invalid JSON \(.+ at column 29\)$"):
        load_rows(bad, "retain")


def test_wrong_field_type_names_line_field_and_type(tmp_path):
    bad = tmp_path / "forget.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps({"question": 42, "answer": "x"}) + "\n")
    with pytest.raises(DataError, match=r"forget.jsonl: line 2: field 'question' must be a string, got int"):
        load_rows(bad, "forget")
    bad.write_text(json.dumps({**ROW, "perturbed_answer": [1, 2]}) + "\n")
    with pytest.raises(DataError, match=r"forget.jsonl: line 1: field 'perturbed_answer' must be a list of strings"):
        load_rows(bad, "forget")


def test_a_row_that_is_not_an_object_is_named(tmp_path):
    bad = tmp_path / "forget.json"
    bad.write_text(json.dumps([ROW, ["a", "list"]]))
    with pytest.raises(DataError, match=r"forget.json: line 1: expected an object with 'question' and 'answer', got list"):
        load_rows(bad, "forget")


def test_an_empty_forget_set_is_refused_before_any_work(tmp_path):
    empty = tmp_path / "forget.json"
    empty.write_text("[]")
    model, tok, _, retain = trained_world_model(steps=0)  # untrained: it must fail before it matters
    with pytest.raises(DataError, match=r"forget set .*forget.json: no rows \(an empty forget set\)"):
        nsru.unlearn(model, tok, forget=str(empty), retain=retain, steps=1, progress=False)
    assert not nsru.nsru_modules(model)
    with pytest.raises(DataError, match=r"forget.json: the file is empty"):
        empty.write_text("  \n")
        load_rows(empty, "forget")


def test_a_forget_item_longer_than_the_context_is_cut_with_a_warning_or_refused():
    _, tok, _, _ = trained_world_model(steps=0)
    long_answer = ROW["answer"] + " ." * 20
    with pytest.warns(UserWarning, match=r"forget.json: line 4 is \d+ tokens, longer than max_length=12: the answer "
                                         r"was cut to \d+ of its \d+ tokens"):
        enc = encode_qa(tok, ROW["question"], long_answer, 12, too_long="warn", where="forget.json: line 4")
    assert len(enc["input_ids"]) == 12
    with pytest.raises(DataError, match=r"forget row 2 is \d+ tokens, longer than max_length=12; raise max_length"):
        encode_qa(tok, ROW["question"], long_answer, 12, too_long="error", where="forget row 2")
    with pytest.raises(DataError, match=r"text 'Anna Novak .*' is \d+ tokens, longer than max_length=4"):
        encode_text(tok, long_answer, 4, too_long="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default for scoring and statistics: cut quietly
        encode_qa(tok, ROW["question"], long_answer, 12)


# --------------------------------------------------------------------------------------------
# adapter files


@pytest.fixture
def adapter_dir(tmp_path):
    model = tiny_llama(50, hidden=32)
    nsru.apply_nsru(model, target_modules=["q_proj", "v_proj"], r=4)
    return nsru.save_adapter(model, tmp_path / "adapter")


def test_an_adapter_of_another_model_names_the_module_and_shapes(adapter_dir):
    other = tiny_llama(50, hidden=64)  # same module names, other widths
    with pytest.raises(ValueError, match=r"adapter.safetensors: model.layers.0.self_attn.q_proj.lora_A has shape "
                                         r"\(4, 32\) but module 'model.layers.0.self_attn.q_proj' \(64 -> 64, r=4\) "
                                         r"needs \(4, 64\)"):
        nsru.load_adapter(other, adapter_dir)
    assert not nsru.nsru_modules(other)  # nothing was changed
    deeper = tiny_llama(50, hidden=32, layers=3)
    nsru.load_adapter(deeper, adapter_dir)  # a model with more layers takes it where the names match
    shallower = tiny_llama(50, hidden=32, layers=1)
    with pytest.raises(ValueError, match=r"has no module named 'model.layers.1.self_attn.q_proj' \(2 of 4 adapter "
                                         r"modules missing\)"):
        nsru.load_adapter(shallower, adapter_dir)


def test_missing_or_extra_tensors_in_the_safetensors_file_are_named(adapter_dir):
    file = adapter_dir / "adapter.safetensors"
    tensors = load_file(str(file))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.v_proj.lora_B"}
    save_file(missing, str(file))
    with pytest.raises(ValueError, match=r"adapter.safetensors: missing tensor 'model.layers.1.self_attn.v_proj.lora_B'"):
        nsru.load_adapter(tiny_llama(50, hidden=32), adapter_dir)
    save_file({**tensors, "model.layers.0.mlp.up_proj.lora_A": torch.zeros(4, 32)}, str(file))
    with pytest.raises(ValueError, match=r"adapter.safetensors: 1 tensors that adapter_config.json does not list "
                                         r"\(e.g. 'model.layers.0.mlp.up_proj.lora_A'\)"):
        nsru.load_adapter(tiny_llama(50, hidden=32), adapter_dir)


class _Boom:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_a_pickle_where_safetensors_is_expected_is_refused_and_never_loaded(adapter_dir, tmp_path):
    marker = tmp_path / "unpickled"
    (adapter_dir / "adapter.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ValueError, match=r"adapter.safetensors: cannot read adapter weights"):
        nsru.load_adapter(tiny_llama(50, hidden=32), adapter_dir)
    torch.save({"x": _Boom(str(marker))}, adapter_dir / "adapter.safetensors")  # torch.save's zip of pickles
    with pytest.raises(ValueError, match=r"adapter.safetensors: cannot read adapter weights"):
        nsru.load_adapter(tiny_llama(50, hidden=32), adapter_dir)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# configuration


def test_an_unknown_config_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'learning_rate' \(options: .*, lr, "):
        UnlearnConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown option 'stpes'; did you mean 'steps'\?"):
        nsru.unlearn(None, None, forget=[ROW], stpes=3)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("unlearn:\n  lr: 1e-3\n  fsdpp: true\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown option 'fsdpp'; did you mean 'fsdp'\?"):
        UnlearnConfig.from_yaml(cfg)
