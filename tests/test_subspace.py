"""Retain statistics from hooks, bases by the subspace rule, leakage."""

import pytest
import torch

import nsru
from conftest import tiny_gpt2, tiny_llama, token_batches
from nsru.subspace import SecondMoments, basis_info


def _inputs_by_module(model, batches):
    """Each adapted module's inputs over the unmasked tokens, gathered the slow, obvious way."""
    seen = {n: [] for n in nsru.nsru_modules(model)}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach().reshape(-1, mod.in_features)))
        for n, m in nsru.nsru_modules(model).items()
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    return {n: torch.cat(xs)[masks].double() for n, xs in seen.items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_collected_moments_match_masked_inputs(make):
    model = make()
    nsru.apply_nsru(model, r=2)
    batches = token_batches(3)
    moments = nsru.collect_second_moments(model, batches, dtype=torch.float64, progress=False)
    inputs = _inputs_by_module(model, batches)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, x in inputs.items():
        assert x.shape[0] == n_tokens
        torch.testing.assert_close(moments[name], x.T @ x / n_tokens, rtol=1e-9, atol=1e-12)


def test_modules_reading_one_tensor_share_a_statistic():
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    moments = nsru.collect_second_moments(model, token_batches(2), progress=False)
    groups = moments.groups
    assert groups["model.layers.0.self_attn.k_proj"] == groups["model.layers.0.self_attn.q_proj"]
    assert groups["model.layers.0.self_attn.v_proj"] == groups["model.layers.0.self_attn.q_proj"]
    assert groups["model.layers.0.mlp.up_proj"] == groups["model.layers.0.mlp.gate_proj"]
    assert groups["model.layers.0.mlp.down_proj"] == "model.layers.0.mlp.down_proj"
    assert groups["model.layers.1.self_attn.q_proj"] != groups["model.layers.0.self_attn.q_proj"]
    assert len(moments.sums) == 2 * 4
    bases = nsru.retain_bases(moments, "k=3")
    assert bases["model.layers.0.self_attn.k_proj"] is bases["model.layers.0.self_attn.q_proj"]


def test_statistics_describe_the_original_model_and_accumulate():
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    batches = token_batches(4)
    with torch.no_grad():
        for layer in nsru.nsru_modules(model).values():
            layer.lora_B.normal_()
    whole = nsru.collect_second_moments(model, batches, dtype=torch.float64, progress=False)
    part = nsru.collect_second_moments(model, batches[:2], dtype=torch.float64, progress=False)
    part = nsru.collect_second_moments(model, batches[2:], dtype=torch.float64, into=part, progress=False)
    other = nsru.collect_second_moments(model, batches[2:], dtype=torch.float64, progress=False)
    first = nsru.collect_second_moments(model, batches[:2], dtype=torch.float64, progress=False).add_(other)
    for name in whole.names():
        torch.testing.assert_close(part[name], whole[name])
        torch.testing.assert_close(first[name], whole[name])
    plain = tiny_llama()
    inputs = _inputs_by_module(nsru.apply_nsru(plain, r=2) and plain, batches)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(whole[name], inputs[name].T @ inputs[name] / inputs[name].shape[0])


def test_subspace_size_rules():
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    moments = nsru.collect_second_moments(model, token_batches(3), progress=False)
    by_energy = nsru.retain_subspaces(moments, "energy=0.9")
    for name, s in by_energy.items():
        lam = s.eigenvalues.clamp_min(0)
        assert s.energy >= 0.9 - 1e-9
        assert float(lam[: s.k - 1].sum() / lam.sum()) < 0.9, name
        u = s.basis
        torch.testing.assert_close(u.T @ u, torch.eye(s.k), rtol=1e-5, atol=1e-5)
    assert all(u.shape[1] == 5 for u in nsru.retain_bases(moments, "k=5").values())
    assert all(u.shape[1] == 0 for u in nsru.retain_bases(moments, "energy=0.0").values())
    assert all(u.shape[1] == 32 for n, u in nsru.retain_bases(moments, "energy=1.0").items() if "down" not in n)
    with pytest.raises(ValueError, match="exactly one"):
        nsru.retain_bases(moments, "energy=0.9,k=3")


def test_leakage_is_zero_inside_and_positive_outside():
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    retain = token_batches(2, seed=1)
    moments = nsru.collect_second_moments(model, retain, dtype=torch.float64, progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments, "energy=0.95"))
    inside = nsru.leakage(model, retain, progress=False)
    assert all(0.0 <= v <= 0.1 for v in inside.values())  # about 1 - τ per token
    nsru.set_retain_bases(model, {n: torch.zeros(m.in_features, 0) for n, m in nsru.nsru_modules(model).items()})
    assert all(v == pytest.approx(1.0) for v in nsru.leakage(model, retain, progress=False).values())


