"""PEFT-format export: ``save_adapter(format="peft")`` and ``export_peft`` write LoRA files that
``peft.PeftModel.from_pretrained`` loads and that give NSRU's logits; merging gives them too."""

import copy
import json

import pytest
import torch

import nsru
from nsru.adapt import export_peft
from conftest import tiny_gpt2, tiny_llama, token_batches

peft = pytest.importorskip("peft")


def _trained_like(model, seed=0, ranks=None):
    """Adapters with random retain bases and non-zero factors, as after training."""
    base = copy.deepcopy(model)
    nsru.apply_nsru(model, target_modules="all-linear", r=ranks or 4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in nsru.nsru_modules(model).values():
            q, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.in_features // 2, generator=g))
            layer.set_retain_basis(q)
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)  # now partly inside span(U)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return base, model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_peft_loads_the_export_and_gives_nsru_logits(tmp_path, make):
    base, model = _trained_like(make())
    batch = token_batches(1)[0]
    want = _logits(model, batch)
    assert not torch.allclose(want, _logits(base, batch), atol=1e-3)  # the adapter does something

    nsru.save_adapter(model, tmp_path / "peft", format="peft", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] == (make is tiny_gpt2) and config["base_model_name_or_path"] == "tiny"
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(loaded, batch), want, atol=2e-5, rtol=1e-4)
    # PEFT's own merge gives the same model
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), want, atol=2e-5, rtol=1e-4)


def test_export_from_nsru_files_equals_save_peft(tmp_path):
    base, model = _trained_like(tiny_llama())
    nsru.save_adapter(model, tmp_path / "nsru")
    export_peft(tmp_path / "nsru", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    batch = token_batches(1)[0]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=2e-5, rtol=1e-4)
    # lora_A is Ã: orthogonal to the retain basis
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name, layer in nsru.nsru_modules(model).items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert float((a @ layer.retain_basis).abs().max()) < 1e-5


def test_per_module_ranks_go_to_rank_pattern(tmp_path):
    model = tiny_llama()
    names = nsru.find_target_modules(model)
    ranks = {n: (2 if "mlp" in n else 4) for n in names}
    base, model = _trained_like(model, ranks=ranks)
    nsru.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] and all(v == 2 for v in config["rank_pattern"].values())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    batch = token_batches(1)[0]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=2e-5, rtol=1e-4)


def test_bad_format_and_peft_folder_given_to_load_adapter(tmp_path):
    _, model = _trained_like(tiny_llama())
    with pytest.raises(ValueError, match="format must be one of nsru, peft, got 'gguf'"):
        nsru.save_adapter(model, tmp_path / "x", format="gguf")
    nsru.save_adapter(model, tmp_path / "peft", format="peft")
    with pytest.raises(ValueError, match="a PEFT adapter .* load it with peft.PeftModel.from_pretrained"):
        nsru.load_adapter(tiny_llama(), tmp_path / "peft")
    with pytest.raises(ValueError, match="a PEFT adapter"):
        export_peft(tmp_path / "peft", tmp_path / "again")
