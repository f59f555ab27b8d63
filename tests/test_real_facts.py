"""Checks on the real-knowledge fact set (``nsru/bench/data/real_facts.json``, DESIGN §5).

The file is data for the SmolLM2 scenario: famous entities split into forget / retain / neighbour
groups, general facts, perplexity text, statistics text and chat prompts. These tests only read the
JSON; they need no model.

Version 2 (issue 18) adds, without changing any version-1 value:

* ``kind`` on every entity ("physicist", "writer", ...) and ``neighbour_kind`` on each forget
  target: the kind of the neighbours the audit scores beside it (at least four neighbours each);
* neighbour entities of those kinds, marked ``added_in: 2`` (the entities without it are exactly
  version 1's, so version-1 runs can be reproduced);
* on every forget and neighbour fact, ``reverse`` (a question whose answer is the entity, four
  people of its kind as choices; ``null`` where the fact does not single the entity out) and
  ``cloze`` (a declarative prefix naming the entity and four completions).
"""

import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path

import pytest

FACT_FIELDS = ("question", "paraphrase", "answer", "choices", "correct")
PROBE_FIELDS = ("reverse", "cloze")  # on forget and neighbour facts only
EXPECTED_FACTS = {"forget": 16, "retain": 12, "neighbour": 12}
VERSION_1_GROUPS = {"forget": 2, "retain": 5, "neighbour": 8}
MIN_SAME_KIND_NEIGHBOURS = 4
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


def _probed(ent):
    return ent["group"] in ("forget", "neighbour")


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
    assert data["version"] == 2
    for key in ("entities", "general", "ppl_text", "stats_text", "chat_prompts"):
        assert isinstance(data[key], list) and data[key], key
    for key in ("ppl_text", "stats_text", "chat_prompts"):
        assert all(isinstance(s, str) and s.strip() for s in data[key]), key


def test_fact_schema(data):
    probed = {ent["name"] for ent in data["entities"] if _probed(ent)}
    for owner, fact in _all_items(data):
        where = f"{owner or 'general'}: {fact.get('question')}"
        assert set(fact) == set(FACT_FIELDS) | (set(PROBE_FIELDS) if owner in probed else set()), where
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
            if fact.get("cloze"):
                text += " " + " ".join([fact["cloze"]["prompt"], *fact["cloze"]["choices"]])
            if fact.get("reverse"):
                text += " " + fact["reverse"]["question"]
            hit = [a for a in others if _mentions(text, a)]
            assert not hit, (ent["name"], fact["question"], hit)


# --- version 2: kinds, same-kind neighbours, reverse and cloze probes (issue 18) ---------------

def _kind_problems(data):
    """What is wrong with the kinds: every entity has one, each forget target names its
    neighbours' kind, and at least MIN_SAME_KIND_NEIGHBOURS neighbours are of that kind."""
    out = []
    for ent in data["entities"]:
        if not (isinstance(ent.get("kind"), str) and ent["kind"].strip()):
            out.append(f"{ent['name']}: no kind")
        if ("neighbour_kind" in ent) != (ent["group"] == "forget"):
            out.append(f"{ent['name']}: neighbour_kind belongs on forget targets only")
    for ent in data["entities"]:
        if ent["group"] != "forget":
            continue
        same = [n["name"] for n in data["entities"]
                if n["group"] == "neighbour" and n.get("kind") == ent.get("neighbour_kind")]
        if len(same) < MIN_SAME_KIND_NEIGHBOURS:
            out.append(f"{ent['name']}: {len(same)} neighbours of kind {ent.get('neighbour_kind')!r}")
    return out


def _people_problems(data):
    """A person in two entities (or groups): names and the short names a text may use must be
    distinct across entities."""
    out = []
    seen = {}
    for ent in data["entities"]:
        for alias in _aliases(ent["name"]):
            key = alias.lower()
            if key in seen and seen[key] != ent["name"]:
                out.append(f"{alias!r} names both {seen[key]} and {ent['name']}")
            seen[key] = ent["name"]
    return out


