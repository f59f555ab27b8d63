"""Loss functions of NSRU and of the baselines, on logits, labels and hidden states.

Conventions: ``logits`` are ``(batch, seq, vocab)`` as a causal LM returns them, ``labels`` are
``(batch, seq)`` with ``-100`` where there is no target; position ``t`` of the logits predicts
label ``t + 1`` (the shift is done here). Sequence log-probabilities are sums over the answer
tokens. Every function returns a scalar averaged over the batch.

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


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over every target token of the batch (``L_safe`` and ``L_ret`` = nll)."""
    tok, mask = token_logprobs(logits, labels)
    return -tok.sum() / mask.sum().clamp_min(1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GradAscent: the negated NLL of the forget answers."""
    return -nll_loss(logits, labels)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO: ``-(2/β) · mean log σ(-β (log π_θ(y|q) - log π_ref(y|q)))`` over sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(logp: torch.Tensor, lengths: torch.Tensor, beta: float = 4.5, delta: float = 0.0) -> torch.Tensor:
    """SimNPO: reference-free NPO on the length-normalised log-probability with margin ``delta``:
    ``-(2/β) · mean log σ(β (-log π_θ(y|q)/|y| - δ))``."""
    nll_per_token = -logp / lengths.clamp_min(1)
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_per_token - delta)).mean()


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unlikelihood: ``-mean_t log(1 - p_θ(y_t))`` over the answer tokens."""
    tok, mask = token_logprobs(logits, labels)
    p = tok.exp()
    loss = -torch.log((1.0 - p).clamp_min(eps))
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO, scaled by ``2/β`` as in open-unlearning's IdkDPO so its size matches NPO's:
    ``-(2/β) · mean log σ(β ((c - c_ref) - (r - r_ref)))``."""
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(π_ref ‖ π_θ)`` of the next-token distributions, mean over the target tokens."""
    logits, _, mask = _shift(logits, labels)
    ref_logits = ref_logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def rmu_forget_loss(hidden: torch.Tensor, control: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU forget term: mean squared error between the hidden states on forget tokens and the
    scaled random control vector ``c·u`` (``control``, ``(hidden,)``)."""
    err = (hidden.float() - control.to(torch.float32)).pow(2).mean(-1)
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1)


def rmu_retain_loss(hidden: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU retain term: mean squared error to the reference model's hidden states on retain tokens."""
    err = (hidden.float() - ref_hidden.float()).pow(2).mean(-1)
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1)
