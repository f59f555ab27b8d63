import math

import pytest
import torch

from nsru import objectives as obj
from nsru.methods import METHODS, LossContext, get_method
from tinylm import one_thread

LN2 = math.log(2.0)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture
def two_token():
    # Position 0 predicts label 1 (= 0) with p = 1/4; position 1 predicts label 2 (= 1) with p = 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    return logits, labels


def test_token_and_sequence_logprobs(two_token):
    logits, labels = two_token
    tok, mask = obj.token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True]]
    assert tok[0].tolist() == pytest.approx([math.log(0.25), math.log(0.5)])
    logp, n = obj.sequence_logprob(logits, labels)
    assert logp.item() == pytest.approx(math.log(0.125)) and n.item() == 2


def test_nll_and_gradient_ascent(two_token):
    logits, labels = two_token
    assert obj.nll_loss(logits, labels).item() == pytest.approx(1.5 * LN2)
    assert obj.gradient_ascent_loss(logits, labels).item() == pytest.approx(-1.5 * LN2)


def test_unlikelihood(two_token):
    logits, labels = two_token
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert obj.unlikelihood_loss(logits, labels).item() == pytest.approx(expected)


def test_npo():
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0])
    expected = -(2 / 0.1) * (logsig(-0.1 * 1.0) + logsig(0.0)) / 2
    assert obj.npo_loss(logp, ref, beta=0.1).item() == pytest.approx(expected, rel=1e-6)
    # At the reference the loss is (2/β) ln 2 and its gradient pushes log π down.
    x = torch.tensor([-2.0], requires_grad=True)
    loss = obj.npo_loss(x, torch.tensor([-2.0]), beta=0.1)
    assert loss.item() == pytest.approx(20 * LN2)
    loss.backward()
    assert x.grad.item() == pytest.approx(1.0)  # d/dx -(2/β) log σ(-β x) = 2 σ(β x) = 1 at 0


def test_simnpo():
    logp, n = torch.tensor([-6.0]), torch.tensor([3])
    assert obj.simnpo_loss(logp, n, beta=4.5, delta=0.0).item() == pytest.approx(-(2 / 4.5) * logsig(4.5 * 2.0))
    assert obj.simnpo_loss(logp, n, beta=4.5, delta=0.5).item() == pytest.approx(-(2 / 4.5) * logsig(4.5 * 1.5))


