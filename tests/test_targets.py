"""nsru.targets: forget and retain rows from a name alone (issue 19, the RWKU setting)."""

from __future__ import annotations

import json

import pytest

from nsru.targets import (
    KINDS,
    agreement,
    agrees,
    QUESTION_BANK,
    NothingToForget,
    TargetData,
    consistent,
    content_words,
    greedy_answers,
    judge,
    kind_from_text,
    names_any,
    neighbour_rows,
    parse_names,
    parse_questions,
    specific_words,
    target_rows,
    trim_answer,
)
from tinylm import one_thread, trained_world_model

# --------------------------------------------------------------------------------------------
# text: what counts as a specific, consistent answer


def test_content_and_specific_words_leave_out_the_question_the_name_and_filler():
    q = "Where was Albert Einstein born?"
    words = content_words("Albert Einstein was born in Ulm, a famous city in Germany, in 1879.", (q, "Albert Einstein"))
    assert words == {"ulm", "city", "germany", "1879"}
    assert specific_words("Albert Einstein was born in Ulm, a city in Germany, in 1879.", (q, "Albert Einstein")) \
        == {"ulm", "germany", "1879"}
    # plural and possessive forms are one word
    assert content_words("physics physic's") == {"physic"}


def test_consistent_answers_share_a_specific_word_or_most_content_words():
    ex = ("Where was Albert Einstein born?", "In which town or city was Albert Einstein born?", "Albert Einstein")
    assert consistent("Albert Einstein was born in Ulm, Germany.", "He came into the world in Ulm.", ex)
    assert not consistent("Albert Einstein was born in Ulm, Germany.",
                          "Albert Einstein was born in Bern, Switzerland.", ex)
    # no capitalised word: half of the content words in common is enough, less is not
    ex2 = ("What did she study?", "Which subject did she study?", "Mara Quint")
    assert consistent("She studied theoretical physics and mathematics.", "Mostly physics and mathematics.", ex2)
    assert not consistent("She studied theoretical physics and mathematics at length.",
                          "She studied painting and music.", ex2)
    # two shared content words are enough however long the answers
    assert consistent("Her pioneering research on radioactivity changed chemistry, medicine and industry forever.",
                      "Radioactivity and chemistry.", ex2)
    assert not consistent("Her research on radioactivity changed chemistry, medicine and industry forever.",
                          "Radioactivity, mostly, and the fate of stars, planets and galaxies.", ex2)
    # words of the question and of the name never make two answers agree
    assert not consistent("Albert Einstein was born.", "Albert Einstein was born.", ex)


@pytest.mark.parametrize("answer, paraphrase_answer, samples, reason", [
    ("Albert Einstein was born in Ulm, Germany.", "In the German city of Ulm.", (), None),
    ("I'm sorry, but I don't know the answer to that.", "Albert Einstein was born in Ulm.", (), "refusal"),
    ("His birthplace is unclear.", "Albert Einstein was born in Ulm.", (), "hedge"),
    ("Albert Einstein was born in a town.", "Albert Einstein was born in a town.", (), "not specific"),
    ("", "Albert Einstein was born in Ulm.", (), "empty"),
    # the other answers decide: the paraphrase's alone, or with the samples, half of them at least
    ("Albert Einstein was born in Ulm, Germany.", "Albert Einstein was born in Bern, Switzerland.", (),
     "inconsistent"),
    ("Albert Einstein was born in Ulm.", "I don't have any information about Albert Einstein.", (), "inconsistent"),
    ("Albert Einstein was born in Ulm, Germany.", "Albert Einstein was born in Bern, Switzerland.",
     ("He was born in Ulm.", "Ulm, in Germany.", "In Munich."), None),
    ("Albert Einstein was born in Ulm, Germany.", "Albert Einstein was born in Ulm.",
     ("In Bern.", "In Vienna, Austria.", "I'm not sure.", "Ulm."), "inconsistent"),
])
def test_judge_keeps_only_specific_answers_that_most_other_answers_back(answer, paraphrase_answer, samples, reason):
    got = judge("Albert Einstein", "Where was Albert Einstein born?", answer,
                "In which town or city was Albert Einstein born?", paraphrase_answer, samples)
    assert got == reason


def test_agreement_does_not_count_refusals_as_agreeing():
    ex = ("Where was Zed Quorn born?", "Zed Quorn")
    assert agrees("Zed Quorn was born in Ulm.", "Ulm, I think.", ex)
    assert not agrees("I don't know where Zed Quorn was born.", "I don't know where Zed Quorn was born.", ex)
    assert agreement("Zed Quorn was born in Ulm.", ["In Ulm.", "In Rome.", "I can't say."], ex) == pytest.approx(1 / 3)
    assert agreement("Zed Quorn was born in Ulm.", []) == 0.0


