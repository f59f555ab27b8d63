"""Behaviour of ``nsru.unlearn`` on a tiny Llama trained in the test on a few dozen synthetic facts."""

import json

import pytest
import torch

import nsru
from nsru.config import ConfigError, UnlearnConfig
from nsru.data import DataError
from nsru.safe_targets import SafeTargets
from tinylm import answer_probs, one_thread, trained_world_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def mean(x) -> float:
    return float(torch.as_tensor(x).mean())


def test_nsru_forgets_answers_learns_safe_targets_and_keeps_retain():
    model, tok, forget, retain = trained_world_model()
    safe = SafeTargets(seed=0).all(forget)
    before = {"forget": mean(answer_probs(model, tok, forget)), "retain": answer_probs(model, tok, retain),
              "safe": mean(answer_probs(model, tok, forget, safe))}
    assert before["forget"] > 0.95 and mean(before["retain"]) > 0.95 and before["safe"] < 0.4

    result = nsru.unlearn(model, tok, forget=forget, retain=retain, steps=80, batch_size=4, lr=1e-2, progress=False)
    after_forget = mean(answer_probs(model, tok, forget))
    after_retain = answer_probs(model, tok, retain)
    after_safe = mean(answer_probs(model, tok, forget, safe))
    assert after_forget < 0.05
    assert after_safe > 0.8
    assert mean(after_retain) > 0.95 * mean(before["retain"])  # within a few percent
    assert result.model is model and len(result.history) == 80
    assert {"safe", "suppress", "retain", "loss", "lr"} <= set(result.history[-1])
    assert set(result.bases_info) == set(nsru.nsru_modules(model))
    for info in result.bases_info.values():
        assert 0 < info["k"] < info["in_features"] and 0 <= info["leakage"] < 0.5
    assert result.config.project is True and result.config.subspace == "energy=0.9"
    # Updates live in the null space: lora_A has no component in span(U).
    for layer in nsru.nsru_modules(model).values():
        u = layer.retain_basis
        assert float((layer.lora_A.detach() @ u).abs().max()) < 1e-5


BASELINES = ["ga", "graddiff", "npo", "simnpo", "idkdpo"]


@pytest.mark.parametrize("method", BASELINES)
def test_baselines_lower_the_forget_answers(method):
    model, tok, forget, retain = trained_world_model()
    before = mean(answer_probs(model, tok, forget))
    # 30 steps: SimNPO's length-normalised term moves slowest (0.57 of before after 20 steps once the
    # warm-up starts at lr 0, as transformers' schedules do)
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, method=method, steps=30, batch_size=4,
                          lr=1e-2, progress=False)
    assert result.config.project is False  # baselines use plain LoRA unless asked otherwise
    assert mean(answer_probs(model, tok, forget)) < 0.5 * before
    assert all(h["k"] == 0 and h["leakage"] == 1.0 for h in result.bases_info.values())


def test_rmu_steers_its_layer():
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, method="rmu", steps=20, batch_size=4,
                          lr=1e-2, progress=False)
    names = set(nsru.nsru_modules(model))
    assert names and all(".mlp." in n and ".layers.0." in n for n in names)  # 2 layers: rmu_layer 0
    first, last = result.history[0]["suppress"], result.history[-1]["suppress"]
    assert last < 0.5 * first  # activations moved towards the random control vector
    assert result.method_state["rmu_coeff"] > 0


def test_full_finetuning_baseline_keeps_a_frozen_reference():
    model, tok, forget, retain = trained_world_model()
    before = mean(answer_probs(model, tok, forget))
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, method="npo", finetune="full", steps=10,
                          batch_size=4, lr=1e-3, progress=False)
    assert not nsru.nsru_modules(model) and result.bases_info == {}
    assert mean(answer_probs(model, tok, forget)) < before
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options", [
    {"suppress_loss": "unlikelihood"},
    {"suppress_loss": "dpo"},
    {"retain_loss": "kl"},
    {"method": "nsru-no-safe"},
    {"method": "nsru-no-suppress"},
    {"method": "nsru-no-retain"},
    {"method": "nsru-no-project"},
    {"init": "forget"},
])
def test_variants_and_ablations_run(options):
    model, tok, forget, retain = trained_world_model()
    before = mean(answer_probs(model, tok, forget))
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, steps=15, batch_size=4, lr=1e-2,
                          progress=False, **options)
    terms = set(result.history[-1])
    cfg = result.config
    assert ("safe" in terms) == cfg.safe and ("suppress" in terms) == cfg.suppress and ("retain" in terms) == cfg.retain
    if options.get("method") == "nsru-no-project":
        assert all(v["k"] == 0 for v in result.bases_info.values())
    else:
        assert all(v["k"] > 0 for v in result.bases_info.values())
    assert mean(answer_probs(model, tok, forget)) < before


def test_forget_aligned_init_targets_forget_directions():
    """init="forget": lora_A's rows are the top eigenvectors of P⊥ C_forget P⊥ (in the null space)."""
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, init="forget", steps=1, batch_size=4,
                          lr=1e-9, progress=False)
    info = result.init_info
    assert info and all(v["aligned_rows"] > 0 for v in info.values())
    assert all(0 < v["forget_energy"] <= 1.0 for v in info.values())
    for layer in nsru.nsru_modules(model).values():
        assert float((layer.lora_A.detach() @ layer.retain_basis).abs().max()) < 1e-5


