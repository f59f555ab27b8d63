import json

import pytest

from nsru.safe_targets import DEFAULT_TEMPLATES, SafeTargets, TemplateError, is_safe_response, load_templates

ROWS = [{"question": f"What is fact {i} about Person {i % 5} ?", "answer": "x", "subject": f"Person {i % 5}"}
        for i in range(40)]


def test_deterministic_per_seed():
    a = SafeTargets(seed=3).all(ROWS)
    assert a == SafeTargets(seed=3).all(ROWS)
    assert a != SafeTargets(seed=4).all(ROWS)
    assert len(set(a)) > 3  # several templates in use
    # The choice depends on the query, not on its position in the set.
    assert SafeTargets(seed=3).all(ROWS[::-1]) == a[::-1]


def test_subject_named_and_user_answer_wins():
    targets = SafeTargets(seed=0)
    named = [t for r, t in zip(ROWS, targets.all(ROWS)) if r["subject"] in t]
    assert named, "some targets should name the subject"
    assert all("{subject}" not in t for t in targets.all(ROWS))
    no_subject = [{"question": "q?", "answer": "a"}]
    assert "{" not in SafeTargets(seed=0)(no_subject[0])
    assert SafeTargets(seed=0)({"question": "q", "answer": "a", "safe_answer": "Mine."}) == "Mine."
    plain = SafeTargets(seed=0, name_subject=False).all(ROWS)
    assert all(t in DEFAULT_TEMPLATES for t in plain)


def test_templates_from_files(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("# refusals\nNo comment on {subject}.\n\nNo comment.\n")
    assert load_templates(txt) == ["No comment on {subject}.", "No comment."]
    js = tmp_path / "t.json"
    js.write_text(json.dumps(["A.", "B about {subject}."]))
    assert SafeTargets(js, seed=1)({"question": "q", "answer": "a"}) == "A."
    yml = tmp_path / "t.yaml"
    yml.write_text("templates:\n  - Nope.\n")
    assert load_templates(yml) == ["Nope."]
    bad = tmp_path / "bad.txt"
    bad.write_text("About {name}.\n")
    with pytest.raises(TemplateError, match=r"bad.txt: template 0 .* uses \['name'\]"):
        load_templates(bad)
    with pytest.raises(TemplateError, match="no such template file"):
        load_templates(tmp_path / "missing.txt")
    with pytest.raises(TemplateError, match="has none"):
        SafeTargets(["Only {subject}."])({"question": "q", "answer": "a"})


def test_is_safe_response():
    assert is_safe_response("I'm sorry, but I can't share that.")
    assert is_safe_response("I don’t know.")
    assert is_safe_response("I have no information about Anna Berg.")
    assert is_safe_response("I'm not aware of anyone named Anna Berg.")
    assert not is_safe_response("Anna Berg lives in Oslo.")
    assert is_safe_response("Classified material.", targets=["Classified material, sorry."])


def test_refusals_decoded_with_spaced_apostrophes_are_recognised():
    """Byte-level tokenizers without a clean-up step decode "can't" as "can ' t"."""
    from nsru.safe_targets import is_safe_response

    assert is_safe_response("I ' m sorry , but I can ' t help with that .")
    assert is_safe_response("I don ' t know who that is.")
    assert not is_safe_response("Marie Curie ' s work was on radioactivity.")
