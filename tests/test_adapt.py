"""Adapting transformers models: targets, identity at init, null-space guarantee end to end,
merge, adapter files, generate, torch.compile, gradient checkpointing, errors."""

import json

import pytest
import torch

import nsru
from conftest import tiny_gpt2, tiny_llama, token_batches


def _randomise_all(model, seed=1, scale=0.1):
    """Non-zero adapters; ``scale`` sets the size of lora_B (ΔW comparable to W at scale ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in nsru.nsru_modules(model).values():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) / adapter.in_features**0.5)
            adapter.lora_B.copy_(scale * torch.randn(adapter.lora_B.shape, generator=g))
            adapter.set_retain_basis(adapter.retain_basis)  # keep A in the null space


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_identical_logits_right_after_apply(tiny_model):
    batch = token_batches(1)[0]
    before = _logits(tiny_model, batch)
    adapted = nsru.apply_nsru(tiny_model, target_modules="all-linear", r=4, alpha=8)
    assert adapted and all(isinstance(m, nsru.NSRULinear) for m in adapted.values())
    torch.testing.assert_close(_logits(tiny_model, batch), before, rtol=0, atol=0)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_all_linear_skips_the_output_head():
    model = tiny_llama()
    names = nsru.find_target_modules(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7
    assert nsru.find_target_modules(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert nsru.find_target_modules(model, r"model\.layers\.1\.mlp\..*") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    ]


def test_targets_matching_nothing_list_what_exists():
    with pytest.raises(ValueError, match=r"matched no linear module of LlamaForCausalLM.*down_proj.*q_proj"):
        nsru.apply_nsru(tiny_llama(), target_modules=["query_key_value"])


def test_applying_twice_is_an_error():
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    with pytest.raises(ValueError, match="already has"):
        nsru.apply_nsru(model, r=2)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_module_outputs_inside_span_equal_base_outputs(make):
    model = make()
    adapters = nsru.apply_nsru(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    for adapter in adapters.values():
        k = adapter.in_features // 2
        u = torch.linalg.qr(torch.randn(adapter.in_features, k, generator=g))[0]
        adapter.set_retain_basis(u)
    _randomise_all(model)
    for name, adapter in adapters.items():
        u = adapter.retain_basis
        inside = torch.randn(20, u.shape[1], generator=g) @ u.T
        outside = torch.randn(20, adapter.in_features, generator=g)
        with torch.no_grad():
            base_in, base_out = adapter.base_layer(inside), adapter.base_layer(outside)
            assert (adapter(inside) - base_in).norm() <= 1e-5 * base_in.norm(), name
            assert (adapter(outside) - base_out).norm() > 1e-3 * base_out.norm(), name


def test_retain_data_logits_unchanged_end_to_end():
    """With bases spanning every module's inputs on a retain batch, a random adapter cannot move its logits."""
    model = tiny_llama(hidden_size=64, intermediate_size=96)
    retain = {"input_ids": torch.tensor([[5, 17, 33, 2, 9, 41]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    other = token_batches(1, seed=7)[0]
    base_retain, base_other = _logits(model, retain), _logits(model, other)
    nsru.apply_nsru(model, r=4, alpha=8)
    moments = nsru.collect_second_moments(model, [retain], dtype=torch.float64, progress=False)
    bases = nsru.retain_bases(moments, 1 - 1e-9)
    assert all(0 < u.shape[1] <= 6 for u in bases.values())
    nsru.set_retain_bases(model, bases)
    _randomise_all(model, scale=0.02)
    after_retain = _logits(model, retain)
    assert (after_retain - base_retain).norm() <= 1e-4 * base_retain.norm()
    assert (_logits(model, other) - base_other).norm() > 1e-2 * base_other.norm()


def test_lora_A_gradients_stay_in_null_space():
    model = tiny_llama()
    nsru.apply_nsru(model, r=4, alpha=8)
    moments = nsru.collect_second_moments(model, token_batches(2), progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments, "energy=0.8"))
    _randomise_all(model)
    batch = token_batches(1, seed=5)[0]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, adapter in nsru.nsru_modules(model).items():
        g = adapter.lora_A.grad
        assert g is not None and g.norm() > 0, name
        assert (g @ adapter.retain_basis).norm() <= 1e-5 * g.norm(), name


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merged_and_unmerged_logits_agree(make):
    model = make()
    nsru.apply_nsru(model, r=4, alpha=8)
    _randomise_all(model)
    batch = token_batches(1)[0]
    unmerged = _logits(model, batch)
    nsru.merge_adapters(model)
    torch.testing.assert_close(_logits(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    with nsru.adapter_disabled(model):
        disabled_merged = _logits(model, batch)
    nsru.unmerge_adapters(model)
    with nsru.adapter_disabled(model):
        torch.testing.assert_close(_logits(model, batch), disabled_merged, rtol=1e-4, atol=1e-4)
    plain = nsru.merge_and_unload(model)
    assert not nsru.nsru_modules(plain)
    torch.testing.assert_close(_logits(plain, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_disabled_gives_the_original_model():
    model = tiny_llama()
    batch = token_batches(1)[0]
    original = _logits(model, batch)
    nsru.apply_nsru(model, r=4)
    _randomise_all(model)
    assert not torch.allclose(_logits(model, batch), original)
    with nsru.adapter_disabled(model):
        torch.testing.assert_close(_logits(model, batch), original, rtol=0, atol=0)
    assert not torch.allclose(_logits(model, batch), original)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_and_load_into_a_fresh_model(make, tmp_path):
    model = make()
    nsru.apply_nsru(model, target_modules="all-linear", r=4, alpha=8)
    moments = nsru.collect_second_moments(model, token_batches(2), progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments, "energy=0.9"))
    _randomise_all(model)
    batch = token_batches(1, seed=9)[0]
    expected = _logits(model, batch)
    nsru.save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    fresh = make()
    loaded = nsru.load_adapter(fresh, tmp_path / "adapter")
    assert set(loaded) == set(nsru.nsru_modules(model))
    torch.testing.assert_close(_logits(fresh, batch), expected, rtol=0, atol=0)


def test_adapter_with_wrong_shapes_is_refused_and_model_untouched(tmp_path):
    small = tiny_llama()
    nsru.apply_nsru(small, r=4)
    nsru.save_adapter(small, tmp_path / "a")
    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    batch = token_batches(1)[0]
    before = _logits(wider, batch)
    with pytest.raises(ValueError, match=r"adapter.safetensors: model\.layers\.0\..*lora_A has shape \(4, 32\).*needs \(4, 48\)"):
        nsru.load_adapter(wider, tmp_path / "a")
    assert not nsru.nsru_modules(wider)
    torch.testing.assert_close(_logits(wider, batch), before)


def test_adapter_config_that_is_not_json_names_the_file(tmp_path):
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    nsru.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"format": "nsru-adapter",\n oops}')
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON \(line 2\)"):
        nsru.load_adapter(tiny_llama(), tmp_path / "a")
    config = json.loads('{"format": "other"}')
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not an NSRU adapter config"):
        nsru.load_adapter(tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_generate_works_on_adapted_model(make):
    model = make()
    nsru.apply_nsru(model, r=4)
    _randomise_all(model)
    out = model.generate(torch.tensor([[3, 4, 5]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                         max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = token_batches(1)[0]
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        nsru.apply_nsru(model, r=4)
        _randomise_all(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_torch_compile_runs_on_adapted_model():
    model = tiny_llama(num_hidden_layers=1)
    nsru.apply_nsru(model, r=4)
    _randomise_all(model)
    batch = token_batches(1)[0]
    eager = _logits(model, batch)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits.detach(), eager, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    assert all(adapter.lora_A.grad is not None for adapter in nsru.nsru_modules(model).values())
