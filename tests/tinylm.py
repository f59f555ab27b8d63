"""Tiny tokenizers and Llama models built inside the tests (no downloads)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


@contextmanager
def one_thread():
    """Tiny models run far faster on one thread than on two busy cores (0.02 s vs 0.4 s a step
    measured on the shared 2-core CI machine); tests use this around their training."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def word_tokenizer(texts, extra_words=()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words (and punctuation) of ``texts``."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1)
    tok.train_from_iterator(list(texts) + list(extra_words) + ["Question Answer : ?"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# a tiny world of facts: people whose first and last names are shared between forget and retain

FIRST = ["Anna", "Boris", "Clara", "David"]
LAST = ["Berg", "Novak", "Silva"]
CITIES = ["Oslo", "Lima", "Rome", "Kyoto", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Accra", "Porto", "Minsk"]
JOBS = ["baker", "pilot", "nurse", "judge", "tailor", "farmer", "singer", "dentist", "sailor", "poet", "mason", "chef"]


def tiny_world():
    """Twelve people (4 first names × 3 last names), two facts each; forget = two people who share
    a first name and a last name with retain people."""
    people = [f"{f} {l}" for f in FIRST for l in LAST]
    rows = []
    for i, name in enumerate(people):
        rows.append({"question": f"Where does {name} live ?", "answer": f"{name} lives in {CITIES[i]} .",
                     "subject": name})
        rows.append({"question": f"What is the job of {name} ?", "answer": f"{name} is a {JOBS[i]} .",
                     "subject": name})
    forget_people = {"Anna Novak", "Clara Berg"}
    forget = [r for r in rows if r["subject"] in forget_people]
    retain = [r for r in rows if r["subject"] not in forget_people]
    return forget, retain


def unknown_people_rows():
    """Questions about people the world does not contain, answered with refusals: the model learns
    the refusal vocabulary as real LLMs know it (a never-seen token has an untrained output row,
    and all such rows look alike, so no adapter could produce it)."""
    from nsru.safe_targets import DEFAULT_TEMPLATES

    rows = []
    for i, name in enumerate(["Eva Berg", "Igor Novak", "Eva Silva", "Igor Berg"]):
        for j, q in enumerate([f"Where does {name} live ?", f"What is the job of {name} ?"]):
            t = DEFAULT_TEMPLATES[(2 * i + j) % len(DEFAULT_TEMPLATES)]
            rows.append({"question": q, "answer": t.format(subject=name), "subject": name})
    return rows


_CACHE: dict = {}


def trained_world_model(steps: int = 250, seed: int = 0):
    """(model, tokenizer, forget, retain): a tiny Llama trained on every fact of the world until it
    answers them; cached per process (callers get a deep copy of the model)."""
    import copy

    key = (steps, seed)
    if key not in _CACHE:
        with one_thread():
            _CACHE[key] = _train_world(steps, seed)
    model, tok, forget, retain = _CACHE[key]
    return copy.deepcopy(model), tok, forget, retain


def _train_world(steps, seed):
    from nsru.data import QACollator, encode_qa
    from nsru.safe_targets import DEFAULT_TEMPLATES

    forget, retain = tiny_world()
    unknown = unknown_people_rows()
    texts = [r["question"] + " " + r["answer"] for r in forget + retain + unknown]
    texts += [t.replace("{subject}", "x") for t in DEFAULT_TEMPLATES]
    tok = word_tokenizer(texts)
    model = tiny_llama(len(tok), seed=seed)
    rows = forget + retain + unknown
    batch = QACollator(tok)([encode_qa(tok, r["question"], r["answer"]) for r in rows])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.requires_grad_(False)
    return model, tok, forget, retain


@torch.no_grad()
def answer_probs(model, tok, rows, answers=None):
    """Per row, exp(-mean NLL) of the answer (or of ``answers[i]``) given the question."""
    from nsru.data import QACollator, encode_qa
    from nsru.objectives import token_logprobs

    answers = answers if answers is not None else [r["answer"] for r in rows]
    batch = QACollator(tok)([encode_qa(tok, r["question"], a) for r, a in zip(rows, answers)])
    was = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was)
    tok_lp, mask = token_logprobs(logits, batch["labels"])
    return (tok_lp.sum(-1) / mask.sum(-1)).exp()


def tofu_rows(rows):
    """TOFU's fields: paraphrased_answer and perturbed_answer (answers of other rows)."""
    return [{**r, "paraphrased_answer": r["answer"],
             "perturbed_answer": [rows[(i + 1) % len(rows)]["answer"], rows[(i + 2) % len(rows)]["answer"]]}
            for i, r in enumerate(rows)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``nsru.cli.main(argv)`` on one thread: (exit status, stdout, stderr)."""
    from nsru import cli

    capsys.readouterr()
    with one_thread():
        rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
