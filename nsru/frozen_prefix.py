"""Frozen-prefix caching: the layers below a model's lowest adapter never change while it unlearns.

Their output for a training sequence is the same at every step and for the policy and the
reference alike, so it is computed once per sequence and kept; every later forward runs only the
layers from the lowest adapter up. The result equals the full forward up to float rounding. The
saving is the prefix's share of each forward: with adapters in a band of layers 10-29 of 30, a third
of every forward (what makes a real model's comparison fit a CPU budget, see ``nsru.bench.real``).

It applies to decoder-only models whose blocks are ``model.model.layers`` with a final
``model.model.norm`` (Llama, Mistral, Qwen, Gemma, SmolLM, ...), right-padded batches, and forwards
that ask for nothing but logits; anything else runs the full model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nsru.adapt import layer_index
from nsru.data import sequence_keys
from nsru.layer import nsru_modules

DEFAULT_MAX_BYTES = 1 << 30
"""Most bytes of cached prefix outputs; sequences past it are recomputed each time (still correct)."""


class FrozenPrefix:
    """Runs ``model`` from layer ``first`` on cached outputs of the layers below it."""

    def __init__(self, model: nn.Module, first: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.model = model
        self.base = model.model
        self.first = first
        self.max_bytes = max_bytes
        self.cache: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.computed = 0  # sequences whose prefix was run (for tests and reports)

    @classmethod
    def find(cls, model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES) -> FrozenPrefix | None:
        """A prefix cache for ``model`` when its adapters leave some bottom layers frozen, else ``None``."""
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(base, "norm", None), nn.Module):
            return None
        names = list(nsru_modules(model))
        prefix = "model.layers."
        if not names or not all(n.startswith(prefix) for n in names):
            return None
        first = min(layer_index(n) for n in names)
        return cls(model, first, max_bytes) if first > 0 else None

    @contextmanager
    def _swapped(self, layers: nn.ModuleList, norm: nn.Module) -> Iterator[None]:
        modules = self.base._modules
        saved = modules["layers"], modules["norm"]
        modules["layers"], modules["norm"] = layers, norm
        try:
            yield
        finally:
            modules["layers"], modules["norm"] = saved

    @torch.no_grad()
    def _prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The input of layer ``first`` for every position of the batch (zeros on pads)."""
        lengths = attention_mask.sum(-1).tolist()
        keys = sequence_keys(lengths, input_ids)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            bottom = nn.ModuleList(self.base.layers[: self.first])
            with self._swapped(bottom, nn.Identity()):
                hidden = self.base(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
            self.computed += len(missing)
            for j, i in enumerate(missing):
                h = hidden[j, : lengths[i]].clone()
                fresh[i] = h
                size = h.numel() * h.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.cache[keys[i]] = h
                    self.bytes += size
        width = self.base.config.hidden_size
        dtype = next(iter(fresh.values())).dtype if fresh else next(iter(self.cache.values())).dtype
        out = torch.zeros(*input_ids.shape, width, dtype=dtype, device=input_ids.device)
        for i, n in enumerate(lengths):
            out[i, :n] = fresh[i] if i in fresh else self.cache[keys[i]]
        return out

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        right_padded = bool((attention_mask[:, 0] == 1).all())
        if kwargs or not right_padded:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self._prefix(input_ids, attention_mask)
        top = nn.ModuleList(self.base.layers[self.first:])
        with self._swapped(top, self.base.norm):
            return self.model(inputs_embeds=hidden, attention_mask=attention_mask)
