"""GGUF model files (llama.cpp's format) as ordinary transformers models, through a safetensors cache.

transformers reads a GGUF file with its ``gguf_file=`` loader, but that dequantises every tensor
on every load and leaves a GGUF quantizer on the model that makes ``save_pretrained`` refuse to
run (so ``nsru merge`` could not save it). So the first load of a file dequantises it once (float32)
and writes a plain copy (model, tokenizer, chat template) to the cache; every load, the first
included, then reads that copy with a plain ``from_pretrained``, so all loads give the same model.

Cache layout (the root as :func:`nsru.cache.cache_dir` picks it)::

    <cache>/gguf/<file stem>-<key>/   key: sha256 of the file's name, size and content
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja  nsru_gguf.json

Utility layer: imports only :mod:`nsru.atomic` and :mod:`nsru.cache` from the library, and torch
and transformers only inside the functions that load (so :func:`is_gguf` costs nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nsru.atomic import atomic_write
from nsru.cache import cache_dir

if TYPE_CHECKING:
    import torch

__all__ = ["MAGIC", "is_gguf", "gguf_folder", "load_gguf"]

MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes (whatever its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _cache_key(path: Path) -> str:
    """A digest of the file's name, size and whole content: a file rewritten in place with the same
    size (a re-export after an edit of one layer) gets a new entry, and a reinstall of the same file
    (new mtime) does not. Hashing reads the file once per load, far less than dequantising it."""
    digest = hashlib.sha256(f"{path.name}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _dequantise(path: Path):
    """The model and tokenizer as transformers' GGUF loader reads them, in float32, ready to save.

    ``GgufConfig(dequantize=True)`` asks for dense weights outright: with the ``kernels`` package
    installed, transformers would otherwise keep supported architectures packed in GGUF blocks.
    Whatever GGUF quantizer is left on the model afterwards (transformers attaches one, and
    ``save_pretrained`` refuses a model that has it) is then removed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def gguf_folder(path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                log: Callable[[str], None] | None = None) -> Path:
    """The cache folder holding ``path`` as a plain transformers model (``from_pretrained`` loads it).

    The first call for a file dequantises it (float32) and writes the folder under ``<cache>/gguf/``
    atomically (temporary folder, then rename; a concurrent writer's equal copy wins); later calls
    only hash the file. ``log`` receives a line for each step of the dequantisation.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    target = cache_dir(cache) / "gguf" / f"{path.stem}-{_cache_key(path)}"
    if target.exists():
        return target
    say = log or (lambda message: None)
    say(f"dequantising {path} ({path.stat().st_size / 2**20:.0f} MiB) with transformers' GGUF loader")
    start = time.perf_counter()
    model, tokenizer = _dequantise(path)
    seconds = time.perf_counter() - start
    say(f"dequantised in {seconds:.1f} s; writing a safetensors copy to {target}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        meta = {"source": str(path.resolve()), "size": path.stat().st_size, "dequantise_seconds": round(seconds, 2),
                "n_params": sum(p.numel() for p in model.parameters())}
        (tmp / "nsru_gguf.json").write_text(json.dumps(meta, indent=1) + "\n")

    atomic_write(target, write, directory=True, replace=False)
    return target


def load_gguf(path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
              dtype: torch.dtype | None = None, log: Callable[[str], None] | None = None):
    """``(model, tokenizer)`` of a GGUF causal LM, in eval mode, read from its cache folder
    (:func:`gguf_folder`, which converts the file the first time). ``dtype`` (default float32) is
    applied when loading the copy, so one cache entry serves every dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder(path, cache=cache, log=log)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