def _choice_problems(choices, correct):
    if not (isinstance(choices, list) and len(choices) == 4):
        return ["not four choices"]
    out = []
    if not all(isinstance(c, str) and c.strip() and len(c) <= 60 for c in choices):
        out.append("an empty or long choice")
    elif len({c.strip().lower() for c in choices}) != 4:
        out.append("choices repeat")
    if not (isinstance(correct, int) and not isinstance(correct, bool) and 0 <= correct < 4):
        out.append(f"correct {correct!r} out of range")
    return out


def _reverse_problems(data, ent, fact):
    """A reverse probe asks for the entity without naming it: its choices are four people, the
    entity at ``correct``, the others no entity of the set."""
    rev = fact.get("reverse", "missing")
    if rev is None:
        return []
    if not (isinstance(rev, dict) and set(rev) == {"question", "choices", "correct"}):
        return [f"reverse is {rev!r}"]
    out = _choice_problems(rev["choices"], rev["correct"])
    q = rev["question"]
    if not (isinstance(q, str) and q.endswith("?")):
        out.append("reverse question is not a question")
        return out
    every = {a for e in data["entities"] for a in _aliases(e["name"])}
    if any(_mentions(q, a) for a in every):
        out.append(f"reverse question names an entity: {q}")
    if out:
        return out
    if rev["choices"][rev["correct"]] != ent["name"]:
        out.append(f"reverse choice {rev['correct']} is {rev['choices'][rev['correct']]!r}, not {ent['name']!r}")
    for i, c in enumerate(rev["choices"]):
        if i != rev["correct"] and any(_mentions(c, a) for a in every):
            out.append(f"reverse distractor {c!r} is an entity of the set")
    return out


def _cloze_problems(ent, fact):
    """A cloze probe is a declarative prefix that names the entity, completed by one of four choices."""
    cl = fact.get("cloze")
    if not (isinstance(cl, dict) and set(cl) == {"prompt", "choices", "correct"}):
        return [f"cloze is {cl!r}"]
    out = _choice_problems(cl["choices"], cl["correct"])
    p = cl["prompt"]
    if not (isinstance(p, str) and p.strip() == p and p and not p.endswith(("?", "."))):
        out.append(f"cloze prompt {p!r} is not a sentence prefix")
    elif not any(_mentions(p, a) for a in _aliases(ent["name"])):
        out.append(f"cloze prompt does not name {ent['name']}: {p}")
    return out


def _probe_problems(data):
    out = []
    for ent in data["entities"]:
        for fact in ent["facts"]:
            if not _probed(ent):
                if set(PROBE_FIELDS) & set(fact):
                    out.append(f"{ent['name']}: probes on a {ent['group']} fact")
                continue
            where = f"{ent['name']}: {fact['question']}"
            out += [f"{where}: {p}" for p in _reverse_problems(data, ent, fact) + _cloze_problems(ent, fact)]
    return out


def test_kinds_and_same_kind_neighbours(data):
    assert _kind_problems(data) == []
    forget = {ent["name"]: ent["neighbour_kind"] for ent in data["entities"] if ent["group"] == "forget"}
    assert forget == {"Albert Einstein": "physicist", "William Shakespeare": "writer"}


def test_no_person_in_two_entities(data):
    assert _people_problems(data) == []


def test_version_1_entities_are_those_without_added_in(data):
    old = [ent for ent in data["entities"] if "added_in" not in ent]
    assert Counter(ent["group"] for ent in old) == VERSION_1_GROUPS
    new = [ent for ent in data["entities"] if "added_in" in ent]
    assert new and all(ent["added_in"] == 2 and ent["group"] == "neighbour" for ent in new)
    # the version-1 entities come first, so their order (and real.py's even spacing over them) holds
    assert data["entities"][:len(old)] == old