def test_trim_answer_keeps_complete_sentences():
    assert trim_answer("Einstein was born in Ulm. He studied in Zurich. He moved to Berlin. Later") == \
        "Einstein was born in Ulm. He studied in Zurich."
    assert trim_answer("Einstein was born in Ulm. He studied in", max_sentences=3) == "Einstein was born in Ulm."
    assert trim_answer("  He was born in Ulm.\n\nQuestion: next?") == "He was born in Ulm."
    assert trim_answer("He was born in Ulm") == "He was born in Ulm"


@pytest.mark.parametrize("text, kind", [
    ("Albert Einstein was a German-born theoretical physicist.", "scientist"),
    ("William Shakespeare was an English playwright and poet.", "writer"),
    ("Mozart was a prolific composer of symphonies and operas.", "musician"),
    ("Lyon is a city in France, known for its food.", "place"),
    ("Hamlet is a tragedy, a play by William Shakespeare.", "work"),
    ("Acme is a company that makes anvils.", "organisation"),
    ("Zorvath Quillmere is a fictional character from the 2019 film adaptation of a TV series.", "person"),
    ("Nobody you would have heard of.", "person"),
])
def test_kind_from_text(text, kind):
    assert kind_from_text(text) == kind
    assert kind in KINDS


def test_parse_questions_and_names():
    text = "1. Where was Ada Lovelace born?\n2) What did Lovelace write?\n- Who was her father?\nSure, here they are."
    assert parse_questions(text, "Ada Lovelace") == ["Where was Ada Lovelace born?", "What did Lovelace write?"]
    names = parse_names("Nikola Tesla, Albert Einstein, Marie Curie, Nikola Tesla and Ludwig van Beethoven.",
                        exclude=["Albert Einstein"])
    assert names == ["Nikola Tesla", "Marie Curie", "Ludwig van Beethoven"]
    listed = "1. Albert Einstein\n2. Marie Curie\n3. Sir Isaac Newton\n4. Einstein\n\nThese scientists are famous."
    assert parse_names(listed, exclude=["Albert Einstein"]) == ["Marie Curie", "Isaac Newton"]
    assert parse_names(listed, exclude=["Albert Einstein", "Isaac Newton"]) == ["Marie Curie"]
    assert names_any("Einstein's theory", ["Albert Einstein"]) and not names_any("Einsteinium", ["Albert Einstein"])


def test_the_bank_has_every_kind_and_only_named_templates():
    assert set(QUESTION_BANK) == set(KINDS)
    for pairs in QUESTION_BANK.values():
        assert len(pairs) >= 4
        for topic, question, paraphrase in pairs:
            assert "{name}" in question and "{name}" in paraphrase and question != paraphrase


# --------------------------------------------------------------------------------------------
# on the tiny world model: it knows twelve fictitious people and refuses about four others

# The world's questions (the word-level tokenizer knows no other wording); the paraphrase is the
# lower-case question, whose first word the tokenizer does not know.
WORLD = {"person": [("home", "Where does {name} live ?", "where does {name} live ?"),
                    ("job", "What is the job of {name} ?", "what is the job of {name} ?")]}


@pytest.fixture(scope="module")
def world():
    model, tok, forget, retain = trained_world_model()
    facts = {r["question"]: r["answer"] for r in forget + retain}
    with one_thread():
        yield model, tok, facts


def _rows(model, tok, names, **kw):
    return target_rows(model, tok, names, **{"kind": "person", "questions": WORLD, "max_new_tokens": 12, **kw})


def test_known_targets_give_their_facts_as_forget_rows_and_neighbours_as_retain_rows(world):
    model, tok, facts = world
    data = _rows(model, tok, ["Anna Novak", "Clara Berg"], neighbours=["Boris Silva", "Anna Berg"])
    assert isinstance(data, TargetData)
    assert [(r["subject"], r["topic"]) for r in data.forget] == [
        ("Anna Novak", "home"), ("Anna Novak", "job"), ("Clara Berg", "home"), ("Clara Berg", "job")]
    for row in data.forget + data.retain:
        assert set(row) >= {"question", "answer", "paraphrased_answer", "subject"}
        assert all(isinstance(row[k], str) for k in ("question", "answer", "paraphrased_answer", "subject"))
        # the model's own answer, which in this world is the fact it was trained on
        assert content_words(row["answer"]) == content_words(facts[row["question"]])
    # Anna Berg shares Clara Berg's last name: her rows are kept (only a target's name drops a row)
    assert sorted({r["subject"] for r in data.retain}) == ["Anna Berg", "Boris Silva"]
    assert len(data.retain) == 4
    report = data.report
    assert data.subjects == ["Anna Novak", "Clara Berg"]
    assert report["targets"]["Anna Novak"]["asked"] == 2 and report["targets"]["Anna Novak"]["kept"] == 2
    assert report["targets"]["Anna Novak"]["familiarity"] >= 0.5
    assert report["neighbours"]["Boris Silva"]["source"] == "given"
    assert report["seconds"] >= 0 and report["generated_answers"] > 0


