"""The ``"self"`` source of the retain statistics: texts the target model writes itself.

Before training, the model answers generic prompts (with a chat template) or continues BOS
(without one); sampling is seeded and leaves the caller's random state alone. The rows are cached
as JSON under ``$NSRU_CACHE/self-samples``, keyed by a fingerprint of the model (its config, its
tokenizer's size and the leading values of its base weights) and the sampling settings; under
``torch.distributed`` every process reads the cache only when every process finds it. Rows that
name a forget subject (:func:`subjects_of`) are dropped. :mod:`nsru.stats_sources` combines these
rows with the other sources.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nsru.atomic import atomic_write
from nsru.cache import cache_dir
from nsru.data import has_chat_template, pad_encodings, pad_token_id, prompt_ids
from nsru.distributed import dist_info
from nsru.layer import adapter_disabled, model_device

GENERIC_PROMPTS: tuple[str, ...] = (
    "Write a short paragraph about the ocean.",
    "Explain how a bicycle works.",
    "What are some tips for a good night's sleep?",
    "Describe a typical day on a farm.",
    "How do plants make their food?",
    "Write a few sentences about the history of a big city.",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for vegetable soup.",
    "Explain what a computer program is.",
    "Describe the water cycle.",
    "Why do we have seasons?",
    "Write a short story about a lost dog.",
    "What should I pack for a camping trip?",
    "Explain how vaccines help the body.",
    "Describe the planets of the solar system.",
    "What makes a good friend?",
    "How does a train engine work?",
    "Tell me about the rainforest and its animals.",
    "Explain the rules of football in a few sentences.",
    "How do you learn a new language?",
    "Describe how bread is made.",
    "What is electricity?",
    "Write a paragraph about mountains.",
    "How do birds fly?",
    "Explain what an economy is.",
    "Give advice for a job interview.",
    "Describe a famous old building and why people visit it.",
    "What is the role of the heart in the body?",
    "Explain how the internet sends a message.",
    "Write a short poem about autumn.",
    "What are the main kinds of music?",
    "Explain why exercise is healthy.",
)
"""Topic prompts for ``"self"`` samples: everyday and encyclopedic subjects, no named person."""

_FINGERPRINT_VALUES = 4096


def _fingerprint(model: nn.Module, tokenizer) -> str:
    """A short hash that changes when the base weights, the config or the tokenizer change."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else type(model).__name__).encode())
    h.update(str(len(tokenizer)).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # adapters are not the model that writes the samples
                continue
            h.update(f"{name}{tuple(p.shape)}".encode())
            if type(p.data) is torch.Tensor or isinstance(p.data, nn.Parameter):  # not a shard (FSDP): the same on every rank
                flat = p.detach().reshape(-1)[:_FINGERPRINT_VALUES].float().cpu()
                h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def row_subjects(rows: Sequence[Mapping]) -> list[str]:
    """The distinct non-empty ``subject`` of ``rows``, stripped, in order of first appearance."""
    return list(dict.fromkeys(s.strip() for row in rows if isinstance(s := row.get("subject"), str) and s.strip()))


def subjects_of(rows: Sequence[Mapping]) -> list[str]:
    """The forget subjects to keep out of the statistics: each row's ``subject`` and its last word."""
    found: set[str] = set()
    for subject in row_subjects(rows):
        found.add(subject)
        last = subject.split()[-1]
        if len(last) > 3:
            found.add(last)
    return sorted(found)


def _names_any(text: str, subjects: Sequence[str]) -> bool:
    return any(re.search(rf"\b{re.escape(s)}\b", text, flags=re.IGNORECASE) for s in subjects)


@torch.no_grad()
def sample_self(
    model: nn.Module,
    tokenizer,
    n: int,
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    exclude: Sequence[str] = (),
    cache: str | Path | None = None,
    batch_size: int = 16,
    temperature: float = 0.8,
    progress: bool = False,
) -> list[dict]:
    """``n`` texts the model writes itself, as rows for the statistics.

    With a chat template: answers to ``prompts`` (default :data:`GENERIC_PROMPTS`, cycled), as
    question-answer rows; without: continuations of BOS, as text rows. Sampling is seeded and
    leaves the caller's random state alone; results are cached as JSON under ``cache``
    (``$NSRU_CACHE/self-samples``) by the model's fingerprint and the sampling settings. Rows that
    name any of ``exclude`` (e.g. :func:`subjects_of` the forget rows) are dropped afterwards, so
    fewer than ``n`` may come back. With ``progress`` a bar counts the samples while they are written.
    """
    if n <= 0:
        return []
    chat = has_chat_template(tokenizer)
    prompts = list(prompts or GENERIC_PROMPTS) if chat else [""]
    settings = {"n": n, "prompts": prompts, "max_new_tokens": max_new_tokens, "seed": seed,
                "temperature": temperature, "model": _fingerprint(model, tokenizer)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache) if cache is not None else cache_dir() / "self-samples"
    path = folder / f"{key}.json"
    # Under torch.distributed every process generates (a sharded model's forward is collective)
    # unless every process finds the cache.
    cached = torch.tensor([1.0 if path.is_file() else 0.0], device=model_device(model))
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(cached, op=torch.distributed.ReduceOp.MIN)
    if cached.item() == 1.0:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    else:
        rows = _generate_rows(model, tokenizer, n, prompts, chat, max_new_tokens, seed, batch_size, temperature,
                              progress)
        if dist_info()[0] == 0:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1)
                                                          + "\n", encoding="utf-8"))
    return [r for r in rows if not _names_any(r.get("answer", r.get("text", "")), exclude)]


def _generate_rows(model, tokenizer, n, prompts, chat, max_new_tokens, seed, batch_size, temperature,
                   progress) -> list[dict]:
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    bar = tqdm(total=n, desc="self-samples", unit="sample", disable=not progress, leave=False)
    try:
        # the model before training (adapters off: also skips their op on every generated token)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), adapter_disabled(model):
            torch.manual_seed(seed)
            for lo in range(0, n, batch_size):
                chosen = [prompts[i % len(prompts)] for i in range(lo, min(n, lo + batch_size))]
                enc = [{"input_ids": prompt_ids(tokenizer, p) if chat else _bos(tokenizer)} for p in chosen]
                batch = pad_encodings(enc, pad, padding_side="left")
                texts = generate_texts(model, tokenizer, batch, device, "writing its own samples for stats='self'",
                                       max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                       top_p=0.95, pad_token_id=pad)
                for prompt, text in zip(chosen, texts):
                    text = text.strip()
                    if text:
                        rows.append({"question": prompt, "answer": text} if chat else {"text": text})
                bar.update(len(chosen))
    finally:
        bar.close()
        model.train(was_training)
    return rows


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise ValueError("sampling 'self' texts without a chat template needs a bos or eos token to start from")
    return [int(bos)]


def generate_texts(model, tokenizer, batch: dict, device, doing: str, **settings) -> list[str]:
    """The decoded continuations of a left-padded ``batch`` (``model.generate`` with ``settings``);
    NaN/Inf in the model's outputs is a ``FloatingPointError`` saying what it was ``doing``."""
    ids = batch["input_ids"].to(device)
    try:
        out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device), **settings)
    except RuntimeError as e:
        if "inf" not in str(e) and "nan" not in str(e):
            raise
        raise FloatingPointError(f"the model's outputs are NaN/Inf while {doing} ({e}); check its weights") from None
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
