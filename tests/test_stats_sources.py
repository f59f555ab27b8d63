"""Where the retain statistics come from: retain data, the model's own samples, corpora, budgets;
and the layer band that limits which modules get adapters."""

import json

import pytest
import torch

import nsru
from nsru.config import ConfigError
from nsru.self_samples import sample_self, subjects_of
from nsru.stats_sources import describe, global_source_means, stats_encodings
from tinylm import one_thread, trained_world_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_self_samples_are_seeded_cached_filtered_and_leave_the_rng_alone(tmp_path, monkeypatch):
    model, tok, forget, retain = trained_world_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_self(model, tok, 12, max_new_tokens=8, seed=1, cache=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)  # sampling forks the RNG
    assert len(first) == 12 and all(set(r) == {"text"} for r in first)  # no chat template: from BOS
    assert len(list(tmp_path.glob("*.json"))) == 1
    # the cache answers the second call: generation is not run again
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated although cached"))
    assert sample_self(model, tok, 12, max_new_tokens=8, seed=1, cache=tmp_path) == first
    # another seed is another sample (and another cache entry)
    monkeypatch.undo()
    other = sample_self(model, tok, 12, max_new_tokens=8, seed=2, cache=tmp_path)
    assert other != first and len(list(tmp_path.glob("*.json"))) == 2
    # rows naming a forget subject are dropped (names in the model's vocabulary are common here)
    subjects = subjects_of(forget)
    assert "Anna Novak" in subjects and "Novak" in subjects
    kept = sample_self(model, tok, 12, max_new_tokens=8, seed=1, cache=tmp_path, exclude=subjects)
    named = [r for r in first if any(s.lower() in r["text"].lower() for s in subjects)]
    assert len(kept) == len(first) - len(named)
    assert not any(s.lower() in r["text"].lower() for r in kept for s in subjects)


def test_sources_combine_under_a_token_budget(tmp_path):
    model, tok, forget, retain = trained_world_model()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Oslo Lima Rome {i} ."}) for i in range(40)))
    kw = dict(model=model, tokenizer=tok, retain_rows=retain, forget_rows=forget)
    sources = stats_encodings(["retain"], **kw)
    assert list(sources) == ["retain"] and len(sources["retain"]) == len(retain)
    report = describe(stats_encodings(["retain", str(corpus)], tokens=60, **kw))
    assert set(report) == {"retain", str(corpus)}
    for part in report.values():  # each source gets half the budget (the last row may run over)
        assert 30 <= part["tokens"] < 30 + 20
    with pytest.raises(ValueError, match="no retain data"):
        stats_encodings(["retain"], model=model, tokenizer=tok, retain_rows=None, forget_rows=forget)


def test_unlearn_with_self_statistics_reports_leakage_on_retain_and_forget(tmp_path, monkeypatch):
    monkeypatch.setenv("NSRU_CACHE", str(tmp_path))
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, stats=["retain", "self"], self_samples=16,
                          self_max_new_tokens=8, steps=2, batch_size=4, progress=False)
    assert list((tmp_path / "self-samples").glob("*.json"))
    for info in result.bases_info.values():
        assert {"leakage", "leakage_retain", "leakage_forget"} <= set(info)
        assert 0 < info["k"] <= info["in_features"]
    # the statistics saw the retain data, so it leaks less than the forget data on average
    mean = lambda key: sum(v[key] for v in result.bases_info.values()) / len(result.bases_info)
    assert mean("leakage_retain") < mean("leakage_forget")
    # projection without retain data is possible when the statistics come from elsewhere
    model, tok, forget, _ = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=False, stats="self", self_samples=16,
                          self_max_new_tokens=8, steps=1, batch_size=4, progress=False)
    assert all(v["k"] > 0 for v in result.bases_info.values())


def test_bad_stats_and_layers_are_refused_by_name_before_any_work(tmp_path):
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(ConfigError, match="missing.jsonl' is neither 'auto', 'retain', 'self', 'neighbours' nor an existing"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, stats=["retain", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ConfigError, match="layers must look like"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, layers="1-x")
    assert not nsru.nsru_modules(model)
    with pytest.raises(ValueError, match="needs data for its statistics"):
        nsru.unlearn(model, tok, forget=forget, retain=False, stats="retain")


def test_layer_band_limits_the_adapters():
    model, tok, forget, retain = trained_world_model()
    adapters = nsru.apply_nsru(model, layers="1")
    assert adapters and all(".layers.1." in n for n in adapters)
    model, *_ = trained_world_model()
    with pytest.raises(ValueError, match="selects none of the matched modules; their layers are 0-1"):
        nsru.apply_nsru(model, layers="5-7")
    model, tok, forget, retain = trained_world_model()
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, layers=[0], steps=1, batch_size=4, progress=False)
    assert result.bases_info and all(".layers.0." in n for n in result.bases_info)