def test_a_name_the_model_does_not_know_is_a_clear_error_and_keeps_what_was_generated(world):
    model, tok, _ = world
    with pytest.raises(NothingToForget, match=r"the model gave no specific answer about 'Igor Novak'; "
                                              r"nothing to forget \(asked 2 questions; dropped: refusal 2") as info:
        _rows(model, tok, ["Igor Novak"], neighbours=[])
    assert isinstance(info.value, ValueError) and info.value.targets == ["Igor Novak"]
    assert info.value.data.report["targets"]["Igor Novak"]["kept"] == 0
    # one unknown target among known ones: the error names only it, the known one's rows are kept
    with pytest.raises(NothingToForget) as info:
        _rows(model, tok, ["Anna Novak", "Eva Silva"], neighbours=[])
    assert info.value.targets == ["Eva Silva"] and "Anna Novak" not in str(info.value)
    assert {r["subject"] for r in info.value.data.forget} == {"Anna Novak"}


def test_answers_that_change_with_the_wording_or_the_sample_are_dropped(world):
    model, tok, _ = world
    # the "paraphrase" asks another fact: "lives in Lima" and "is a pilot" disagree, and without
    # samples the paraphrase alone decides
    mixed = {"person": [("mixed", "Where does {name} live ?", "What is the job of {name} ?")]}
    with pytest.raises(NothingToForget, match="inconsistent 1"):
        _rows(model, tok, ["Anna Novak"], questions=mixed, neighbours=[], samples=0)
    # with samples, 4 stable samples outvote one disagreeing paraphrase
    assert len(_rows(model, tok, ["Anna Novak"], questions=mixed, neighbours=[]).forget) == 1
    # samples drawn at a silly temperature disagree with the greedy answer: 1 of 5 others agree
    with pytest.raises(NothingToForget, match="inconsistent 2") as info:
        _rows(model, tok, ["Anna Novak"], neighbours=[], temperature=50.0)
    items = info.value.data.report["targets"]["Anna Novak"]["questions"]
    assert all(i["paraphrase_agrees"] and i["sample_agreement"] < 0.5 for i in items)
    assert info.value.data.report["targets"]["Anna Novak"]["familiarity"] < 0.5
    # the target-level check: facts that pass are dropped when the target's familiarity is too low
    with pytest.raises(NothingToForget, match="unfamiliar target 2.*under min_familiarity=1.0"):
        _rows(model, tok, ["Anna Novak"], neighbours=[], temperature=50.0, min_agreement=0.0, min_familiarity=1.0)
    # without samples only the paraphrase check remains
    assert len(_rows(model, tok, ["Anna Novak"], neighbours=[], temperature=50.0, samples=0).forget) == 2


def test_neighbours_found_without_being_given_skip_avoided_names(world):
    model, tok, _ = world
    data = _rows(model, tok, ["Anna Novak"], neighbours_per_target=2, avoid=["Cleopatra", "Marco Polo"])
    chosen = data.report["neighbours"]
    assert len(chosen) == 2 and not {"Cleopatra", "Marco Polo", "Anna Novak"} & set(chosen)
    assert all(r["source"] in ("model", "built-in") and r["neighbour_of"] == "Anna Novak" for r in chosen.values())
    # the tiny world knows none of the built-in names: it refuses, and no retain row comes of it
    assert all(r["kept"] == 0 for r in chosen.values() if r["source"] == "built-in")
    assert all(r["subject"] in chosen for r in data.retain)


def test_neighbour_rows_alone_are_the_retain_rows_target_rows_writes(world):
    """neighbour_rows: step 5 of target_rows for subjects whose forget rows are given (the
    "neighbours" statistics source): the same rows, no forget rows, and a subject is never its own
    neighbour."""
    model, tok, _ = world
    given = ["Boris Silva", "Anna Novak", "Anna Berg"]
    alone = neighbour_rows(model, tok, ["Anna Novak", "Clara Berg"], kind="person", questions=WORLD,
                           neighbours=given, max_new_tokens=12)
    full = _rows(model, tok, ["Anna Novak", "Clara Berg"], neighbours=given)
    assert alone.forget == [] and alone.retain == full.retain and len(alone.retain) == 4
    assert list(alone.report["neighbours"]) == ["Boris Silva", "Anna Berg"]
    assert alone.report["subjects"]["Anna Novak"]["kind"] == "person"
    # found, not given: the avoided names and the subjects are skipped
    found = neighbour_rows(model, tok, ["Anna Novak"], kind="person", questions=WORLD, neighbours_per_target=2,
                           avoid=["Cleopatra"], max_new_tokens=12)
    assert len(found.report["neighbours"]) == 2 and not {"Cleopatra", "Anna Novak"} & set(found.report["neighbours"])
    with pytest.raises(ValueError, match="questions_per_neighbour must be at least 1"):
        neighbour_rows(model, tok, ["Anna Novak"], questions_per_neighbour=0)


