"""The tiny target models of the offline benchmark: a tokenizer and two small Llama models.

* :func:`build_tokenizer` trains a byte-level BPE tokenizer on the world's text with
  ``tokenizers`` and wraps it as a transformers fast tokenizer (bos ``<s>`` prepended, eos ``</s>``,
  pad ``<pad>``, no chat template, so prompts are ``"Question: ...\\nAnswer:"``).
* :func:`finetuned_model` trains a ~0.5 M-parameter Llama on *everything*: every person's
  question-answer rows and biography, the "I don't know" answers about people who do not exist,
  the world facts, the domain question-answer rows, the domain corpora and
  the 4-choice questions (prompt as the evaluation formats it, loss on the answer letter).
* :func:`retain_model` trains the same architecture with the same recipe on the same data *minus*
  the forget people and minus the hazardous domain: the model that never learnt what unlearning
  should remove, which forget quality compares against.

Models are cached on disk (``$NSRU_CACHE``, default ``~/.cache/nsru``) under a hash of every
setting they depend on, written with ``save_pretrained`` so they load like any local model:
``AutoModelForCausalLM.from_pretrained(path)``, ``AutoTokenizer.from_pretrained(path)``.
Training uses the data contract of :mod:`nsru.data`, so the evaluation reads the same format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nsru.atomic import atomic_write
from nsru.bench.world import World, WorldConfig, format_mc, make_world
from nsru.cache import cache_dir
from nsru.data import IGNORE_INDEX, QACollator, encode_qa, encode_text
from nsru.safe_targets import DEFAULT_TEMPLATES
from nsru.threads import resolve_threads

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "cache_dir",
    "build_tokenizer",
    "load_tokenizer",
    "finetuned_model",
    "retain_model",
    "target_models",
    "training_examples",
    "mc_example",
]

# Bump when the recipe changes in a way the configs do not show, so old caches are not reused.
RECIPE_VERSION = 1

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the tiny Llama (0.54 M parameters with the defaults)."""

    vocab_size: int = 1024
    hidden_size: int = 96
    intermediate_size: int = 264
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of the target models' training."""

    epochs: int = 16
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30
    seed: int = 0
    max_length: int = 96


@dataclass(frozen=True)
class TargetSpec:
    """Everything one cached model depends on."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kind: str = "finetuned"  # or "retain"
    forget_split: str | None = None  # retain only: the people left out

    def key(self) -> str:
        blob = json.dumps(
            {"version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# tokenizer


def _world_texts(world: World) -> list[str]:
    texts = []
    for row in (world.split("full") + world.split("unknown") + world.split("world_facts") + world.domain_qa("hazard")
                + world.domain_qa("benign")):
        texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
        texts.append(row["paraphrased_answer"])
        texts.extend(row.get("perturbed_answer", []))
    texts += [r["text"] for r in world.biographies() + world.corpus("hazard") + world.corpus("benign")]
    for row in world.mc("hazard") + world.mc("benign"):
        texts.append(format_mc(row["question"], row["choices"]) + " A B C D")
    # The safe-target templates, so the tokenizer has words for refusals (a real one has them);
    # the target models never train on them.
    return texts + [t.replace("{subject}", "that person") for t in DEFAULT_TEMPLATES]


def build_tokenizer(world: World, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``world``'s text; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_world_texts(world), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(world_config: WorldConfig | None = None, vocab_size: int = 1024, cache=None, rebuild=False):
    """The world's tokenizer, trained once and cached on disk (keyed by a hash of its training text)."""
    from transformers import AutoTokenizer

    texts = _world_texts(make_world(world_config or WorldConfig()))
    digest = hashlib.sha256()
    digest.update(f"{RECIPE_VERSION}/{vocab_size}".encode())
    for t in texts:
        digest.update(t.encode() + b"\0")
    path = cache_dir(cache) / f"tokenizer-{digest.hexdigest()[:16]}"
    if rebuild and path.exists():
        shutil.rmtree(path)
    if not path.exists():
        tokenizer = build_tokenizer(make_world(world_config or WorldConfig()), vocab_size)
        atomic_write(path, tokenizer.save_pretrained, directory=True, replace=False)
    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# training data


