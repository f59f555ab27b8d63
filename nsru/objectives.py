"""Loss functions of NSRU and of the baselines, on logits, labels and hidden states.

Conventions: ``logits`` are ``(batch, seq, vocab)`` as a causal LM returns them, ``labels`` are
``(batch, seq)`` with ``-100`` where there is no target; position ``t`` of the logits predicts
label ``t + 1`` (the shift is done here). Sequence log-probabilities are sums over the answer
tokens. Every function returns a scalar averaged over the batch: over its tokens or sequences, or,
when ``denom`` is given, its *sum* divided by ``denom``. The trainer passes the count of the whole
global batch there (every micro-batch on every process), so the per-process losses add up to the
one-process loss of the global batch and their gradients are summed, not averaged: a token counts
the same whichever process or micro-batch it lands in.

DESIGN §1:  L = λ_safe·CE(t | q) + λ_sup·L_sup(y | q) + λ_ret·L_ret(retain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def _mean(total: torch.Tensor, count: torch.Tensor | int, denom) -> torch.Tensor:
    """``total / denom`` when the caller gives the global count, else ``total / count`` (both >= 1)."""
    if denom is None:
        denom = count
    if isinstance(denom, torch.Tensor):
        return total / denom.clamp_min(1)
    return total / max(denom, 1)


def batch_counts(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the losses average over, counted on one padded part of a batch: ``tokens`` (target
    tokens, after the shift), ``sequences`` (rows) and ``positions`` (non-pad inputs, RMU's unit)."""
    counts = {"tokens": (labels[:, 1:] != IGNORE_INDEX).sum(), "sequences": torch.tensor(labels.shape[0])}
    counts["positions"] = attention_mask.sum() if attention_mask is not None else torch.tensor(labels.numel())
    return counts


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` (``(batch, seq-1)``, fp32, 0 where masked) and the mask."""
    logits, labels, mask = _shift(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return tok * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log π(y|q)`` summed over the answer tokens, per sequence, and the token counts."""
    tok, mask = token_logprobs(logits, labels)
    return tok.sum(-1), mask.sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, denom=None) -> torch.Tensor:
    """Cross-entropy, mean over every target token of the batch (``L_safe`` and ``L_ret`` = nll)."""
    tok, mask = token_logprobs(logits, labels)
    return _mean(-tok.sum(), mask.sum(), denom)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor, denom=None) -> torch.Tensor:
    """GradAscent: the negated NLL of the forget answers."""
    return -nll_loss(logits, labels, denom)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1, denom=None) -> torch.Tensor:
    """NPO: ``-(2/β) · mean log σ(-β (log π_θ(y|q) - log π_ref(y|q)))`` over sequences."""
    return -(2.0 / beta) * _mean(F.logsigmoid(-beta * (logp - ref_logp)).sum(), logp.numel(), denom)


def simnpo_loss(logp: torch.Tensor, lengths: torch.Tensor, beta: float = 4.5, delta: float = 0.0,
                denom=None) -> torch.Tensor:
    """SimNPO: reference-free NPO on the length-normalised log-probability with margin ``delta``:
    ``-(2/β) · mean log σ(β (-log π_θ(y|q)/|y| - δ))``."""
    nll_per_token = -logp / lengths.clamp_min(1)
    return -(2.0 / beta) * _mean(F.logsigmoid(beta * (nll_per_token - delta)).sum(), logp.numel(), denom)


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6, denom=None) -> torch.Tensor:
    """Unlikelihood: ``-mean_t log(1 - p_θ(y_t))`` over the answer tokens."""
    tok, mask = token_logprobs(logits, labels)
    p = tok.exp()
    loss = -torch.log((1.0 - p).clamp_min(eps))
    return _mean((loss * mask).sum(), mask.sum(), denom)


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
    denom=None,
) -> torch.Tensor:
    """DPO, scaled by ``2/β`` as in open-unlearning's IdkDPO so its size matches NPO's:
    ``-(2/β) · mean log σ(β ((c - c_ref) - (r - r_ref)))``."""
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    return -(2.0 / beta) * _mean(F.logsigmoid(beta * margin).sum(), margin.numel(), denom)


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, denom=None) -> torch.Tensor:
    """``KL(π_ref ‖ π_θ)`` of the next-token distributions, mean over the target tokens."""
    logits, _, mask = _shift(logits, labels)
    ref_logits = ref_logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return _mean((kl * mask).sum(), mask.sum(), denom)


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """RMU forget term: mean squared error between the hidden states on forget tokens and the
    scaled random control vector ``c·u`` (``control``, ``(hidden,)``)."""
    err = (hidden.float() - control.to(torch.float32)).pow(2).mean(-1)
    m = mask.to(err.dtype)
    return _mean((err * m).sum(), m.sum(), denom)


def rmu_retain_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """RMU retain term: mean squared error to the reference model's hidden states on retain tokens."""
    err = (hidden.float() - ref_hidden.float()).pow(2).mean(-1)
    m = mask.to(err.dtype)
    return _mean((err * m).sum(), m.sum(), denom)