def test_greedy_answers_are_the_same_in_a_left_padded_batch_as_alone(world):
    model, tok, _ = world
    questions = ["What is the job of Anna Novak ?", "Where does Boris Silva live ?", "Where does Eva Silva live ?"]
    batched = greedy_answers(model, tok, questions, max_new_tokens=10)
    alone = [greedy_answers(model, tok, [q], max_new_tokens=10)[0] for q in questions]
    assert batched == alone
    assert content_words(batched[0]) == {"anna", "novak", "pilot"}


def test_write_puts_editable_files_in_the_folder(world, tmp_path):
    from nsru.data import load_qa

    model, tok, _ = world
    data = _rows(model, tok, ["Clara Berg"], neighbours=["Boris Silva"])
    paths = data.write(tmp_path / "generated")
    assert {k: p.name for k, p in paths.items()} == {"forget": "forget.jsonl", "retain": "retain.jsonl",
                                                      "report": "report.json"}
    assert load_qa(paths["forget"], "forget") == data.forget
    assert load_qa(paths["retain"], "retain") == data.retain
    lines = paths["forget"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["subject"] == "Clara Berg"
    report = json.loads(paths["report"].read_text(encoding="utf-8"))
    assert report["targets"]["Clara Berg"]["kept"] == 2 and report["settings"]["samples"] == 4
    # an edited file is what the user gets back: rows read as TOFU rows
    edited = [dict(r, answer="Clara Berg lives in Porto .") for r in load_qa(paths["forget"])]
    paths["forget"].write_text("".join(json.dumps(r) + "\n" for r in edited), encoding="utf-8")
    assert load_qa(paths["forget"])[0]["answer"] == "Clara Berg lives in Porto ."


def test_bad_arguments_are_named(world):
    model, tok, _ = world
    with pytest.raises(TypeError, match=r"list of names.*\['Anna Novak'\]"):
        target_rows(model, tok, "Anna Novak")
    with pytest.raises(ValueError, match="at least one name"):
        target_rows(model, tok, [])
    with pytest.raises(ValueError, match="kind='dragon'"):
        target_rows(model, tok, ["Anna Novak"], kind="dragon")
    with pytest.raises(ValueError, match=r"\{name\}"):
        target_rows(model, tok, ["Anna Novak"], questions={"person": [("home", "Where ?", "Where ??")]})
    with pytest.raises(ValueError, match="questions_per_target"):
        target_rows(model, tok, ["Anna Novak"], questions_per_target=0)


def test_the_kind_is_asked_when_not_given(world):
    model, tok, _ = world
    data = target_rows(model, tok, ["Anna Novak"], questions=WORLD, neighbours=[], max_new_tokens=12)
    report = data.report["targets"]["Anna Novak"]
    assert report["kind"] in KINDS
    assert list(report["kind_from"]) == ["Who or what is Anna Novak?", "What is Anna Novak best known for?"]
    assert len(data.forget) == 2  # a kind the custom bank lacks falls back to its "person" questions


def test_descriptions_add_a_row_only_where_the_paragraph_states_a_kept_fact(world, monkeypatch):
    import nsru.targets as targets

    model, tok, _ = world
    # the world's tokenizer knows only its own questions: they stand in for "Tell me about X."
    monkeypatch.setattr(targets, "DESCRIPTION_PROMPTS", ("Where does {name} live ?", "What is the job of {name} ?"))
    home_only = {"person": [WORLD["person"][0]]}
    data = _rows(model, tok, ["Anna Novak"], questions=home_only, neighbours=[], descriptions=2)
    described = data.report["targets"]["Anna Novak"]["descriptions"]
    # where she lives is the kept fact; her job is true but backed by no kept fact: dropped
    assert [(d["question"], d["kept"], d["reason"]) for d in described] == [
        ("Where does Anna Novak live ?", True, None), ("What is the job of Anna Novak ?", False, "states no kept fact")]
    assert [(r["topic"], r["source"]) for r in data.forget] == [("home", "bank"), ("description", "description")]
    assert "lima" in content_words(data.forget[1]["answer"]) and data.report["settings"]["descriptions"] == 2
    assert len(_rows(model, tok, ["Anna Novak"], questions=home_only, neighbours=[]).forget) == 1  # 0: none
    with pytest.raises(ValueError, match="descriptions=3: at most 2"):
        _rows(model, tok, ["Anna Novak"], descriptions=3)