def test_reverse_and_cloze_probes(data):
    assert _probe_problems(data) == []
    probed = [f for ent in data["entities"] if _probed(ent) for f in ent["facts"]]
    reverse = [f["reverse"] for f in probed if f["reverse"] is not None]
    # most facts single their entity out; some (a birthplace, a century) do not and stay null
    assert 0.3 * len(probed) <= len(reverse) < len(probed)
    for ent in data["entities"]:
        if ent["group"] == "forget":
            assert sum(f["reverse"] is not None for f in ent["facts"]) >= 6, ent["name"]


def test_probe_checks_can_fail(data):
    import copy

    def broken(edit):
        d = copy.deepcopy(data)
        edit(d)
        return _kind_problems(d) + _people_problems(d) + _probe_problems(d)

    einstein = lambda d: d["entities"][0]  # noqa: E731
    assert einstein(data)["name"] == "Albert Einstein"
    rev = next(i for i, f in enumerate(einstein(data)["facts"]) if f["reverse"])

    def fact(d):
        return einstein(d)["facts"][rev]

    def shift_correct(d):
        fact(d)["reverse"]["correct"] = (fact(d)["reverse"]["correct"] + 1) % 4

    def drop_subject(d):
        r = fact(d)["reverse"]
        r["choices"][r["correct"]] = "Enrico Fermi" if "Enrico Fermi" not in r["choices"] else "Paul Dirac"

    def repeat_choice(d):
        r = fact(d)["reverse"]
        r["choices"][(r["correct"] + 1) % 4] = r["choices"][(r["correct"] + 2) % 4]

    def name_subject(d):
        fact(d)["reverse"]["question"] = "Which physicist, Albert Einstein, developed relativity?"

    def entity_distractor(d):
        r = fact(d)["reverse"]
        r["choices"][(r["correct"] + 1) % 4] = "Marie Curie"

    def cloze_out_of_range(d):
        fact(d)["cloze"]["correct"] = 4

    def cloze_unnamed(d):
        fact(d)["cloze"]["prompt"] = "The famous equation is"

    def no_cloze(d):
        del fact(d)["cloze"]

    def no_reverse(d):
        del fact(d)["reverse"]

    def probes_on_retain(d):
        ent = next(e for e in d["entities"] if e["group"] == "retain")
        ent["facts"][0]["cloze"] = {"prompt": ent["name"] + " was", "choices": list("abcd"), "correct": 0}

    def few_neighbours(d):
        for e in d["entities"]:
            if e["group"] == "neighbour" and e["kind"] == "writer":
                e["kind"] = "novelist"

    def no_kind(d):
        del d["entities"][3]["kind"]

    def person_twice(d):
        d["entities"][-1]["name"] = "Albert Einstein"

    def surname_twice(d):
        d["entities"][-1]["name"] = "Hans Einstein"

    for edit in (shift_correct, drop_subject, repeat_choice, name_subject, entity_distractor, cloze_out_of_range,
                 cloze_unnamed, no_cloze, no_reverse, probes_on_retain, few_neighbours, no_kind, person_twice,
                 surname_twice):
        assert broken(edit), edit.__name__


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
    strings += [f["reverse"]["question"] for _, f in _all_items(data) if f.get("reverse")]
    strings += [f["cloze"]["prompt"] for _, f in _all_items(data) if f.get("cloze")]
    dup = [s for s, n in Counter(s.strip().lower() for s in strings).items() if n > 1]
    assert not dup, dup


def test_correct_positions_are_spread(data):
    for probe in (None, "reverse", "cloze"):
        items = [f[probe] if probe else f for _, f in _all_items(data) if not probe or f.get(probe)]
        counts = Counter(item["correct"] for item in items)
        total = sum(counts.values())
        for k in range(4):
            assert counts[k] >= 0.15 * total, (probe, counts)


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
