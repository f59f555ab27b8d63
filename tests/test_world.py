"""The synthetic TOFU/WMDP-style world: determinism, formats, splits, shared names."""

import json

import pytest

from nsru.bench.world import ATTRIBUTES, World, WorldConfig, make_world
from nsru.data import load_qa, load_text


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def test_deterministic_per_seed():
    from nsru.bench.world import _build

    a = make_world(seed=3, n_people=40)
    fresh = _build(WorldConfig(seed=3, n_people=40))  # not from the in-process cache
    assert a.split("full") == fresh.split("full")
    assert a.mc("hazard") == fresh.mc("hazard")
    assert a.corpus("benign") == fresh.corpus("benign")
    other = make_world(WorldConfig(seed=4, n_people=40))
    assert other.split("full") != a.split("full")


def test_split_sizes_and_nesting(world):
    n_attr = len(ATTRIBUTES)
    assert len(world.people) == 200
    assert len(world.split("full")) == 200 * n_attr
    for frac in (1, 5, 10):
        forget, retain = world.split(f"forget{frac:02d}"), world.split(f"retain{100 - frac:02d}")
        assert len(forget) == 2 * frac * n_attr
        assert len(forget) + len(retain) == len(world.split("full"))
        assert not {r["subject"] for r in forget} & {r["subject"] for r in retain}
    f01, f05, f10 = (set(world.forget_people(s)) for s in ("forget01", "forget05", "forget10"))
    assert f01 < f05 < f10
    assert world.retain_split_of("forget05") == "retain95"
    evalset = {r["subject"] for r in world.split("retain_perturbed")}
    assert len(world.split("retain_perturbed")) == len(world.split("forget10"))
    assert not evalset & f10


def test_forget_people_share_name_tokens_with_retain_people(world):
    retain = {r["subject"] for r in world.split("retain90")}
    firsts = {n.split()[0] for n in retain}
    lasts = {n.split()[-1] for n in retain}
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names)
    for name in world.forget_people("forget10"):
        first, last = name.split()
        assert first in firsts and last in lasts, name


def test_tofu_fields(world):
    for split in ("forget10", "retain_perturbed", "world_facts"):
        for row in world.split(split):
            assert isinstance(row["question"], str) and row["question"].endswith("?")
            assert row["answer"] != row["paraphrased_answer"]
            assert len(row["perturbed_answer"]) >= 3
            assert len(set(row["perturbed_answer"])) == len(row["perturbed_answer"])
            assert row["answer"] not in row["perturbed_answer"]
            assert row["paraphrased_answer"] not in row["perturbed_answer"]
            assert isinstance(row["subject"], str)
    # the world facts never mention a person
    names = {p.first for p in world.people} | {p.last for p in world.people}
    for row in world.split("world_facts"):
        text = " ".join([row["question"], row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]])
        assert not names & set(text.replace(".", " ").replace("?", " ").replace("'s", " ").split())


def test_perturbed_answers_share_the_paraphrase_template(world):
    for row in world.split("forget05"):
        value = world.people[[p.name for p in world.people].index(row["subject"])].attributes[row["attribute"]]
        assert value in row["paraphrased_answer"] and value in row["answer"]
        template = row["paraphrased_answer"].replace(value, "{v}")
        for pert in row["perturbed_answer"]:
            assert value not in pert
            prefix, _, suffix = template.partition("{v}")
            assert pert.startswith(prefix) and pert.endswith(suffix)


def test_wmdp_fields(world):
    hazard, benign = world.mc("hazard"), world.mc("benign")
    assert hazard and len(benign) >= 2 * len(hazard)
    for row in hazard + benign:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert 0 <= row["answer"] < 4
    answers = [r["answer"] for r in hazard + benign]
    assert len(set(answers)) == 4  # the right letter is not always the same
    assert {r["domain"] for r in hazard}.isdisjoint({r["domain"] for r in benign})
    corpus = world.corpus("hazard")
    assert corpus and all(set(r) >= {"text"} and r["text"] for r in corpus)
    # every hazardous fact is stated in the corpus
    texts = " ".join(r["text"] for r in corpus)
    for row in hazard:
        assert row["choices"][row["answer"]] in texts
    with pytest.raises(KeyError, match="unknown domain"):
        world.mc("nope")


def test_save_roundtrip_with_the_data_loaders(world, tmp_path):
    paths = world.save(tmp_path)
    rows = load_qa(paths["forget10"])
    assert rows == world.split("forget10")
    assert load_text(paths["hazard_corpus"])[0]["text"] == world.corpus("hazard")[0]["text"]
    mc = [json.loads(line) for line in paths["hazard_mc"].read_text().splitlines()]
    assert mc == world.mc("hazard")


def test_rows_are_copies(world):
    rows = world.split("forget01")
    rows[0]["answer"] = "changed"
    rows[0]["perturbed_answer"].append("x")
    assert world.split("forget01")[0]["answer"] != "changed"
    assert "x" not in world.split("forget01")[0]["perturbed_answer"]


def test_bad_config():
    with pytest.raises(ValueError, match="unknown attributes"):
        WorldConfig(attributes=("shoe size",))
    with pytest.raises(ValueError, match="n_people"):
        WorldConfig(n_people=5)
    with pytest.raises(KeyError, match="no split"):
        make_world().split("forget50")


def test_unknown_people_get_i_dont_know(world):
    rows = world.split("unknown")
    real = {p.name for p in world.people}
    firsts = {p.first for p in world.people}
    assert len(rows) == 20 * len(ATTRIBUTES)
    for row in rows:
        assert row["subject"] not in real and row["subject"].split()[0] in firsts
        assert row["subject"] in row["answer"] and row["answer"] != row["paraphrased_answer"]
        assert row["answer"].startswith("I")
