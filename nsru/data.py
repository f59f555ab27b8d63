"""Question-answer and text data: loading, prompt formatting, tokenisation and collation.

Rows follow TOFU's field names: ``question``, ``answer`` and, optionally, ``paraphrased_answer``,
``perturbed_answer`` (a list), ``safe_answer`` and ``subject``. Text corpora have ``text``.
Sources may be a path to a JSON or JSONL file (TOFU ships JSON lines under a ``.json`` name; both
layouts are read), a list of dicts, a dict of columns, or a ``datasets.Dataset``.

Prompts use the tokenizer's chat template when it has one and ``"Question: ...\\nAnswer:"``
otherwise. Labels are ``-100`` everywhere but on the answer tokens (and the closing eos).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nsru.words import fact_spans

IGNORE_INDEX = -100

QA_OPTIONAL_STR = ("paraphrased_answer", "safe_answer", "subject")


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the source and the row."""


# --------------------------------------------------------------------------------------------
# prompts and tokenisation


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, question: str) -> str:
    """The text the model sees before its answer.

    With a chat template: one user message rendered with ``add_generation_prompt=True``.
    Without: ``"Question: {question}\\nAnswer:"``.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {question}\nAnswer:"


def _answer_text(tokenizer, answer: str) -> str:
    # The plain format ends in "Answer:", so the answer starts after a space; a chat template's
    # generation prompt already ends where the assistant's text begins.
    return answer if has_chat_template(tokenizer) else " " + answer


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_ids(tokenizer, text: str, template: bool = True) -> list[int]:
    """Token ids of the text before an answer: ``text`` as :func:`format_prompt` renders it (or
    as is, with ``template=False``), with the tokenizer's own special tokens only when it has no
    chat template (a rendered chat template carries its own, bos included)."""
    chat = has_chat_template(tokenizer)
    return _ids(tokenizer, format_prompt(tokenizer, text) if template else text, add_special_tokens=not chat)


TOO_LONG = ("cut", "warn", "error")


def _too_long(policy: str, where: str | None, length: int, max_length: int, done: str) -> None:
    """Apply the ``too_long`` policy to an example of ``length`` tokens (``done``: what cutting did)."""
    if policy not in TOO_LONG:
        raise ValueError(f"too_long must be one of {', '.join(TOO_LONG)}, got {policy!r}")
    if policy == "cut":
        return
    message = f"{where or 'an example'} is {length} tokens, longer than max_length={max_length}"
    if policy == "error":
        raise DataError(f"{message}; raise max_length, shorten it, or let it be cut (too_long='warn')")
    warnings.warn(f"{message}: {done}", stacklevel=3)


def encode_qa(tokenizer, question: str, answer: str, max_length: int | None = None, *, too_long: str = "cut",
              where: str | None = None) -> dict:
    """Tokenise one question-answer pair for causal-LM training or scoring.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` as lists of ints; labels are
    ``-100`` on the prompt, the answer's ids (then eos, when the tokenizer has one) after it.
    The prompt and the answer are tokenised separately so the label boundary is exact. With
    ``max_length`` the answer is cut first (keeping at least one answer token), then the prompt
    from the left. ``too_long``: what else happens to a pair longer than that: ``"cut"`` (nothing),
    ``"warn"`` (a warning naming ``where``, e.g. ``"forget.json: line 7"``, and what was cut) or
    ``"error"`` (:class:`DataError`).
    """
    prompt_part = prompt_ids(tokenizer, question)
    answer_ids = _ids(tokenizer, _answer_text(tokenizer, answer), add_special_tokens=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    if not answer_ids:
        raise DataError(f"answer {answer!r} tokenises to nothing")
    if max_length is not None:
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        sizes = (len(prompt_part), len(answer_ids))
        room = max(1, max_length - len(prompt_part))
        answer_ids = answer_ids[:room]
        keep = max_length - len(answer_ids)
        prompt_part = prompt_part[len(prompt_part) - keep:] if keep > 0 else []
        if sum(sizes) > max_length:
            cut = f"the answer was cut to {len(answer_ids)} of its {sizes[1]} tokens"
            if len(prompt_part) < sizes[0]:
                cut += f" and the question to its last {len(prompt_part)} of {sizes[0]}"
            _too_long(too_long, where or f"question {question[:40]!r}", sum(sizes), max_length, cut)
    input_ids = prompt_part + answer_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_part) + list(answer_ids),
    }


def keep_fact_labels(tokenizer, encoded: dict, question: str, answer: str, subject: str | None = None) -> dict:
    """``encoded`` (:func:`encode_qa` of this pair) with labels only on the answer tokens that
    overlap a word of its fact (:func:`nsru.words.fact_spans`: the answer's content words that
    neither the question nor the subject says), so a loss on them acts on "Germany" in "Albert
    Einstein was born in Germany." and not on the words that restate the question. An answer with no
    such word keeps every label."""
    text = _answer_text(tokenizer, answer)
    spans = fact_spans(text, [question, subject] if subject else [question])
    if not spans:
        return encoded
    token_spans = _token_spans(tokenizer, text)
    answer_positions = [i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX][:len(token_spans)]
    keep = [pos for pos, (a, b) in zip(answer_positions, token_spans) if any(a < e and s < b for s, e in spans)]
    if not keep:
        return encoded
    labels = [IGNORE_INDEX] * len(encoded["labels"])
    for pos in keep:
        labels[pos] = encoded["labels"][pos]
    return {**encoded, "labels": labels}


def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` tokenised as :func:`encode_qa` tokenises an answer
    (no special tokens): the fast tokenizer's offsets, else the lengths of the decoded prefixes."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(span) for span in enc["offset_mapping"]]
    ids = _ids(tokenizer, text, add_special_tokens=False)
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    return list(zip([0, *ends[:-1]], ends))


