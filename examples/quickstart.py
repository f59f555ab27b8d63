"""The NSRU API on a small Llama built from a config (no download), or on a local model.

    python examples/quickstart.py                      # random tiny Llama
    python examples/quickstart.py --model PATH         # any local Hugging Face causal LM

Adapts every linear layer, estimates retain subspaces from "retain" batches, trains the adapter
for a few steps to raise the loss of a "forget" sequence, and shows that outputs on the retain
batches barely move while the forget loss rises. Writes the adapter to ``--out``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import nsru


def _model(path: str | None):
    if path:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def _unlearn(model, retain, forget, steps: int, project: bool, energy: float):
    """Gradient ascent on ``forget`` through NSRU adapters; returns the adapted model."""
    layers = nsru.apply_nsru(model, target_modules="all-linear", r=8, alpha=16)
    if project:
        moments = nsru.collect_second_moments(model, retain, progress=False)
        subspaces = nsru.retain_subspaces(moments, energy)
        nsru.set_retain_bases(model, {n: s.basis for n, s in subspaces.items()})
        leak = nsru.leakage(model, retain, progress=False)
        ranks = [s.k for s in subspaces.values()]
        print(f"  adapted {len(layers)} modules; retain subspace ranks {min(ranks)}-{max(ranks)}; "
              f"mean leakage on retain data {sum(leak.values()) / len(leak):.3f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = -model(**forget, labels=forget["input_ids"]).loss  # gradient ascent on the forget sequence
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local path of a causal LM (default: a random tiny Llama)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--energy", type=float, default=0.99, help="energy fraction of the retain subspace")
    parser.add_argument("--out", default="nsru_out/quickstart_adapter")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    vocab = _model(args.model).config.vocab_size
    retain = [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g),
               "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(4)]
    forget = {"input_ids": torch.randint(0, vocab, (2, 16), generator=g)}

    for project in (True, False):
        model = _model(args.model).eval()
        with torch.no_grad():
            before = [model(**b).logits for b in retain]
            forget_before = model(**forget, labels=forget["input_ids"]).loss.item()
        print("NSRU (null-space projected):" if project else "plain LoRA (no projection), same steps:")
        _unlearn(model, retain, forget, args.steps, project, args.energy)
        with torch.no_grad():
            drift = max(float((model(**b).logits - x).norm() / x.norm()) for b, x in zip(retain, before))
            forget_after = model(**forget, labels=forget["input_ids"]).loss.item()
        print(f"  forget loss {forget_before:.3f} -> {forget_after:.3f}; "
              f"largest relative change of retain logits {drift:.4f}")
        if project:
            print(f"  adapter written to {nsru.save_adapter(model, args.out)}")


if __name__ == "__main__":
    main()
