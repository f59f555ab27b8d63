import json

import pytest
import torch

from nsru.data import (
    IGNORE_INDEX,
    DataError,
    QACollator,
    encode_qa,
    encode_text,
    format_prompt,
    load_qa,
    load_rows,
    load_text,
)
from tinylm import word_tokenizer

TEXTS = ["Who wrote The Red Door ?", "Anna Berg wrote it .", "Where was Anna Berg born ?", "In Oslo ."]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(TEXTS)


def test_plain_prompt_and_labels(tok):
    assert format_prompt(tok, "Who?") == "Question: Who?\nAnswer:"
    enc = encode_qa(tok, "Who wrote The Red Door ?", "Anna Berg wrote it .")
    prompt_ids = tok("Question: Who wrote The Red Door ?\nAnswer:", add_special_tokens=True)["input_ids"]
    answer_ids = tok(" Anna Berg wrote it .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"] == prompt_ids + answer_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert all(isinstance(x, int) for x in enc["input_ids"])


def test_chat_template_prompt(tok):
    import copy

    chat = copy.deepcopy(tok)
    chat.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
        "{% if add_generation_prompt %} assistant :{% endif %}"
    )
    prompt = format_prompt(chat, "Who?")
    assert prompt == "<s> user : Who? </s> assistant :"
    enc = encode_qa(chat, "Who wrote The Red Door ?", "Anna Berg")
    n_prompt = sum(1 for x in enc["labels"] if x == IGNORE_INDEX)
    assert enc["input_ids"][:n_prompt] == chat(format_prompt(chat, "Who wrote The Red Door ?"), add_special_tokens=False)["input_ids"]
    assert enc["labels"][n_prompt:] == chat("Anna Berg", add_special_tokens=False)["input_ids"] + [chat.eos_token_id]


def test_max_length_keeps_an_answer_token(tok):
    enc = encode_qa(tok, "Who wrote The Red Door ?", "Anna Berg wrote it .", max_length=6)
    assert len(enc["input_ids"]) == 6
    assert enc["labels"][-1] != IGNORE_INDEX
    full = encode_qa(tok, "Who wrote The Red Door ?", "Anna Berg wrote it .")
    n_prompt = full["labels"].count(IGNORE_INDEX)
    enc = encode_qa(tok, "Who wrote The Red Door ?", "Anna Berg wrote it .", max_length=n_prompt + 2)
    assert enc["labels"][-2:] == full["labels"][n_prompt:n_prompt + 2]


def test_collator_pads(tok):
    a = encode_qa(tok, "Who wrote The Red Door ?", "Anna Berg wrote it .")
    b = encode_qa(tok, "Where ?", "Oslo")
    batch = QACollator(tok)([a, b])
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    n = len(b["input_ids"])
    assert torch.all(batch["input_ids"][1, n:] == tok.pad_token_id)
    assert torch.all(batch["attention_mask"][1, n:] == 0) and torch.all(batch["attention_mask"][1, :n] == 1)
    assert torch.all(batch["labels"][1, n:] == IGNORE_INDEX)
    left = QACollator(tok, padding_side="left")([a, b])
    assert left["input_ids"][1, -n:].tolist() == b["input_ids"]
    assert torch.all(left["attention_mask"][1, :-n] == 0)


def test_encode_text(tok):
    enc = encode_text(tok, "Anna Berg wrote it .")
    assert enc["labels"] == enc["input_ids"] and enc["input_ids"][-1] == tok.eos_token_id


def test_load_qa_sources(tmp_path):
    rows = [
        {"question": "q1", "answer": "a1", "perturbed_answer": ["x", "y"], "subject": "Anna"},
        {"question": "q2", "answer": "a2", "paraphrased_answer": "b2", "perturbed_answer": "z"},
    ]
    jsonl = tmp_path / "f.json"  # TOFU ships JSON lines under .json
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    arr = tmp_path / "g.json"
    arr.write_text(json.dumps(rows, indent=2))
    from_list = load_qa(rows)
    assert load_qa(jsonl) == from_list == load_qa(str(arr))
    assert from_list[1]["perturbed_answer"] == ["z"]
    assert load_qa({"question": ["q"], "answer": ["a"]}) == [{"question": "q", "answer": "a"}]
    datasets = pytest.importorskip("datasets")
    assert load_qa(datasets.Dataset.from_list([{"question": "q", "answer": "a"}]))[0]["answer"] == "a"


def test_load_qa_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: missing field 'answer'"):
        load_qa(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid JSON"):
        load_qa(broken)
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"question": "q", "answer": "a"},\n  {"question": "q", "answer": 3}\n]')
    with pytest.raises(DataError, match=r"arr.json: line 3: field 'answer' must be a string"):
        load_qa(arr)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty forget set"):
        load_qa(empty, name="forget")
    with pytest.raises(DataError, match="no such file"):
        load_qa(tmp_path / "missing.json")
    with pytest.raises(DataError, match="perturbed_answer"):
        load_qa([{"question": "q", "answer": "a", "perturbed_answer": [1]}])


def test_load_text(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [r["text"] for r in load_text(p)] == ["one", "two"]
    assert load_text(["a", "b"]) == [{"text": "a"}, {"text": "b"}]
    t = tmp_path / "c.txt"
    t.write_text("one\n\ntwo\n")
    assert len(load_text(t)) == 2
    with pytest.raises(DataError, match="row 1: missing field 'text'"):
        load_text([{"text": "x"}, {"body": "y"}])
    assert load_rows(p)[0] == {"text": "one"}
    assert load_rows([{"question": "q", "answer": "a"}])[0]["question"] == "q"