def test_inputs_config_and_errors(tmp_path):
    model, tok, forget, retain = trained_world_model()
    fpath = tmp_path / "forget.jsonl"
    fpath.write_text("\n".join(json.dumps(r) for r in forget))
    datasets = pytest.importorskip("datasets")
    yml = tmp_path / "cfg.yaml"
    yml.write_text("unlearn:\n  steps: 3\n  batch_size: 2\n  lr: 5e-3\n  r: 4\n  progress: false\n")
    cfg = UnlearnConfig.from_yaml(yml)
    assert cfg.steps == 3 and cfg.lr == 5e-3 and cfg.r == 4
    result = nsru.unlearn(model, tok, forget=str(fpath), retain=datasets.Dataset.from_list(retain), config=cfg)
    assert len(result.history) == 3 and all(m.r == 4 for m in nsru.nsru_modules(model).values())

    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'stepz'; did you mean 'steps'"):
        UnlearnConfig.from_yaml(bad)
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(DataError, match="empty forget set"):
        nsru.unlearn(model, tok, forget=[], retain=retain)
    with pytest.raises(ValueError, match="needs data for its statistics"):
        nsru.unlearn(model, tok, forget=forget, retain=False, stats="retain")
    # retain=False with projection off: plain LoRA without a retain term.
    res = nsru.unlearn(model, tok, forget=forget, retain=False, project=False, steps=2, batch_size=2, progress=False)
    assert "retain" not in res.history[-1]


def test_subspace_rule_is_one_option_checked_before_any_work():
    """Every rule works through ``unlearn`` (a fixed k once raised "choose exactly one" after the
    adapters and statistics were made); a bad rule is refused by name with the model untouched."""
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, subspace="k=5", steps=1, batch_size=4,
                          progress=False)
    assert {v["k"] for v in result.bases_info.values()} == {5}
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, subspace="k=100000,min_null=3", steps=1,
                          batch_size=4, progress=False)
    assert all(v["k"] == v["in_features"] - 3 and v["capped"] for v in result.bases_info.values())
    model, tok, forget, retain = trained_world_model()
    for bad in ("energy=1.5", "energy=0.9,k=16", "size=3"):
        with pytest.raises(ConfigError, match="subspace"):
            nsru.unlearn(model, tok, forget=forget, retain=retain, subspace=bad)
        assert not nsru.nsru_modules(model)


def test_text_forget_corpus():
    """A text forget set (WMDP-style corpus): no safe targets, suppression on the text tokens."""
    model, tok, forget, retain = trained_world_model()
    corpus = [{"text": r["answer"]} for r in forget]
    before = mean(answer_probs(model, tok, forget))
    result = nsru.unlearn(model, tok, forget=corpus, retain=retain, steps=10, batch_size=4, lr=1e-2, progress=False)
    assert "safe" not in result.history[-1] and "suppress" in result.history[-1]
    assert result.history[-1]["suppress"] < result.history[0]["suppress"]
    assert mean(answer_probs(model, tok, forget)) < 0.9 * before


def test_forget_aligned_init_forgets_faster_early():
    """Measured on this tiny model (3 seeds, 5 steps, lr 1e-2): forget-answer probability 0.09-0.24
    with init="forget" vs 0.41-0.63 with random init; by 20 steps both are below 0.01."""
    probs = {}
    for init in ("random", "forget"):
        model, tok, forget, retain = trained_world_model()
        nsru.unlearn(model, tok, forget=forget, retain=retain, init=init, steps=5, batch_size=4, lr=1e-2,
                     progress=False)
        probs[init] = mean(answer_probs(model, tok, forget))
    assert probs["forget"] < probs["random"]


def test_method_defaults_fill_only_unset_options():
    from nsru.pipeline import resolve_config

    cfg, m = resolve_config("nsru", None, {})
    assert (cfg.safe_weight, cfg.suppress_weight, cfg.retain_weight, cfg.project) == (1.0, 0.3, 3.0, True)
    cfg, _ = resolve_config("nsru", None, {"retain_weight": 1.0})
    assert cfg.retain_weight == 1.0
    cfg, _ = resolve_config("graddiff", None, {})
    assert (cfg.suppress_weight, cfg.retain_weight, cfg.project) == (1.0, 1.0, False)
    cfg, _ = resolve_config(None, {"method": "nsru-no-project"}, {})
    assert cfg.project is False and cfg.method == "nsru-no-project"


def test_forget_items_longer_than_the_context_follow_too_long():
    model, tok, forget, retain = trained_world_model()
    long_row = {**forget[0], "answer": " ".join([forget[0]["answer"]] * 20)}
    with pytest.raises(DataError, match="forget row 0"):
        nsru.unlearn(model, tok, forget=[long_row] + forget[1:], retain=retain, max_length=24, too_long="error")
    assert not nsru.nsru_modules(model)
    with pytest.warns(UserWarning, match="forget row 0"):
        nsru.unlearn(model, tok, forget=[long_row] + forget[1:], retain=retain, max_length=24, too_long="warn",
                     steps=1, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="too_long must be cut, warn or error"):
        UnlearnConfig(too_long="drop")