def test_dpo():
    c, r, c_ref, r_ref = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.0))
    expected = -(2 / 0.1) * logsig(0.1 * 1.5)
    assert obj.dpo_loss(c, r, c_ref, r_ref, beta=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_kl():
    logits = torch.tensor([[[0.0, math.log(3.0)], [9.0, 9.0]]])
    ref = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    labels = torch.tensor([[-100, 1]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert obj.kl_loss(logits, ref, labels).item() == pytest.approx(expected)
    assert obj.kl_loss(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-7)


def test_rmu_terms():
    h = torch.tensor([[[1.0, 2.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 0]])
    control = torch.tensor([0.0, 4.0])
    assert obj.rmu_forget_loss(h, control, mask).item() == pytest.approx((1 + 4) / 2)
    assert obj.rmu_retain_loss(h, torch.zeros_like(h), mask).item() == pytest.approx((1 + 4) / 2)


def test_registry_and_ablations():
    assert {"nsru", "ga", "graddiff", "npo", "simnpo", "idkdpo", "rmu"} <= set(METHODS)
    m = get_method("nsru-no-safe-no-project")
    assert m.loss is METHODS["nsru"].loss and m.overrides == {"safe": False, "project": False}
    with pytest.raises(ValueError, match="unknown unlearning method 'bogus'.*graddiff"):
        get_method("bogus")


def test_nsru_loss_weights_and_reference():
    """On a freshly adapted model (B = 0) π_θ = π_ref, so NPO is (2/β) ln 2; the total is the
    weighted sum of the terms."""
    import nsru
    from nsru.config import UnlearnConfig
    from nsru.data import QACollator, encode_qa
    from tinylm import tiny_llama, word_tokenizer

    tok = word_tokenizer(["who is Anna ? Anna is a baker . I don't know ."])
    with one_thread():
        model = tiny_llama(len(tok))
        nsru.apply_nsru(model, r=2, alpha=4)
        col = QACollator(tok)
        batch = {
            "forget": col([encode_qa(tok, "who is Anna ?", "Anna is a baker .")] * 2),
            "safe": col([encode_qa(tok, "who is Anna ?", "I don't know .")] * 2),
            "retain": col([encode_qa(tok, "who is Anna ?", "a baker .")] * 2),
        }
        cfg = UnlearnConfig(safe_weight=2.0, suppress_weight=3.0, retain_weight=0.5, beta=0.1)
        out = METHODS["nsru"].loss(LossContext(model, cfg), batch)
        assert out["suppress"].item() == pytest.approx(20 * LN2, rel=1e-5)
        total = 2.0 * out["safe"] + 3.0 * out["suppress"] + 0.5 * out["retain"]
        assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
        off = METHODS["nsru"].loss(LossContext(model, cfg.replace(safe=False, retain=False)), batch)
        assert set(off) == {"suppress", "loss"}


def test_reference_log_probabilities_are_computed_once_per_sequence():
    import nsru
    from nsru.config import UnlearnConfig
    from nsru.data import QACollator, encode_qa
    from nsru.objectives import sequence_logprob
    from tinylm import tiny_llama, word_tokenizer

    tok = word_tokenizer(["who is Anna ? Anna is a baker . who is Boris ? Boris is a pilot ."])
    with one_thread():
        model = tiny_llama(len(tok))
        layers = nsru.apply_nsru(model, r=2, alpha=4)
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.5)  # policy != reference
        col = QACollator(tok)
        a = encode_qa(tok, "who is Anna ?", "Anna is a baker .")
        b = encode_qa(tok, "who is Boris ?", "Boris is a pilot .")
        ctx = LossContext(model, UnlearnConfig())
        calls = []
        ctx.ref_forward = (lambda f: lambda batch, **kw: calls.append(len(batch["input_ids"])) or f(batch, **kw))(ctx.ref_forward)
        first = ctx.ref_logprob(col([a, b]))
        with nsru.adapter_disabled(model):
            batch = col([a, b])
            want, _ = sequence_logprob(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                       batch["labels"])
        torch.testing.assert_close(first, want)
        again = ctx.ref_logprob(col([b, a, b]))  # other padding, other order: looked up, not recomputed
        torch.testing.assert_close(again, want[[1, 0, 1]])
        assert calls == [2]


# ---------------------------------------------------------------- a backward per loss term


def _method_setup(name: str):
    """A tiny adapted Llama (B ≠ 0, so every factor gets a gradient), a batch with every part, and
    the method's context."""
    import nsru
    from nsru.config import UnlearnConfig
    from nsru.data import QACollator, encode_qa
    from tinylm import tiny_llama, word_tokenizer

    tok = word_tokenizer(["who is Anna ? Anna is a baker . I don't know . who is Boris ? Boris is a pilot ."])
    model = tiny_llama(len(tok), hidden=32)
    layers = nsru.apply_nsru(model, r=2, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    col = QACollator(tok)
    pairs = {"forget": [("who is Anna ?", "Anna is a baker ."), ("who is Boris ?", "a pilot .")],
             "safe": [("who is Anna ?", "I don't know ."), ("who is Boris ?", "I don't know .")],
             "retain": [("who is Boris ?", "Boris is a pilot ."), ("who is Anna ?", "a baker .")]}
    batch = {part: col([encode_qa(tok, q, a) for q, a in rows]) for part, rows in pairs.items()}
    method = get_method(name)
    cfg = UnlearnConfig(method=name, rmu_layer=1).replace(**method.overrides)
    ctx = LossContext(model, cfg)
    if method.setup is not None:
        method.setup(ctx, [batch["forget"]])
    return model, batch, method, ctx


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["nsru", "nsru-no-safe", "ga", "graddiff", "npo", "simnpo", "idkdpo", "rmu"])
def test_a_backward_per_term_gives_the_gradients_of_one_backward_of_the_sum(name):
    with one_thread():
        model, batch, method, ctx = _method_setup(name)
        ctx.counts = {part: obj.batch_counts(enc["labels"], enc["attention_mask"]) for part, enc in batch.items()}
        ctx.counts = {p: {k: float(v) for k, v in c.items()} for p, c in ctx.counts.items()}
        whole = method.loss(ctx, batch)
        whole["loss"].backward()
        want = _gradients(model)
        seen = []
        ctx.term_backward = lambda term, used_denom: seen.append(used_denom) or term.backward()
        each = method.loss(ctx, batch)
        got = _gradients(model)
    assert not each["loss"].requires_grad and len(seen) == len(set(whole) - {"loss"}) and all(seen)
    for key in whole:
        assert float(each[key]) == pytest.approx(float(whole[key].detach()), rel=1e-6)
    assert sorted(got) == sorted(want) and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def _peak_saved_bytes(fn) -> int:
    """The most bytes held at once by tensors that autograd saved for a backward while ``fn`` runs."""
    live, peak = [0], [0]

    class Saved:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        fn()
    return peak[0]


def test_a_backward_per_term_holds_one_forward_at_a_time():
    with one_thread():
        model, batch, method, ctx = _method_setup("nsru")
        whole = _peak_saved_bytes(lambda: method.loss(ctx, batch)["loss"].backward())
        ctx.term_backward = lambda term, used_denom: term.backward()
        each = _peak_saved_bytes(lambda: method.loss(ctx, batch))
    # three forwards with graphs (safe, forget, retain) against one at a time
    assert each < 0.45 * whole, (each, whole)