def test_leakage_is_the_mean_over_real_tokens_of_the_energy_outside_the_basis():
    """Against ‖h − UUᵀh‖² / ‖h‖² in float64 on the inputs a plain forward gives each module."""
    model = tiny_llama()
    adapters = nsru.apply_nsru(model, r=2)
    batches = token_batches(2, seed=3)
    batches[0]["attention_mask"][0, -3:] = 0  # padding is not counted
    torch.manual_seed(0)
    bases = {n: torch.linalg.qr(torch.randn(m.in_features, k))[0]
             for (n, m), k in zip(adapters.items(), [0, 1, 5, 17, 32] * len(adapters))}
    nsru.set_retain_bases(model, bases)
    inputs = {n: [] for n in adapters}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach()))
               for n, m in adapters.items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    expected = {}
    for n, u in bases.items():
        h = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs[n], batches)]).double()
        u = u.double()
        expected[n] = float(((h - h @ u @ u.T).pow(2).sum(-1) / h.pow(2).sum(-1)).mean())
    got = nsru.leakage(model, batches, progress=False)
    assert got == pytest.approx(expected, abs=2e-6)
    assert min(expected.values()) < 0.9 < max(expected.values()) == 1.0  # the bases span a range of leakages


def test_errors_name_what_is_wrong():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no NSRU adapters"):
        nsru.collect_second_moments(model, token_batches(1), progress=False)
    nsru.apply_nsru(model, r=2)
    with pytest.raises(ValueError, match="no batch was given"):
        nsru.collect_second_moments(model, [], progress=False)
    with pytest.raises(KeyError, match="no NSRU adapter named 'lm_head'"):
        nsru.set_retain_bases(model, {"lm_head": torch.zeros(32, 0)})
    with pytest.raises(ValueError, match="different modules"):
        SecondMoments().add_(nsru.collect_second_moments(model, token_batches(1), progress=False))


def _count_calls(modules):
    """Forward calls of each of ``modules`` (a forward hook counts the calls that ran to the end)."""
    calls = {m: 0 for m in modules}
    handles = [m.register_forward_hook(lambda mod, args, out: calls.__setitem__(mod, calls[mod] + 1)) for m in modules]
    return calls, handles


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_hooked_passes_stop_after_the_last_adapted_input(make):
    """Statistics and leakage read module inputs only: the output head (and its vocabulary-wide
    logits) never runs, nor do the blocks above the last adapted module; the numbers are those of
    whole forwards."""
    model = make()
    head = model.get_output_embeddings()
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    nsru.apply_nsru(model, r=2, layers="0")
    batches = token_batches(2)
    calls, handles = _count_calls([head, blocks[0], blocks[1]])
    moments = nsru.collect_second_moments(model, batches, dtype=torch.float64, progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments, "energy=0.9"))
    leak = nsru.leakage(model, batches, progress=False)
    for h in handles:
        h.remove()
    assert calls[head] == 0 and calls[blocks[1]] == 0  # stopped inside block 0 ...
    assert calls[blocks[0]] == 0  # ... at the input of its last adapted module (that module never ran)
    inputs = _inputs_by_module(model, batches)  # whole forwards, the slow way
    for name, x in inputs.items():
        torch.testing.assert_close(moments[name], x.T @ x / x.shape[0], rtol=1e-9, atol=1e-12)
        u = nsru.nsru_modules(model)[name].retain_basis.double()
        ratio = ((x - x @ u @ u.T).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
        assert leak[name] == pytest.approx(float(ratio), rel=1e-5)


def test_an_adapted_output_head_still_gets_its_inputs():
    """An adapter on the output head (wrapped by hand; ``all-linear`` leaves the head out) reads the
    final hidden states; the head's product with the vocabulary is still never computed."""
    from nsru.layer import NSRULinear

    model = tiny_llama()
    nsru.apply_nsru(model, r=2, target_modules=["down_proj"])
    model.lm_head = NSRULinear(model.lm_head, r=2, name="lm_head")
    batches = token_batches(2)
    calls, handles = _count_calls([model.lm_head.base_layer])
    moments = nsru.collect_second_moments(model, batches, dtype=torch.float64, progress=False)
    for h in handles:
        h.remove()
    assert calls[model.lm_head.base_layer] == 0
    assert "lm_head" in moments.names()
    x = _inputs_by_module(model, batches)["lm_head"]
    torch.testing.assert_close(moments["lm_head"], x.T @ x / x.shape[0], rtol=1e-9, atol=1e-12)


def test_basis_info_forwards_each_batch_once_and_reports_every_set():
    """Leakage sets that share data (the statistics sources and the retain rows among them) cost one
    forward per batch, and each set's figure is that of :func:`nsru.leakage` on its own batches."""
    model = tiny_llama()
    nsru.apply_nsru(model, r=2)
    a, b, c = token_batches(2, seed=1), token_batches(1, seed=2), token_batches(2, seed=3)
    nsru.set_retain_bases(model, nsru.retain_bases(nsru.collect_second_moments(model, a + b, progress=False),
                                                   "energy=0.9"))
    expected = {"leakage": nsru.leakage(model, a + b, progress=False),
                "leakage_retain": nsru.leakage(model, a, progress=False),
                "leakage_forget": nsru.leakage(model, c, progress=False)}
    seen: list[bytes] = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].numpy().tobytes()))
    info = basis_info(model, {"a": a, "b": b, "c": c, "unused": token_batches(1, seed=4)},
                           sets={"leakage": ["a", "b"], "leakage_retain": ["a"], "leakage_forget": ["c"]})
    handle.remove()
    assert sorted(seen) == sorted(x["input_ids"].numpy().tobytes() for x in a + b + c)  # each once, nothing else
    for name, values in info.items():
        for key, by_module in expected.items():
            assert values[key] == pytest.approx(by_module[name], rel=1e-12, abs=1e-15), (name, key)
    with pytest.raises(KeyError, match="no data named 'd'"):
        basis_info(model, {"a": a}, sets={"leakage": ["d"]})
