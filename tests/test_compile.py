"""A model with NSRU adapters compiles whole (``torch.compile(fullgraph=True)``, Inductor) and
computes what eager does: the adapters are the ``torch.library`` ops ``nsru::lowrank_linear``
(with its backward op) and ``nsru::project_rows_``, which the compiler takes as single nodes.

On the CPU Inductor compiles C++ with the system compiler, so the model is as small as a
Llama can be and the test still takes tens of seconds on two busy cores.
"""

from __future__ import annotations

import pytest
import torch

import nsru
from conftest import tiny_llama, token_batches
from tinylm import one_thread


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("NSRU_BACKEND", "reference")  # the CPU path; the Triton interpreter cannot be compiled


def _adapted_llama():
    model = tiny_llama(seed=0, hidden_size=32, intermediate_size=48, num_hidden_layers=1)
    nsru.apply_nsru(model, r=4, alpha=8.0)
    moments = nsru.collect_second_moments(model, token_batches(n_batches=2, batch=4, length=10), progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments))
    layers = nsru.nsru_modules(model)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model, layers


def _step(model, batch, layers):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    # a loss that reaches every output of every adapted module
    (logits.float() * torch.linspace(-1.0, 1.0, logits.shape[-1])).square().mean().backward()
    return logits.detach(), {n: (m.lora_A.grad.clone(), m.lora_B.grad.clone()) for n, m in layers.items()}


def test_compiled_llama_with_adapters_matches_eager():
    torch._dynamo.reset()
    model, layers = _adapted_llama()
    # a real retain subspace: some directions kept, none of the modules fully frozen
    assert any(layer.k > 0 for layer in layers.values())
    assert all(layer.k < layer.in_features for layer in layers.values())
    batch = token_batches(n_batches=1, batch=2, length=8, seed=3)[0]
    with one_thread():
        want_logits, want_grads = _step(model, batch, layers)
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        got_logits, got_grads = _step(compiled, batch, layers)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    for name, layer in layers.items():
        for got, want, what in zip(got_grads[name], want_grads[name], ("lora_A", "lora_B")):
            assert want.abs().max() > 0, f"{name}: {what} gets no gradient"
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {what}: {m}")
        # the compiled backward still projects: lora_A's gradient has nothing in the retain subspace
        u = layer.retain_basis
        assert (got_grads[name][0] @ u).abs().max() <= 1e-5 * got_grads[name][0].abs().max()
