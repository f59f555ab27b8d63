"""benchmarks/leakage_curve.py on the tiny world: one point per sample count, its own sample
cache, the file and the plot (the SmolLM2 curve itself is measured, not tested)."""

import importlib.util
import json
import os
from pathlib import Path

from test_real_scenario import _facts
from tinylm import one_thread, trained_world_model

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "leakage_curve.py"


def _module():
    spec = importlib.util.spec_from_file_location("leakage_curve", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_curve_fits_bases_per_sample_count_in_a_fresh_cache(tmp_path, monkeypatch):
    curve = _module()
    monkeypatch.setenv("NSRU_CACHE", str(tmp_path / "user-cache"))
    with one_thread():
        result = curve.measure([0, 8], layers="1", load=lambda: trained_world_model()[:2], facts=_facts(),
                               model_name="tiny world", log=lambda *a: None)
    assert [p["self_samples"] for p in result["points"]] == [0, 8]
    for p in result["points"]:
        assert 0 < p["leakage_neighbour"] < 1 and 0 < p["leakage_general"] < 1 and p["mean_k"] > 0
    # the samples change the statistics: another basis, another leakage
    assert result["points"][0]["leakage_general"] != result["points"][1]["leakage_general"]
    # the user's cache is neither read nor written, and is set back afterwards
    assert os.environ["NSRU_CACHE"] == str(tmp_path / "user-cache") and not (tmp_path / "user-cache").exists()
    curve.plot(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(result)) == result
