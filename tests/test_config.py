"""The config reads the ``stats`` option for everyone: the source list and what needs retain data."""

from types import SimpleNamespace

import pytest

from nsru.config import UnlearnConfig

WITH_TERM, NO_TERM = SimpleNamespace(needs_retain=True), SimpleNamespace(needs_retain=False)


@pytest.mark.parametrize("stats,with_retain,without", [
    ("auto", ["retain", "self"], ["self"]),
    ("retain", ["retain"], ["retain"]),
    ("self", ["self"], ["self"]),
    (["retain", "self"], ["retain", "self"], ["retain", "self"]),
    (("self",), ["self"], ["self"]),
])
def test_stats_sources_is_a_list_with_auto_resolved(stats, with_retain, without):
    cfg = UnlearnConfig(stats=stats)
    assert cfg.stats_sources() == cfg.stats_sources(has_retain=True) == with_retain
    assert cfg.stats_sources(has_retain=False) == without


def test_needs_retain_data_names_what_needs_it():
    cfg = UnlearnConfig(stats="retain", project=True)
    assert cfg.needs_retain_data(WITH_TERM) == "retention"
    assert cfg.replace(retain=False).needs_retain_data(WITH_TERM) == "statistics"
    assert cfg.needs_retain_data(NO_TERM) == "statistics"
    assert cfg.needs_retain_data(NO_TERM, bases=True) is None  # given bases: no statistics
    assert cfg.replace(project=False).needs_retain_data(NO_TERM) is None  # plain LoRA
    assert cfg.replace(finetune="full").needs_retain_data(NO_TERM) is None
    assert cfg.replace(stats="auto").needs_retain_data(NO_TERM) is None  # auto without retain data: self
    assert cfg.replace(stats=["self", "retain"]).needs_retain_data(NO_TERM) == "statistics"
    # nsru subspace (no method): the statistics are always collected
    assert UnlearnConfig(stats="retain").needs_retain_data() == "statistics"
    assert UnlearnConfig(stats="self").needs_retain_data() is None
    assert cfg.projects() and not cfg.replace(project=False).projects() and not UnlearnConfig().projects()