def test_each_source_weighs_equally_whatever_its_size():
    """Two sources' statistic is the mean of their own means: a source repeated ten times (ten times
    the tokens) gets the same statistic as once, and the one-source statistic is that source's mean."""
    from nsru.data import pad_encodings, pad_token_id

    model, tok, forget, retain = trained_world_model()
    nsru.apply_nsru(model, r=2)
    pad = pad_token_id(tok)

    def batches(encodings):
        return [{k: v for k, v in pad_encodings(encodings[i:i + 8], pad).items() if k != "labels"}
                for i in range(0, len(encodings), 8)]

    kw = dict(model=model, tokenizer=tok, forget_rows=forget)
    one, _ = global_source_means(model, stats_encodings(["retain"], retain_rows=retain, **kw), batches)
    plain = nsru.collect_second_moments(model, batches(stats_encodings(["retain"], retain_rows=retain, **kw)["retain"]),
                                        progress=False)
    forget_only = nsru.collect_second_moments(model, batches(stats_encodings(["retain"], retain_rows=forget, **kw)["retain"]),
                                              progress=False)
    sources = {"retain": stats_encodings(["retain"], retain_rows=retain, **kw)["retain"],
               "forget x10": stats_encodings(["retain"], retain_rows=forget * 10, **kw)["retain"]}
    mixed, _ = global_source_means(model, sources, batches)
    for name in plain.names():
        torch.testing.assert_close(one[name], plain[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mixed[name], (plain[name] + forget_only[name]) / 2, rtol=1e-4, atol=1e-6)


def test_fit_retain_bases_runs_each_batch_once_for_the_leakage(tmp_path):
    """The retain rows are a statistics source: their leakage pass is shared with the statistics
    data's (one statistics and one leakage forward per batch, the forget batches one), and every
    figure equals :func:`nsru.leakage` on that data's own batches."""
    from nsru.data import input_batches, pad_token_id
    from nsru.pipeline import _encode_forget, _encode_retain, fit_retain_bases, resolve_config

    model, tok, forget, retain = trained_world_model()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Oslo Lima Rome {i} ."}) for i in range(20)))
    cfg, m = resolve_config(None, None, {"stats": ["retain", str(corpus)], "progress": False})
    nsru.apply_nsru(model, r=2)
    retain_enc = [e["retain"] for e in _encode_retain(retain, tok, cfg)]
    forget_enc = [e["forget"] for e in _encode_forget(forget, tok, cfg, m)]
    forwards: dict[tuple, int] = {}  # forwards of each batch (its token ids)
    key = lambda ids: (tuple(ids.shape), ids.numpy().tobytes())  # noqa: E731

    def count(module, args):
        forwards[key(args[0])] = forwards.get(key(args[0]), 0) + 1

    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    fit = fit_retain_bases(model, tok, cfg, retain_rows=retain, forget_rows=forget, retain=retain_enc,
                           forget=forget_enc)
    handle.remove()
    pad = pad_token_id(tok)
    batches = {name: input_batches(enc, pad) for name, enc in stats_encodings(
        ["retain", str(corpus)], model=model, tokenizer=tok, retain_rows=retain, forget_rows=forget).items()}
    forget_batches = input_batches(forget_enc, pad)
    assert [forwards[key(b["input_ids"])] for b in [*batches["retain"], *batches[str(corpus)]]] == [2] * (
        len(batches["retain"]) + len(batches[str(corpus)]))  # statistics + leakage (was 3 for the retain rows)
    assert [forwards[key(b["input_ids"])] for b in forget_batches] == [1] * len(forget_batches)
    expected = {"leakage": nsru.leakage(model, [*batches["retain"], *batches[str(corpus)]], progress=False),
                "leakage_retain": nsru.leakage(model, batches["retain"], progress=False),
                "leakage_forget": nsru.leakage(model, forget_batches, progress=False)}
    for name, info in fit.modules.items():
        for key, values in expected.items():
            assert info[key] == pytest.approx(values[name], rel=1e-12, abs=1e-15), (name, key)


def test_neighbours_source_asks_about_the_forget_subjects_and_keeps_avoided_names_out(monkeypatch):
    """stats="neighbours": nsru.targets.neighbour_rows on the subjects of the forget rows, with
    stats_avoid; its rows are a statistics source of their own. Forget rows without subjects, and a
    model that knows no neighbour, are clear errors."""
    import nsru.stats_sources as sources
    from nsru.targets import TargetData

    model, tok, forget, retain = trained_world_model()
    asked = {}

    def fake(model, tokenizer, subjects, **kw):
        asked.update(subjects=subjects, **kw)
        return TargetData(forget=[], retain=retain[:3])

    monkeypatch.setattr(sources, "neighbour_rows", fake)
    result = nsru.unlearn(model, tok, forget=forget, retain=retain, stats=["retain", "neighbours"],
                          stats_avoid=["Eva Silva"], steps=1, batch_size=4, seed=3, progress=False)
    assert asked["subjects"] == list(dict.fromkeys(r["subject"] for r in forget))
    assert asked["avoid"] == ["Eva Silva"] and asked["seed"] == 3
    assert result.stats_info["neighbours"]["rows"] == 3 and result.stats_info["retain"]["rows"] == len(retain)
    with pytest.raises(ValueError, match="'neighbours' needs forget rows with a 'subject'"):
        stats_encodings(["neighbours"], model=model, tokenizer=tok, retain_rows=None,
                        forget_rows=[{"question": r["question"], "answer": r["answer"]} for r in forget])
    monkeypatch.undo()
    # the tiny world knows none of the built-in neighbours (it refuses): nothing to add, said so
    with pytest.raises(ValueError, match="'neighbours' found no entity of the kind of Anna Novak"):
        stats_encodings(["neighbours"], model=model, tokenizer=tok, retain_rows=None, forget_rows=forget[:1])
    with pytest.raises(ConfigError, match="stats_avoid must be a list of names"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, stats_avoid="Eva Silva")
