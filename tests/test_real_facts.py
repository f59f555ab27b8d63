"""Checks on the real-knowledge fact set (``nsru/bench/data/real_facts.json``, DESIGN §5).

The file is data for the SmolLM2 scenario: famous entities split into forget / retain / neighbour
groups, general facts, perplexity text, statistics text and chat prompts. These tests only read the
JSON; they need no model.
"""

import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path

import pytest

FACT_FIELDS = ("question", "paraphrase", "answer", "choices", "correct")
EXPECTED_FACTS = {"forget": 16, "retain": 12, "neighbour": 12}
# Short names a text may use for an entity besides its full name and its last word.
EXTRA_ALIASES = {
    "Leonardo da Vinci": ["Leonardo", "da Vinci"],
    "Galileo Galilei": ["Galileo"],
    "Napoleon Bonaparte": ["Napoleon"],
}


def _load():
    try:
        res = importlib.resources.files("nsru.bench") / "data" / "real_facts.json"
        text = res.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[1] / "nsru" / "bench" / "data" / "real_facts.json"
        text = path.read_text(encoding="utf-8")
    return json.loads(text)


@pytest.fixture(scope="module")
def data():
    return _load()


def _aliases(name):
    return {name, name.split()[-1], *EXTRA_ALIASES.get(name, [])}


def _mentions(text, alias):
    return re.search(r"\b" + re.escape(alias) + r"\b", text, flags=re.IGNORECASE) is not None


def _all_items(data):
    for ent in data["entities"]:
        for fact in ent["facts"]:
            yield ent["name"], fact
    for fact in data["general"]:
        yield None, fact


def _sentences(paragraph):
    return len(re.findall(r"[.!?](?:\s|$)", paragraph.strip()))


def _sentence_breaks(text):
    # A full stop or question mark after a lower-case word, then a capital: a new sentence.
    # (Initials such as "Franklin D. Roosevelt" or "J.K. Rowling" do not count.)
    return len(re.findall(r"[a-z0-9]{2}[.?]\s+[A-Z]", text))


def test_top_level_schema(data):
    assert data["version"] == 1
    for key in ("entities", "general", "ppl_text", "stats_text", "chat_prompts"):
        assert isinstance(data[key], list) and data[key], key
    for key in ("ppl_text", "stats_text", "chat_prompts"):
        assert all(isinstance(s, str) and s.strip() for s in data[key]), key


def test_fact_schema(data):
    for owner, fact in _all_items(data):
        where = f"{owner or 'general'}: {fact.get('question')}"
        assert set(fact) == set(FACT_FIELDS), where
        for key in ("question", "paraphrase", "answer"):
            assert isinstance(fact[key], str) and fact[key].strip(), where
        assert fact["question"].endswith("?") and fact["paraphrase"].endswith("?"), where
        assert fact["paraphrase"] != fact["question"], where
        choices = fact["choices"]
        assert isinstance(choices, list) and len(choices) == 4, where
        assert all(isinstance(c, str) and c.strip() and len(c) <= 60 for c in choices), where
        assert len({c.strip().lower() for c in choices}) == 4, where
        k = fact["correct"]
        assert isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 4, where
        assert choices[k].lower() in fact["answer"].lower(), where
        assert fact["answer"].rstrip("'").endswith((".", "!")), where
        assert _sentence_breaks(fact["answer"]) == 0, where


def test_group_and_fact_counts(data):
    groups = Counter(ent["group"] for ent in data["entities"])
    assert set(groups) <= set(EXPECTED_FACTS)
    assert groups["forget"] == 2
    assert groups["retain"] >= 5
    assert groups["neighbour"] >= 8
    forget = {ent["name"] for ent in data["entities"] if ent["group"] == "forget"}
    assert forget == {"Albert Einstein", "William Shakespeare"}
    names = [ent["name"] for ent in data["entities"]]
    assert len(names) == len(set(names))
    for ent in data["entities"]:
        assert len(ent["facts"]) == EXPECTED_FACTS[ent["group"]], ent["name"]
    assert len(data["general"]) >= 80
    assert len(data["ppl_text"]) >= 24
    assert len(data["stats_text"]) >= 64
    assert len(data["chat_prompts"]) >= 48


def test_entity_facts_name_their_subject_and_no_other_entity(data):
    names = [ent["name"] for ent in data["entities"]]
    for ent in data["entities"]:
        own = _aliases(ent["name"])
        others = {a for n in names if n != ent["name"] for a in _aliases(n)}
        for fact in ent["facts"]:
            assert ent["name"] in fact["answer"], fact["answer"]
            for key in ("question", "paraphrase"):
                assert any(_mentions(fact[key], a) for a in own), fact[key]
            text = " ".join([fact["question"], fact["paraphrase"], fact["answer"], *fact["choices"]])
            hit = [a for a in others if _mentions(text, a)]
            assert not hit, (ent["name"], fact["question"], hit)


def test_no_entity_named_outside_its_facts(data):
    aliases = {a for ent in data["entities"] for a in _aliases(ent["name"])}
    texts = [("general", " ".join([f["question"], f["paraphrase"], f["answer"], *f["choices"]]))
             for f in data["general"]]
    for key in ("ppl_text", "stats_text", "chat_prompts"):
        texts += [(key, t) for t in data[key]]
    for where, text in texts:
        hit = [a for a in aliases if _mentions(text, a)]
        assert not hit, (where, hit, text[:80])


def test_alias_check_can_fail():
    # The surname and extra-alias matching the test above relies on.
    assert _mentions("The young Napoleon rode on.", "Napoleon")
    assert _mentions("a portrait by da Vinci", "da Vinci")
    assert not _mentions("Napoleonic", "Napoleon")
    assert "Einstein" in _aliases("Albert Einstein")


def test_questions_never_repeat(data):
    strings = [s for _, f in _all_items(data) for s in (f["question"], f["paraphrase"])]
    dup = [s for s, n in Counter(s.strip().lower() for s in strings).items() if n > 1]
    assert not dup, dup


def test_correct_positions_are_spread(data):
    counts = Counter(f["correct"] for _, f in _all_items(data))
    total = sum(counts.values())
    for k in range(4):
        assert counts[k] >= 0.15 * total, counts


def test_text_sections(data):
    for key in ("ppl_text", "stats_text"):
        for para in data[key]:
            assert 2 <= _sentences(para) <= 4, (key, para[:80])
    every = data["ppl_text"] + data["stats_text"] + data["chat_prompts"]
    assert len(every) == len(set(every))
    # Statistics text is disjoint from everything evaluated.
    evaluated = set(data["ppl_text"]) | {f["answer"] for _, f in _all_items(data)}
    assert not evaluated & set(data["stats_text"])
    for prompt in data["chat_prompts"]:
        assert prompt.rstrip().endswith((".", "?")), prompt