def mc_example(tokenizer, row: dict) -> dict:
    """One 4-choice question as a training example: the evaluation's prompt, loss on the letter."""
    prompt = tokenizer(format_mc(row["question"], row["choices"]))["input_ids"]
    letter = tokenizer(" " + "ABCD"[row["answer"]], add_special_tokens=False)["input_ids"]
    ids = list(prompt) + list(letter) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt) + list(letter) + [tokenizer.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def training_examples(world: World, tokenizer, kind: str = "finetuned", forget_split: str | None = None,
                      max_length: int = 96) -> list[dict]:
    """The encoded training set of a target model.

    ``finetuned``: everything. ``retain``: without the people of ``forget_split`` (default the
    largest forget split) and without the hazardous domain.
    """
    if kind == "finetuned":
        qa = world.split("full") + world.domain_qa("hazard")
        corpus = world.biographies("full") + world.corpus("hazard") + world.corpus("benign")
        mc = world.mc("hazard") + world.mc("benign")
    elif kind == "retain":
        forget_split = forget_split or max((s for s in world.split_names if s.startswith("forget")))
        qa = world.split(world.retain_split_of(forget_split))
        corpus = world.biographies(world.retain_split_of(forget_split)) + world.corpus("benign")
        mc = world.mc("benign")
    else:
        raise ValueError(f"kind must be 'finetuned' or 'retain', got {kind!r}")
    qa = qa + world.split("unknown") + world.split("world_facts") + world.domain_qa("benign")
    examples = [encode_qa(tokenizer, r["question"], r["answer"], max_length=max_length) for r in qa]
    examples += [encode_text(tokenizer, r["text"], max_length=max_length) for r in corpus]
    examples += [mc_example(tokenizer, r) for r in mc]
    return examples


# ----------------------------------------------------------------------------------------------
# models


def _llama(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _length_grouped_batches(examples: list[dict], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within windows of 16 batches, shuffle the
    batches. Lengths vary 3x here (short answers to 4-choice prompts), so this halves the padding."""
    order = torch.randperm(len(examples), generator=gen).tolist()
    window = 16 * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda j: len(examples[j]["input_ids"]))
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[k] for k in perm]


def default_threads() -> int:
    """Threads for the tiny models' training, unlearning and scoring: what every command uses
    (:func:`nsru.threads.resolve_threads`: ``--threads``, ``$NSRU_THREADS``, ``$OMP_NUM_THREADS``, else 1)."""
    return resolve_threads()


def train_lm(model, examples: list[dict], tokenizer, train: TrainConfig, desc: str = "train", progress: bool = True,
             threads: int | None = None):
    """Plain causal-LM training on encoded examples (AdamW, warm-up then cosine decay)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        return _train_lm(model, examples, tokenizer, train, desc, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train_lm(model, examples, tokenizer, train: TrainConfig, desc: str, progress: bool):
    from tqdm.auto import tqdm

    collate = QACollator(tokenizer)
    gen = torch.Generator().manual_seed(train.seed)
    window = 16 * train.batch_size
    steps_per_epoch = sum(math.ceil(min(window, len(examples) - w) / train.batch_size)
                          for w in range(0, len(examples), window))
    total = steps_per_epoch * train.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        t = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls many times over
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    loss_ema = None
    for _ in range(train.epochs):
        for idx in _length_grouped_batches(examples, train.batch_size, gen):
            batch = collate([examples[j] for j in idx])
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {bar.n}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    bar.close()
    model.eval()
    return model


def _target(spec: TargetSpec, cache=None, rebuild=False, progress=True):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(spec.world, spec.model.vocab_size, cache)
    world = make_world(spec.world)
    examples = training_examples(world, tokenizer, spec.kind, spec.forget_split, spec.train.max_length)
    # The key covers the settings and the encoded training data itself, so a change to the world,
    # the tokenizer or the data format never reuses a stale model.
    digest = hashlib.sha256(spec.key().encode())
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    key = digest.hexdigest()[:16]
    path = cache_dir(cache) / f"{spec.kind}-{key}"
    if rebuild and path.exists():
        shutil.rmtree(path)
    if not path.exists():
        model = _llama(spec.model, tokenizer, spec.train.seed)
        start = time.perf_counter()
        train_lm(model, examples, tokenizer, spec.train, desc=f"training {spec.kind} model", progress=progress)
        seconds = time.perf_counter() - start

        def write(tmp: Path):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            meta = {"spec": dataclasses.asdict(spec), "key": key, "train_seconds": round(seconds, 2),
                    "n_examples": len(examples), "n_params": sum(p.numel() for p in model.parameters())}
            (tmp / "nsru_target.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")

        atomic_write(path, write, directory=True, replace=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tokenizer, path


def finetuned_model(world: WorldConfig | None = None, model: ModelConfig | None = None,
                    train: TrainConfig | None = None, cache=None, rebuild=False, progress=True):
    """The model trained on the whole world: ``(model, tokenizer, path)``, from the cache when there."""
    spec = TargetSpec(world or WorldConfig(), model or ModelConfig(), train or TrainConfig(), "finetuned", None)
    return _target(spec, cache, rebuild, progress)


def retain_model(world: WorldConfig | None = None, model: ModelConfig | None = None,
                 train: TrainConfig | None = None, forget_split: str = "forget10", cache=None,
                 rebuild=False, progress=True):
    """The model trained without ``forget_split``'s people and the hazardous domain: ``(model, tokenizer, path)``."""
    spec = TargetSpec(world or WorldConfig(), model or ModelConfig(), train or TrainConfig(), "retain", forget_split)
    return _target(spec, cache, rebuild, progress)


def target_models(world: WorldConfig | None = None, model: ModelConfig | None = None,
                  train: TrainConfig | None = None, forget_split: str = "forget10", cache=None,
                  rebuild=False, progress=True) -> dict:
    """Both target models: ``{"finetuned": (model, tok, path), "retain": (model, tok, path)}``."""
    return {
        "finetuned": finetuned_model(world, model, train, cache, rebuild, progress),
        "retain": retain_model(world, model, train, forget_split, cache, rebuild, progress),
    }
