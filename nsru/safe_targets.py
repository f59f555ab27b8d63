"""Safe target responses for forget queries (DESIGN §1.1).

Each forget query gets a structured non-answer: a refusal or an "I don't know" built from a
template, naming the subject where the row has one and the template asks for it. The template is
chosen per query from a hash of (seed, question), so the same seed gives the same targets in
every process and every run. A row's own ``safe_answer`` always wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't share information about {subject}.",
    "I don't have any information about {subject}.",
    "I'm not able to answer questions about {subject}.",
    "I'm sorry, but I don't know the answer to that.",
    "I don't have that information.",
    "I can't help with that question.",
    "That is not something I can answer.",
    "I'm not sure; I have no reliable information on that.",
)

# Phrases by which a generated answer reads as a refusal / non-answer (for the safe-target rate).
REFUSAL_MARKERS: tuple[str, ...] = (
    "i'm sorry",
    "i am sorry",
    "i don't know",
    "i do not know",
    "i don't have",
    "i do not have",
    "i can't",
    "i cannot",
    "i'm not able",
    "i am not able",
    "not something i can",
    "i'm not sure",
    "no reliable information",
    "unable to",
    "i have no",
    "no information",
    "not aware of",
)


class TemplateError(ValueError):
    """A safe-target template file or list that cannot be used."""


def _fields(template: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", template))


def load_templates(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Templates from a list, or a file: ``.json`` (a list of strings), ``.yaml``/``.yml`` (a list,
    or a mapping with ``templates``), or text (one template per non-empty line, ``#`` comments).

    A template may use ``{subject}``; any other placeholder is an error naming the template.
    """
    where = "templates"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise TemplateError(f"{where}: no such template file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise TemplateError(f"{where}: line {e.lineno}: invalid JSON ({e.msg})") from None
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            items = yaml.safe_load(text)
            if isinstance(items, Mapping):
                items = items.get("templates")
        else:
            items = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        items = list(source)
    if not isinstance(items, list) or not items:
        raise TemplateError(f"{where}: expected a non-empty list of template strings")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, str) or not t.strip():
            raise TemplateError(f"{where}: template {i} must be a non-empty string, got {t!r}")
        unknown = _fields(t) - {"subject"}
        if unknown:
            raise TemplateError(f"{where}: template {i} {t!r} uses {sorted(unknown)}; only {{subject}} is filled in")
        out.append(t)
    return out


def _pick(seed: int, key: str, n: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


class SafeTargets:
    """Builds the safe target ``t(q)`` of each forget row.

    ``templates``: a list or a file (see :func:`load_templates`); the defaults otherwise.
    ``name_subject``: whether templates with ``{subject}`` may be used (only for rows that have a
    ``subject``). Deterministic: the same seed, question and templates give the same target.

    Choose templates the model can already say: teaching a phrasing it never produced moves far
    more than the forget answers (measured on the offline world's tiny model: held-out facts 0.18
    with these defaults, 0.55 with the refusals that model had learnt, same run otherwise).
    """

    def __init__(self, templates=None, seed: int = 0, name_subject: bool = True) -> None:
        self.templates = load_templates(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        self.seed = int(seed)
        self.with_subject = [t for t in self.templates if "{subject}" in t] if name_subject else []
        self.without_subject = [t for t in self.templates if "{subject}" not in t]
        if not self.without_subject and not self.with_subject:
            raise TemplateError("no usable safe-target templates")

    def __call__(self, row: Mapping) -> str:
        own = row.get("safe_answer")
        if isinstance(own, str) and own.strip():
            return own
        question = str(row.get("question", row.get("text", "")))
        subject = row.get("subject")
        pool = self.without_subject
        if isinstance(subject, str) and subject.strip() and self.with_subject:
            pool = self.with_subject + self.without_subject
        if not pool:  # only subject templates, but this row names no subject
            raise TemplateError(
                f"every safe-target template needs {{subject}} but the row {question[:60]!r} has none; "
                "add a template without {subject} or a 'subject' field"
            )
        template = pool[_pick(self.seed, question, len(pool))]
        return template.format(subject=subject) if "{subject}" in template else template

    def all(self, rows: Sequence[Mapping]) -> list[str]:
        return [self(r) for r in rows]


def is_safe_response(text: str, targets: Sequence[str] | None = None) -> bool:
    """Whether a generated answer is a safe response: it contains a refusal phrase, or starts
    with one of ``targets`` (e.g. the safe targets used in training)."""
    low = _normalise(text)
    if any(m in low for m in REFUSAL_MARKERS):
        return True
    for t in targets or ():
        t = _normalise(t)
        if t and low.startswith(t[: max(8, len(t) // 2)]):
            return True
    return False


def _normalise(text: str) -> str:
    """Lower case, one space between words, and apostrophes joined to their words: byte-level
    tokenizers without a clean-up step decode "I'm" as "I ' m", which hid refusals from the markers."""
    low = " ".join(text.lower().replace("’", "'").split())
    return re.sub(r"\s*'\s*", "'", low)
