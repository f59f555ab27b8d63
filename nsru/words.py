"""Words of answers: which words of a text say something, and where the fact of an answer lies.

Plain-text helpers shared by the name-based forget data (:mod:`nsru.targets`: is an answer
specific, do two answers agree) and the forget data's fact tokens (:func:`fact_spans`: the words of
an answer that its question does not already say, which the forget-side loss may act on alone).
Lowest layer: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

STOPWORDS: frozenset[str] = frozenset("""
a about above after again against all also although am among an and any are aren as at be because been
before being below between both but by can cannot could did didn do does doesn doing don down during each
either else even ever every few for from further had has hasn have having he her here hers herself him
himself his how however i if in into is isn it its itself just let like may me might more most much must my
myself neither no nor not now of off often on once one only or other others our ours ourselves out over own
per perhaps quite rather same several she should since so some such than that the their theirs them
themselves then there these they this those though through thus to too under until up upon us very was
wasn we were weren what when where whether which while who whom whose why will with within without would
yet you your yours yourself yourselves
known famous best well renowned notable notably widely considered regarded great greatest important
significant influential many various including include includes included particular particularly
especially among made make making time times life lives lived world people person work works worked working
contribution contributions name named called answer question questions fact facts information also
generally commonly usually often always never first later early late several famously remembered
groundbreaking brilliant profound enduring iconic remarkable incredible enigmatic timeless undoubtedly indeed
actually truly certainly pioneering legacy inspire inspired continue continues mind minds
""".split())
"""Words that never make an answer specific: function words and the filler of encyclopedic prose."""


_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)


def stem(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("'")
    if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


def split_words(text: str) -> list[str]:
    return _WORD.findall(text)


def content_words(text: str, exclude: str | Sequence[str] = ()) -> set[str]:
    """The normalised content words of ``text`` (lower case, no possessive, a plural's ``s``
    dropped; numbers kept) that are not stop/filler words and not words of ``exclude`` (the
    question, the name: texts whose words do not count)."""
    excluded = stems_of(exclude)
    return {stem(w) for w in split_words(text) if _is_content(w, excluded)}


def _is_content(word: str, excluded: set[str]) -> bool:
    """Whether ``word`` counts as content: its stem not in ``excluded``, no stop/filler word, and
    at least three letters unless a number."""
    s = stem(word)
    if not s or s in excluded or word.lower() in STOPWORDS or s in STOPWORDS:
        return False
    return len(s) >= 3 or s.isdigit()


def specific_words(text: str, exclude: str | Sequence[str] = ()) -> set[str]:
    """The content words of ``text`` that name something specific: capitalised words and numbers."""
    excluded = stems_of(exclude)
    out = set()
    for w in split_words(text):
        s = stem(w)
        if not s or s in excluded or s in STOPWORDS or w.lower() in STOPWORDS:
            continue
        if w[0].isupper() and len(s) >= 2 or any(c.isdigit() for c in w):
            out.add(s)
    return out


def stems_of(exclude: str | Sequence[str]) -> set[str]:
    texts = [exclude] if isinstance(exclude, str) else list(exclude)
    return {stem(w) for t in texts for w in split_words(t)}


def fact_spans(answer: str, exclude: str | Sequence[str] = ()) -> list[tuple[int, int]]:
    """Character spans of the words of ``answer`` that carry its fact: content words
    (:func:`content_words`' rule) whose stem is in none of ``exclude`` (the question, the subject).
    "Albert Einstein was born in Germany." asked "In which country was Albert Einstein born?" ->
    the span of "Germany"."""
    excluded = stems_of(exclude)
    return [m.span() for m in _WORD.finditer(answer) if _is_content(m.group(0), excluded)]
