"""Stop when the forget rows are forgotten, not after a fixed step count (``stop_at=``).

A fixed budget overshoots: once the answers are unlikely, further steps only cost what is kept
(the real scenario's frontier: 40 steps forgot no more than 20 and lost neighbours, perplexity
and refusal rates). :class:`ForgetCheck` measures, every ``stop_every`` steps, each forget row's
mean per-token probability of its answer — over the tokens the forget-side loss acts on
(``suppress_tokens``) — against its value before training, and tells the trainer to stop once
the median ratio is at most ``stop_at``. It reads only the forget rows, which the run already has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nsru.data import pad_encodings
from nsru.objectives import IGNORE_INDEX, token_logprobs


class ForgetCheck:
    """``check(model, step) -> {"forget_ratio", "stop"}``: the median over ``encodings`` (encoded
    forget rows with ``labels``) of ``exp(mean log p now - mean log p before)``; ``before`` is
    measured on ``model`` when the check is made (build it before training)."""

    def __init__(self, model: nn.Module, encodings: Sequence[Mapping], pad_id: int, stop_at: float,
                 batch_size: int = 16) -> None:
        if not 0.0 < stop_at < 1.0:
            raise ValueError(f"stop_at must lie between 0 and 1 (a fraction of the probability before), got {stop_at}")
        rows = [e for e in encodings if any(label != IGNORE_INDEX for label in e["labels"][1:])]
        if not rows:
            raise ValueError("stop_at: no forget row has an answer token to measure")
        self.batches = [pad_encodings(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
        self.stop_at = stop_at
        self.before = self.mean_logprobs(model)

    @torch.no_grad()
    def mean_logprobs(self, model: nn.Module) -> torch.Tensor:
        """Each row's mean log-probability of its labelled tokens (fp32, on the CPU)."""
        device = next(model.parameters()).device
        out = []
        for batch in self.batches:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            tok, mask = token_logprobs(logits, batch["labels"].to(device))
            out.append((tok.sum(-1) / mask.sum(-1)).float().cpu())
        return torch.cat(out)

    def __call__(self, model: nn.Module, step: int) -> dict:
        ratio = float(torch.exp(self.mean_logprobs(model) - self.before).median())
        return {"forget_ratio": ratio, "stop": ratio <= self.stop_at}
