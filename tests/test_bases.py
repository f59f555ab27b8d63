"""The bases file (``nsru subspace``'s folder) and ``nsru.unlearn(bases=...)``: the statistics are
skipped, the adapters go on the bases' modules, and ``bases_info`` reports their real k and the
leakage on this run's retain and forget data."""

import json

import pytest
import torch
from safetensors.torch import save_file

import nsru
from nsru.config import UnlearnConfig
from nsru.subspace import BasesFileError, read_bases
from tinylm import one_thread, trained_world_model

OPTIONS = dict(steps=1, batch_size=4, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def bases_dir(tmp_path_factory):
    """A folder written by ``nsru subspace`` (stats=retain) for the trained world model."""
    from nsru.cli.subspace import compute_and_save

    out = tmp_path_factory.mktemp("sub")
    model, tok, forget, retain = trained_world_model()
    with one_thread():
        compute_and_save(model, tok, UnlearnConfig(stats="retain", progress=False), retain, forget, out, model_name="w")
    return out


def test_the_folder_reads_back_with_one_basis_per_module(bases_dir):
    saved = read_bases(bases_dir)
    meta, report = saved.meta, saved.report
    assert meta["format"] == "nsru-subspace" and meta["version"] == 1 and meta["model"] == "w"
    assert list(saved.bases) == meta["modules"] == list(report["modules"])
    for name, u in saved.bases.items():
        assert u.shape[1] == report["modules"][name]["k"] > 0
        key = meta["groups"][name]  # modules that read the same tensor share their group's basis
        assert torch.equal(u, saved.bases[key])
    assert {"leakage", "leakage_forget"} <= set(next(iter(report["modules"].values())))


def test_a_folder_in_the_layout_of_earlier_versions_stays_readable(tmp_path):
    """Files as ``nsru subspace`` wrote them before the format moved into the library (no report)."""
    u = torch.linalg.qr(torch.randn(8, 3))[0].contiguous()
    save_file({"a.q": u}, str(tmp_path / "bases.safetensors"), metadata={"format": "pt"})
    (tmp_path / "subspace.json").write_text(json.dumps(
        {"format": "nsru-subspace", "version": 1, "model": None, "rule": "energy=0.9", "target_modules": "all-linear",
         "layers": None, "modules": ["a.q", "a.k"], "groups": {"a.q": "a.q", "a.k": "a.q"}}))
    saved = read_bases(tmp_path)
    assert list(saved.bases) == ["a.q", "a.k"] and torch.equal(saved.bases["a.k"], u) and saved.report == {}
    (tmp_path / "subspace.json").write_text('{"format": "other"}')
    with pytest.raises(BasesFileError, match="not an nsru subspace file"):
        read_bases(tmp_path)
    with pytest.raises(BasesFileError, match="not a folder written by `nsru subspace`"):
        read_bases(tmp_path / "nothing")


def test_unlearn_with_bases_skips_the_statistics_and_reports_their_k_and_leakage(bases_dir, monkeypatch):
    import nsru.stats_sources

    saved = read_bases(bases_dir)
    monkeypatch.setattr(nsru.stats_sources, "encode_rows",
                        lambda *a, **k: pytest.fail("statistics collected although bases were given"))
    for given in (bases_dir, str(bases_dir), saved, saved.bases):
        model, tok, forget, retain = trained_world_model()
        result = nsru.unlearn(model, tok, forget=forget, retain=retain, bases=given, **OPTIONS)
        adapters = nsru.nsru_modules(model)
        assert list(adapters) == list(saved.bases) == list(result.bases_info)
        assert result.config.project is True and result.stats_info == {}
        for name, info in result.bases_info.items():
            assert info["k"] == saved.bases[name].shape[1] == adapters[name].k > 0
            torch.testing.assert_close(adapters[name].retain_basis, saved.bases[name])
            # the subspace run measured its leakage on the same retain data
            assert info["leakage"] == pytest.approx(saved.report["modules"][name]["leakage"], rel=1e-5, abs=1e-7)
            assert info["leakage_forget"] == pytest.approx(saved.report["modules"][name]["leakage_forget"],
                                                           rel=1e-5, abs=1e-7)
        assert result.summary()["mean_leakage"] < 1.0


def test_bases_that_do_not_fit_are_refused_before_the_model_changes(bases_dir):
    saved = read_bases(bases_dir)
    model, tok, forget, retain = trained_world_model()
    with pytest.raises(ValueError, match="bases= applies to projected adapters"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, bases=saved, project=False, **OPTIONS)
    name = next(iter(saved.bases))
    with pytest.raises(ValueError, match=f"the basis of '{name}' has shape .* the bases are of another model"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, bases={name: torch.eye(3)[:, :1]}, **OPTIONS)
    with pytest.raises(ValueError, match="do not name linear modules of .* one to one \\(e.g. 'model.nope'\\)"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, bases={**saved.bases, "model.nope": torch.eye(3)[:, :1]},
                     **OPTIONS)
    with pytest.raises(TypeError, match="bases must be a folder"):
        nsru.unlearn(model, tok, forget=forget, retain=retain, bases=[1, 2], **OPTIONS)
    assert not nsru.nsru_modules(model)
    # with bases, no retain data is needed for the statistics (the retain term is switched off here)
    result = nsru.unlearn(model, tok, forget=forget, retain=False, bases=saved, **OPTIONS)
    assert all(set(info) == {"k", "in_features", "capped", "leakage_forget"} for info in result.bases_info.values())
