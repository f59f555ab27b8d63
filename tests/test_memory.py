"""The memory estimate from a model config, checked against the peak of live tensor memory
measured on the CPU for the statistics phase and for training steps of small Llama models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nsru
from nsru.memory import PRESETS, ModelShape, TensorMemory, activation_bytes, estimate_memory, memory_table
from nsru.methods import LossContext
from nsru.sampler import Stream
from nsru.subspace import collect_second_moments, retain_subspaces, set_retain_bases
from nsru.train import Trainer
from nsru.pipeline import resolve_config
from tinylm import one_thread


@pytest.mark.parametrize("key, billions", [("llama-2-7b", 6.738), ("llama-3-8b", 8.030), ("llama-3-70b", 70.554)])
def test_presets_have_the_published_parameter_counts(key, billions):
    assert PRESETS[key].params() / 1e9 == pytest.approx(billions, rel=2e-3)


def test_shape_from_a_transformers_config_counts_the_model_parameters():
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2)
    shape = ModelShape.from_config(cfg, "tiny")
    assert shape.params() == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert ModelShape.from_config(cfg.to_dict(), "tiny") == shape


def test_tensor_memory_counts_storage_until_freed():
    with TensorMemory() as mem:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new storage
        c = torch.ones(500, dtype=torch.float64)
        assert mem.now == 8000
        del a, b, c
        assert mem.now == 0
    assert mem.peak == 8000


def test_the_parts_scale_as_they_should():
    shape = PRESETS["llama-3-8b"]
    one = estimate_memory(shape, "nsru", world=1)
    sharded = estimate_memory(shape, "nsru", world=8, fsdp=True)
    w = shape.params() * 2
    assert one.parts["weights"] == w
    assert sharded.parts["weights"] == w // 8 + (shape.root_params() + 2 * shape.block_params()) * 2
    assert sharded.parts["statistics"] == one.parts["statistics"]  # replicated: every rank computes the bases
    full = estimate_memory(shape, "full", world=1)
    assert full.parts["weights"] + full.parts["gradients+optimizer"] + full.parts["reference"] == 18 * shape.params()
    lora = estimate_memory(shape, "lora")
    assert "statistics" not in lora.parts and lora.train < one.train < full.train
    double = estimate_memory(shape, "nsru", batch=8)
    assert double.parts["activations"] == pytest.approx(2 * one.parts["activations"], rel=1e-3)
    band = estimate_memory(shape, "nsru", adapted_layers=8)
    assert band.parts["statistics"] * 4 == one.parts["statistics"]
    assert "| Llama-3-70B | 8 (FSDP) |" in memory_table()


SHAPES = {  # (hidden, intermediate, layers, vocab, heads, kv heads)
    "gqa": (256, 688, 4, 2000, 8, 4),
    "mha-wide-mlp": (192, 768, 3, 3000, 6, 6),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_estimate_matches_the_measured_peak(name):
    """Statistics phase and two training steps of NSRU (fp32 on the CPU, padded batches): the
    estimate from the config alone is within 15 % of the measured peak of live tensor memory."""
    h, f, layers, vocab, heads, kv = SHAPES[name]
    batch, seq = 4, 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    with one_thread():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        adapters = nsru.apply_nsru(model, r=8)
        stats = [{"input_ids": torch.randint(1, vocab, (16, seq), generator=g),
                  "attention_mask": torch.ones(16, seq, dtype=torch.long)} for _ in range(2)]
        with TensorMemory([*model.parameters(), *model.buffers()]) as setup:
            moments = collect_second_moments(model, stats, progress=False)
            set_retain_bases(model, {n: s.basis for n, s in retain_subspaces(moments, "energy=0.9").items()})
        del moments
        k_fraction = sum(m.k / m.in_features for m in adapters.values()) / len(adapters)

        def example(n: int) -> dict:
            ids = torch.randint(1, vocab, (n,), generator=g).tolist()
            return {"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 2) + ids[n // 2:]}

        rows = [{part: example(seq - 8 * (i % 2)) for part in ("forget", "safe", "retain")} for i in range(8)]
        config, method = resolve_config(None, None, {"batch_size": batch, "steps": 2, "lr": 1e-3, "progress": False})
        params = {f"{n}.{p}": getattr(m, p).requires_grad_(True) for n, m in adapters.items() for p in ("lora_A", "lora_B")}
        trainer = Trainer(model, config, method, LossContext(model, config), {"all": Stream(rows, batch)}, params,
                          adapters=adapters)
        model.train()
        with TensorMemory([*model.parameters(), *model.buffers()]) as train:
            trainer.train_step()
            trainer.train_step()
    est = estimate_memory(ModelShape.from_config(cfg), "nsru", batch=batch, seq=seq, r=8, basis_fraction=k_fraction,
                          weight_bytes=4, act_bytes=4)
    assert est.setup / setup.peak == pytest.approx(1, abs=0.15), (est.setup, setup.peak)
    assert est.train / train.peak == pytest.approx(1, abs=0.15), (est.train, train.peak)
    assert est.parts["activations"] > 0.5 * train.peak  # the part that matters is the part that is checked


def test_activations_per_block_match_a_measured_forward():
    """One forward with gradients through adapted blocks (padded, so transformers repeats k/v for
    SDPA): saved bytes per token per block within 5 % of the formula."""
    h, f, vocab, heads, kv, batch, seq = 256, 688, 500, 8, 4, 4, 48
    per_layer = []
    with one_thread():
        for layers in (2, 4):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=f,
                                                 num_hidden_layers=layers, num_attention_heads=heads,
                                                 num_key_value_heads=kv, max_position_embeddings=64))
            nsru.apply_nsru(model, r=8)
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[0, seq // 2:] = 0
            with TensorMemory([*model.parameters(), *model.buffers()]) as mem:
                out = model(input_ids=torch.randint(1, vocab, (batch, seq)), attention_mask=mask)
                per_layer.append(mem.now - mem.base)
            del out
    measured = (per_layer[1] - per_layer[0]) / 2 / (batch * seq)
    shape = ModelShape("t", vocab, h, f, 1, heads, kv, h // heads)
    assert activation_bytes(shape, 1, act_bytes=4)["blocks"] / measured == pytest.approx(1, abs=0.05)
