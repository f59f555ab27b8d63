"""Test-wide set-up: without a GPU the Triton kernels run in Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before any test module imports ``nsru.kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What the library caches (self-samples, converted weights, tiny target models) goes to a folder of
# this test session, not the user's cache, unless NSRU_CACHE says otherwise.
if "NSRU_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["NSRU_CACHE"] = tempfile.mkdtemp(prefix="nsru-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NSRU_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM small enough for unit tests (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=overrides.pop("vocab_size", 97),
        hidden_size=overrides.pop("hidden_size", 32),
        intermediate_size=overrides.pop("intermediate_size", 56),
        num_hidden_layers=overrides.pop("num_hidden_layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    """A randomly initialised GPT2LMHeadModel (its projections are transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


def token_batches(n_batches: int = 3, batch: int = 4, length: int = 12, vocab: int = 97, seed: int = 0):
    """Random token batches with right padding in the attention mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out
