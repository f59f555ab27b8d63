"""stop_at=: training ends when the forget rows are forgotten (nsru.stopping), not after steps."""

from __future__ import annotations

import pytest
import torch

import nsru
from nsru.config import ConfigError
from nsru.data import encode_qa, pad_token_id
from nsru.objectives import IGNORE_INDEX
from nsru.stopping import ForgetCheck
from tinylm import one_thread, trained_world_model


def test_the_check_is_the_median_probability_ratio_of_the_answer_tokens():
    model, tok, forget, _ = trained_world_model()
    enc = [encode_qa(tok, r["question"], r["answer"]) for r in forget]
    check = ForgetCheck(model, enc, pad_token_id(tok), stop_at=0.5, batch_size=3)  # a ragged last batch
    assert check(model, 0) == {"forget_ratio": pytest.approx(1.0), "stop": False}
    # the reference: each row alone, the mean log-probability of its answer tokens
    with torch.no_grad():
        for e, got in zip(enc, check.before):
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            keep = labels[1:] != IGNORE_INDEX
            want = logp[keep].gather(-1, labels[1:][keep].unsqueeze(-1)).mean()
            assert float(got) == pytest.approx(float(want), abs=1e-4)
    # a model that puts less weight on every answer token: the ratio falls below 1
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    assert check(model, 1)["forget_ratio"] < 1.0
    with pytest.raises(ValueError, match="stop_at must lie between 0 and 1"):
        ForgetCheck(model, enc, pad_token_id(tok), stop_at=1.0)
    no_answer = [{**e, "labels": [IGNORE_INDEX] * len(e["labels"])} for e in enc]
    with pytest.raises(ValueError, match="no forget row has an answer token"):
        ForgetCheck(model, no_answer, pad_token_id(tok), stop_at=0.5)


def test_unlearn_stops_once_the_forget_answers_are_unlikely():
    model, tok, forget, retain = trained_world_model()
    with one_thread():
        result = nsru.unlearn(model, tok, forget=forget, retain=retain, steps=60, stop_at=0.3, stop_every=2,
                              batch_size=4, lr=3e-2, progress=False)
    checks = [(r["step"], r["stop_check"]) for r in result.history if "stop_check" in r]
    assert [s for s, _ in checks] == list(range(2, len(result.history) + 1, 2))  # every stop_every steps
    assert 3 <= len(checks) and len(result.history) < 60
    assert checks[-1][1]["stop"] and checks[-1][1]["forget_ratio"] <= 0.3
    assert all(not c["stop"] and c["forget_ratio"] > 0.3 for _, c in checks[:-1])
    for bad, message in (({"stop_at": 1.5}, "stop_at must lie between 0 and 1"),
                         ({"stop_at": 0.5, "stop_every": 0}, "stop_every must be at least 1")):
        with pytest.raises(ConfigError, match=message):
            nsru.unlearn(model, tok, forget=forget, retain=retain, **bad)