def encode_text(tokenizer, text: str, max_length: int | None = None, *, too_long: str = "cut",
                where: str | None = None) -> dict:
    """Tokenise a corpus document for language modelling: labels are the input ids. ``too_long``
    as in :func:`encode_qa` (a text is cut at its end)."""
    ids = _ids(tokenizer, text, add_special_tokens=True)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if max_length is not None and len(ids) > max_length:
        _too_long(too_long, where or f"text {text[:40]!r}", len(ids), max_length,
                  f"its last {len(ids) - max_length} tokens were cut")
        ids = ids[:max_length]
    if not ids:
        raise DataError(f"text {text[:40]!r} tokenises to nothing")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pad_encodings(
    rows: Sequence[Mapping[str, Sequence[int]]],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad encodings to one batch of ``long`` tensors (attention 0 and labels -100 on pads)."""
    if not rows:
        raise DataError("cannot collate an empty list of examples")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        out["input_ids"][i, sl] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask = r.get("attention_mask")
        out["attention_mask"][i, sl] = 1 if mask is None else torch.tensor(mask, dtype=torch.long)
        labels = r.get("labels")
        if labels is not None:
            out["labels"][i, sl] = torch.tensor(labels, dtype=torch.long)
    return out


def input_batches(encodings: Sequence[Mapping], pad_id: int, device=None, size: int = 16) -> list[dict]:
    """Right-padded ``input_ids``/``attention_mask`` batches of ``size`` encodings for
    ``model(**batch)``, without labels: what statistics and leakage passes run on."""
    out = []
    for i in range(0, len(encodings), size):
        enc = pad_encodings(encodings[i:i + size], pad_id)
        out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)})
    return out


def sequence_keys(lengths: Sequence[int], *rows: torch.Tensor) -> list[bytes]:
    """One key per right-padded row of a batch: the bytes of each tensor's first ``lengths[i]``
    entries (what the per-sequence caches of the trainer and the reference policy are keyed by)."""
    return [b"".join(t[i, :n].cpu().numpy().tobytes() for t in rows) for i, n in enumerate(lengths)]


class QACollator:
    """Pads a list of :func:`encode_qa` / :func:`encode_text` dicts to a batch of tensors.

    Pads with the tokenizer's pad id (eos when it has none), attention 0 and labels -100 on pads.
    ``padding_side="left"`` suits batched generation.
    """

    def __init__(self, tokenizer, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        self.pad_id = pad_token_id(tokenizer)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        return pad_encodings(rows, self.pad_id, self.padding_side, self.pad_to_multiple_of)


# --------------------------------------------------------------------------------------------
# loading


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def _scan_json_array(text: str, where: str) -> list[tuple[int, Any]]:
    """Parse a top-level JSON array, keeping each element's line number."""
    dec = json.JSONDecoder()
    items: list[tuple[int, Any]] = []
    pos = text.index("[") + 1
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return items
    while True:
        pos = skip(pos)
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: line {e.lineno}: invalid JSON ({e.msg})") from None
        items.append((line, value))
        pos = skip(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return items
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"{where}: line {line}: expected ',' or ']' in the JSON array")


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """Rows of a JSON / JSONL file as (location, value) pairs."""
    where = str(path)
    if not path.exists():
        raise DataError(f"{where}: no such file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{where}: the file is empty")
    if stripped[0] == "[":
        return [(f"{where}: line {ln}", v) for ln, v in _scan_json_array(text, where)]
    if stripped[0] == "{":
        # Either one JSON object (a dict of columns, or {"data": [...]}) or JSON lines.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            for key in ("data", "rows", "examples"):
                if isinstance(whole.get(key), list):
                    return [(f"{where}: {key}[{i}]", v) for i, v in enumerate(whole[key])]
            if whole and all(isinstance(v, list) for v in whole.values()):
                return [(f"{where}: row {i}", v) for i, v in enumerate(_columns_to_rows(whole, where))]
            return [(f"{where}: line 1", whole)]
    found = []
    for ln, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            found.append((f"{where}: line {ln}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: line {ln}: invalid JSON ({e.msg} at column {e.colno})") from None
    return found


def _columns_to_rows(columns: Mapping[str, Sequence], where: str) -> list[dict]:
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{where}: columns have different lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    return [{k: columns[k][i] for k in columns} for i in range(n)]


def records(source, text_ok: bool = False) -> list[tuple[str, Any]]:
    """``(location, row)`` pairs of a JSON/JSONL path, a list of dicts or a ``datasets.Dataset``,
    each location naming the file and line (or index) for error messages; rows are not checked."""
    where = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if text_ok and path.suffix == ".txt":
            if not path.exists():
                raise DataError(f"{where}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(f"{where}: line {i}", {"text": t}) for i, t in enumerate(lines, 1) if t.strip()]
        return _read_records(path)
    if type(source).__name__ == "DatasetDict":
        raise DataError(f"{where}: a DatasetDict holds several splits ({', '.join(source)}); pass one")
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        return [(f"{where} row {i}", dict(row)) for i, row in enumerate(source)]
    if isinstance(source, Mapping):
        if source and all(isinstance(v, (list, tuple)) for v in source.values()):
            return [(f"{where} row {i}", r) for i, r in enumerate(_columns_to_rows(source, where))]
        raise DataError(f"{where}: a dict source must map column names to equal-length lists")
    if isinstance(source, Iterable):
        return [(f"{where} row {i}", r) for i, r in enumerate(source)]
    raise DataError(
        f"cannot read data from {where}: expected a JSON/JSONL path, a list of dicts, "
        "a dict of columns or a datasets.Dataset"
    )


def _check_str(row: dict, key: str, loc: str, required: bool) -> None:
    if key not in row or row[key] is None:
        if required:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(f"{loc}: missing field {key!r} (fields present: {have})")
        row.pop(key, None)
        return
    if not isinstance(row[key], str):
        raise DataError(f"{loc}: field {key!r} must be a string, got {type(row[key]).__name__}")
    if required and not row[key].strip():
        raise DataError(f"{loc}: field {key!r} is empty")


def load_qa(source, name: str | None = None) -> list[dict]:
    """Load question-answer rows (TOFU field names) and check them.

    ``question`` and ``answer`` are required strings; ``paraphrased_answer``, ``safe_answer`` and
    ``subject`` optional strings; ``perturbed_answer`` an optional list of strings (a single
    string becomes a one-element list). Other fields are kept as they are. Raises
    :class:`DataError` naming the file and line (or row) of the first bad row, or saying the set
    is empty; ``name`` (e.g. ``"forget"``) is used in that message.
    """
    label = f"{name} set " if name else ""
    rows = []
    for loc, raw in records(source):
        if not isinstance(raw, Mapping):
            raise DataError(f"{loc}: expected an object with 'question' and 'answer', got {type(raw).__name__}")
        row = dict(raw)
        _check_str(row, "question", loc, required=True)
        _check_str(row, "answer", loc, required=True)
        for key in QA_OPTIONAL_STR:
            _check_str(row, key, loc, required=False)
        if row.get("perturbed_answer") is not None:
            pert = row["perturbed_answer"]
            if isinstance(pert, str):
                pert = [pert]
            if not isinstance(pert, (list, tuple)) or not all(isinstance(p, str) for p in pert):
                raise DataError(f"{loc}: field 'perturbed_answer' must be a list of strings")
            row["perturbed_answer"] = list(pert)
        else:
            row.pop("perturbed_answer", None)
        rows.append(row)
    if not rows:
        raise DataError(f"{label}{_describe(source)}: no rows (an empty {name or 'question-answer'} set)")
    return rows


def load_text(source, name: str | None = None, field: str = "text") -> list[dict]:
    """Load a text corpus as ``[{"text": ...}, ...]``.

    Accepts JSON/JSONL with a ``text`` field (or ``field``), a ``.txt`` file (one document per
    non-empty line), a list of strings or dicts, or a ``datasets.Dataset``.
    """
    label = f"{name} set " if name else ""
    rows = []
    for loc, raw in records(source, text_ok=True):
        if isinstance(raw, str):
            raw = {field: raw}
        if not isinstance(raw, Mapping):
            raise DataError(f"{loc}: expected an object with {field!r} or a string, got {type(raw).__name__}")
        row = dict(raw)
        if field != "text" and field in row:
            row["text"] = row.pop(field)
        _check_str(row, "text", loc, required=True)
        rows.append(row)
    if not rows:
        raise DataError(f"{label}{_describe(source)}: no rows (an empty {name or 'text'} corpus)")
    return rows


def load_rows(source, name: str | None = None) -> list[dict]:
    """Question-answer rows when the source has them, text rows otherwise.

    A forget or retain set may be either; the kind is read from the first row.
    """
    found = records(source, text_ok=True)
    if not found:
        raise DataError(f"{name + ' set ' if name else ''}{_describe(source)}: no rows (an empty {name or 'data'} set)")
    first = found[0][1]
    if isinstance(first, str) or (isinstance(first, Mapping) and "question" not in first and "text" in first):
        return load_text([r for _, r in found] if not isinstance(source, (str, os.PathLike)) else source, name)
    return load_qa([r for _, r in found] if not isinstance(source, (str, os.PathLike)) else source, name)


def is_qa(rows: Sequence[Mapping]) -> bool:
    return bool(rows) and "question" in rows[0]
