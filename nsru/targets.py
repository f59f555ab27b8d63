"""Forget a name: forget and retain rows that the model itself supplies (the RWKU setting).

Most people who need a model to forget something have a name, not a dataset. :func:`target_rows`
turns names into question-answer rows:

1. **Kind.** Each target's kind of entity (one of :data:`KINDS`) is given, or read off the model's
   own answers to "Who or what is X?" and "What is X best known for?" by keywords
   (:func:`kind_from_text`; "person" when nothing matches).
2. **Questions.** The template bank (:data:`QUESTION_BANK`: questions about any person, plus
   questions per kind) gives pairs of a question and its paraphrase; with a chat template the model
   also writes questions about the target itself (:func:`parse_questions`; their second wording is
   the question inside :data:`SELF_PARAPHRASE`, as SmolLM2 answers rather than rephrases when asked
   to rephrase, so their samples carry the check).
3. **Answers.** The model's greedy answers to both wordings (the model before any adapter), cut to
   their first complete sentences (:func:`trim_answer`).
4. **Filter** (:func:`judge`). A fact is kept only when the greedy answer is *specific* (not a
   refusal per :func:`nsru.safe_targets.is_safe_response`, not a hedge, and naming a content word
   that is neither in the question nor part of the name) and *consistent*: at least half of the
   other answers (the greedy answer to the paraphrase and a few sampled answers to the question)
   state the same fact (:func:`consistent`: a shared capitalised word or number, two shared
   content words, or half of them). A small model makes up confident answers about a name it has
   never seen and repeats them under a paraphrase, but not from one sample to the next: on
   SmolLM2-135M-Instruct 32-59 % of sampled answers agreed for Einstein, Curie and Shakespeare,
   4-15 % for four made-up names, and no made-up fact passed. A target of which nothing is kept,
   or whose mean sample agreement (its *familiarity*) is too low, raises :class:`NothingToForget`:
   "the model gave no specific answer about X; nothing to forget".
5. **Neighbours** (the retain rows when the user has none): other entities of the same kind, asked
   the bank's questions and kept when specific and consistent (no sampling: a retain row keeps the
   model's behaviour, and a stable greedy answer is that behaviour). Their names are ``neighbours``
   when given; else the names the model gives when asked to list famous people of the kind
   ("List 6 famous scientists."), then a small built-in list per kind (:data:`BUILTIN_NEIGHBOURS`)
   to fill up. The report says where each neighbour came from. Retain rows whose answers name a
   target are dropped.

The generator sees nothing but the names (and ``neighbours``/``avoid`` when given): no evaluation
probe. Everything it produced is in :class:`TargetData`, whose :meth:`TargetData.write` puts
``forget.jsonl``, ``retain.jsonl`` and ``report.json`` into a folder the user can read and edit.

Statistics-data layer: imports :mod:`nsru.data`, :mod:`nsru.safe_targets`, :mod:`nsru.layer`
(``adapter_disabled``: the answers are the base model's) and the utilities only. Generation is plain
``model.generate`` on every process; under torch.distributed write the files from rank 0 only.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nsru.atomic import atomic_write
from nsru.data import has_chat_template, pad_encodings, pad_token_id, prompt_ids
from nsru.layer import adapter_disabled, model_device
from nsru.safe_targets import is_safe_response
from nsru.words import STOPWORDS, content_words, specific_words, split_words, stem
from nsru.self_samples import generate_texts

__all__ = [
    "KINDS", "QUESTION_BANK", "BUILTIN_NEIGHBOURS", "TargetData", "NothingToForget", "target_rows",
    "DESCRIPTION_PROMPTS", "greedy_answers", "sampled_answers", "kind_from_text", "trim_answer", "content_words", "specific_words",
    "consistent", "agrees", "agreement", "is_hedge", "judge", "parse_questions", "parse_names", "names_any",
]

KINDS: tuple[str, ...] = (
    "scientist", "writer", "musician", "artist", "politician", "athlete", "person",
    "place", "organisation", "work",
)
"""Kinds of entity the template bank knows; "person" is any other person."""

# (topic, question, paraphrase); "{name}" is the entity.
_PERSON: tuple[tuple[str, str, str], ...] = (
    ("known for", "What is {name} best known for?", "What is {name} most famous for?"),
    ("birthplace", "Where was {name} born?", "In which town or city was {name} born?"),
    ("nationality", "What was {name}'s nationality?", "Which country was {name} from?"),
    ("century", "In which century did {name} live?", "During which century was {name} alive?"),
    ("birth year", "In what year was {name} born?", "What is {name}'s year of birth?"),
    ("death place", "Where did {name} die?", "In which place did {name} pass away?"),
    ("profession", "What was {name}'s profession?", "What did {name} do for a living?"),
)

QUESTION_BANK: dict[str, tuple[tuple[str, str, str], ...]] = {
    "person": _PERSON,
    "scientist": _PERSON + (
        ("field", "Which field of science did {name} work in?", "What branch of science is {name} associated with?"),
        ("discovery", "What is {name}'s most famous discovery or theory?",
         "Which scientific idea is {name} remembered for?"),
        ("award", "What major award did {name} receive?", "Which prize was {name} awarded?"),
        ("institution", "At which university or institute did {name} work?",
         "Where did {name} do most of their research?"),
    ),
    "writer": _PERSON + (
        ("famous work", "What is {name}'s most famous work?", "Which book or play is {name} best known for?"),
        ("genre", "What kind of works did {name} write?", "Which literary forms did {name} write in?"),
        ("language", "In which language did {name} write?", "What language are {name}'s works written in?"),
        ("character", "Which famous character did {name} create?", "Name a well-known character created by {name}."),
    ),
    "musician": _PERSON + (
        ("famous work", "What is {name}'s most famous piece of music?",
         "Which composition or song is {name} best known for?"),
        ("instrument", "Which instrument did {name} play?", "What musical instrument is {name} associated with?"),
        ("style", "What style of music did {name} make?", "Which musical genre or period does {name} belong to?"),
    ),
    "artist": _PERSON + (
        ("famous work", "What is {name}'s most famous artwork?",
         "Which painting or sculpture is {name} best known for?"),
        ("movement", "Which art movement is {name} associated with?", "What artistic style did {name} work in?"),
        ("medium", "What did {name} mainly create: paintings, sculptures or something else?",
         "In which medium did {name} mostly work?"),
    ),
    "politician": _PERSON + (
        ("office", "What office did {name} hold?", "Which position of power did {name} have?"),
        ("country", "Which country did {name} lead or serve?", "For which nation was {name} a political figure?"),
        ("event", "Which historical event is {name} associated with?", "What major event in history involved {name}?"),
    ),
    "athlete": _PERSON + (
        ("sport", "Which sport did {name} play?", "In which sport did {name} compete?"),
        ("team", "Which team did {name} play for?", "What club or team is {name} associated with?"),
        ("titles", "What titles or records did {name} win?", "Which championships did {name} win?"),
    ),
    "place": (
        ("known for", "What is {name} best known for?", "What is {name} most famous for?"),
        ("country", "In which country is {name}?", "Which country is {name} located in?"),
        ("continent", "On which continent is {name}?", "Which continent is {name} part of?"),
        ("language", "What language do people speak in {name}?", "Which language is spoken in {name}?"),
        ("landmark", "What is a famous landmark in {name}?", "Which well-known sight can visitors see in {name}?"),
    ),
    "organisation": (
        ("known for", "What is {name} best known for?", "What is {name} most famous for?"),
        ("founded", "When was {name} founded?", "In what year was {name} established?"),
        ("founder", "Who founded {name}?", "Who started {name}?"),
        ("headquarters", "Where is {name} based?", "Where are the headquarters of {name}?"),
        ("activity", "What does {name} do?", "What kind of organisation is {name}?"),
    ),
    "work": (
        ("known for", "What is {name} best known for?", "What is {name} most famous for?"),
        ("creator", "Who created {name}?", "Who is the author or maker of {name}?"),
        ("year", "When was {name} made or published?", "In what year did {name} first appear?"),
        ("genre", "What kind of work is {name}?", "What genre does {name} belong to?"),
        ("character", "Who is the main character of {name}?", "Who is the protagonist of {name}?"),
    ),
}
"""Question templates per kind: ``(topic, question, paraphrase)`` with ``{name}`` for the entity."""

BUILTIN_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "scientist": ("Nikola Tesla", "Johannes Kepler", "Louis Pasteur", "Alan Turing", "Dmitri Mendeleev",
                  "Richard Feynman", "Enrico Fermi", "Ernest Rutherford"),
    "writer": ("Jane Austen", "Mark Twain", "Leo Tolstoy", "Victor Hugo", "Miguel de Cervantes",
               "Edgar Allan Poe", "Virginia Woolf", "Homer"),
    "musician": ("Johann Sebastian Bach", "Frederic Chopin", "Elvis Presley", "Franz Schubert",
                 "Pyotr Ilyich Tchaikovsky", "Antonio Vivaldi"),
    "artist": ("Vincent van Gogh", "Michelangelo", "Rembrandt", "Claude Monet", "Salvador Dali", "Frida Kahlo"),
    "politician": ("Winston Churchill", "Julius Caesar", "Nelson Mandela", "Queen Victoria", "Mahatma Gandhi",
                   "Thomas Jefferson"),
    "athlete": ("Muhammad Ali", "Pele", "Michael Jordan", "Usain Bolt", "Serena Williams", "Babe Ruth"),
    "person": ("Christopher Columbus", "Cleopatra", "Marco Polo", "Joan of Arc", "Confucius", "Florence Nightingale"),
    "place": ("Paris", "Tokyo", "Cairo", "Sydney", "Moscow", "Rio de Janeiro"),
    "organisation": ("the United Nations", "the Red Cross", "NASA", "Microsoft", "Oxford University", "UNESCO"),
    "work": ("Don Quixote", "The Odyssey", "War and Peace", "Pride and Prejudice", "The Divine Comedy", "Moby-Dick"),
}
"""Fallback neighbours per kind, used only when the model names none it knows. They leave out the
entities of the real-model scenario (``nsru/bench/data/real_facts.json``), whose facts are evaluated."""

_PLURAL = {
    "scientist": "scientists", "writer": "writers", "musician": "composers or musicians",
    "artist": "painters or artists", "politician": "political leaders", "athlete": "athletes",
    "person": "historical figures", "place": "places", "organisation": "organisations", "work": "works",
}

# kind -> words whose presence in the model's description votes for it
_KIND_WORDS: dict[str, tuple[str, ...]] = {
    "scientist": ("physicist", "physics", "scientist", "science", "scientific", "chemist", "chemistry", "biologist",
                  "biology", "mathematician", "mathematics", "astronomer", "astronomy", "relativity", "quantum",
                  "inventor", "invented", "engineer", "naturalist", "evolution", "theory", "discovery", "experiments"),
    "writer": ("writer", "author", "playwright", "poet", "poetry", "poems", "novelist", "novels", "plays",
               "literature", "literary", "sonnets", "books", "wrote", "dramatist"),
    "musician": ("composer", "musician", "music", "musical", "singer", "symphony", "symphonies", "songs", "opera",
                 "pianist", "violinist", "band", "album", "concertos"),
    "artist": ("painter", "painting", "paintings", "artist", "sculptor", "sculpture", "sculptures", "artwork",
               "portrait", "frescoes"),
    "politician": ("president", "politician", "king", "queen", "emperor", "minister", "leader", "statesman",
                   "ruler", "political", "general", "military", "revolution", "dictator", "chancellor"),
    "athlete": ("athlete", "football", "soccer", "basketball", "tennis", "olympic", "olympics", "player", "sport",
                "sports", "boxer", "boxing", "champion", "cricket", "baseball"),
}
# "X is a ... <noun>" in the description: not a person
_THING_NOUNS: dict[str, tuple[str, ...]] = {
    "place": ("city", "country", "capital", "river", "mountain", "island", "town", "village", "region",
              "state", "province", "continent", "lake", "sea", "desert"),
    "organisation": ("company", "organization", "organisation", "corporation", "agency", "institution",
                     "university", "charity", "party", "club", "band"),
    "work": ("novel", "film", "movie", "book", "play", "song", "album", "painting", "poem", "opera",
             "series", "symphony", "game", "show", "sculpture", "tragedy", "comedy"),
}

KIND_PROMPTS: tuple[str, ...] = ("Who or what is {name}?", "What is {name} best known for?")
"""What the model is asked to find a target's kind (the second is also a bank question)."""

SELF_QUESTIONS_PROMPT = "Write {n} short questions about facts of {name}'s life and work, one per line."
SELF_PARAPHRASE = "Please answer this question about {name}: {question}"
NEIGHBOURS_PROMPT = "List {n} famous {plural}."
# Open requests whose answer is a paragraph about the target: one row then carries many facts.
DESCRIPTION_PROMPTS: tuple[str, ...] = ("Tell me about {name}.", "Write a short biography of {name}.")

# answers that say the model does not know, beyond the refusal markers of nsru.safe_targets
HEDGES: tuple[str, ...] = (
    "no record", "no records", "not widely known", "not well known", "not well-known", "not familiar",
    "does not appear", "doesn't appear", "is unknown", "are unknown", "remains unknown", "not known",
    "unclear", "topic of debate", "there is no information", "not a real", "not documented",
    "no specific", "no known", "i couldn't find", "i could not find", "not publicly",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”')\]]?\s+(?=[\"“(\[]?[A-Z0-9])")


class NothingToForget(ValueError):
    """A target about which the model gave no specific, consistent answer.

    ``targets``: the names concerned; ``data``: the :class:`TargetData` of everything generated
    (its report says what was asked and why each answer was dropped), so nothing is lost.
    """

    def __init__(self, message: str, targets: Sequence[str], data: TargetData) -> None:
        super().__init__(message)
        self.targets = list(targets)
        self.data = data


@dataclass
class TargetData:
    """What :func:`target_rows` generated.

    ``forget``: question-answer rows about the targets (``question``, ``answer`` = the model's greedy
    answer, ``paraphrased_answer`` = its answer to the paraphrased question, ``subject`` = the
    target, and ``paraphrased_question``, ``topic``, ``source`` = ``"bank"`` or ``"model"``).
    ``retain``: the same about the neighbours (``subject`` = the neighbour, ``neighbour_of`` = the
    target). ``report``: per target and per neighbour, the kind, what was asked, kept and dropped
    (with the reason), plus the settings and the seconds it took.
    """

    forget: list[dict]
    retain: list[dict]
    report: dict = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        """The targets (the names to keep out of every other data, e.g. the statistics)."""
        return list(self.report.get("targets", {}))

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``forget.jsonl``, ``retain.jsonl`` (one row a line, UTF-8) and ``report.json`` into
        ``folder`` (created), each atomically; returns their paths by name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"forget": folder / "forget.jsonl", "retain": folder / "retain.jsonl", "report": folder / "report.json"}

        def jsonl(rows):
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

        for key, text in (("forget", jsonl(self.forget)), ("retain", jsonl(self.retain)),
                          ("report", json.dumps(self.report, indent=1, ensure_ascii=False) + "\n")):
            atomic_write(paths[key], lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        return paths


# --------------------------------------------------------------------------------------------
# text: words, answers, agreement


def trim_answer(text: str, max_sentences: int = 2) -> str:
    """A generated answer cut to its first paragraph and its first ``max_sentences`` complete
    sentences (an unfinished last sentence is dropped when a complete one comes before it)."""
    text = text.strip()
    text = re.split(r"\n\s*\n|\nQuestion:", text, maxsplit=1)[0].strip()
    text = " ".join(text.split())
    sentences = _SENTENCE_END.split(text)
    kept = sentences[:max_sentences]
    if len(kept) > 1 and not re.search(r"[.!?][\"”')\]]?$", kept[-1]):
        kept = kept[:-1]
    elif len(kept) == 1 and len(sentences) == 1 and not re.search(r"[.!?][\"”')\]]?$", kept[0]):
        # one unfinished sentence: keep it up to its last clause
        cut = max(kept[0].rfind(","), kept[0].rfind(";"))
        if cut > len(kept[0]) // 2:
            kept = [kept[0][:cut]]
    return " ".join(kept).strip()


def is_hedge(text: str) -> bool:
    """Whether an answer says, in other words than a refusal, that the model does not know."""
    low = " ".join(text.lower().replace("’", "'").split())
    return any(h in low for h in HEDGES)


def consistent(answer: str, other: str, exclude: str | Sequence[str] = (), min_overlap: float = 0.5) -> bool:
    """Whether two answers (to two wordings of one question, or two samples) state the same fact.

    They do when they share a specific word (:func:`specific_words`: a capitalised word or a
    number), or two content words (:func:`content_words`), or when the overlap coefficient of their
    content words, ``|A ∩ B| / min(|A|, |B|)``, reaches ``min_overlap``. Words of ``exclude`` (the
    questions and the name) do not count. (Chosen on SmolLM2's answers about three famous and three
    made-up names: two shared content words kept 2 more of Shakespeare's 11 facts and none more of
    the made-up names'; an overlap of 0.25 alone let a made-up fact through.)
    """
    sa, sb = specific_words(answer, exclude), specific_words(other, exclude)
    if sa & sb:
        return True
    ca, cb = content_words(answer, exclude), content_words(other, exclude)
    if not ca or not cb:
        return False
    shared = len(ca & cb)
    return shared >= 2 or shared / min(len(ca), len(cb)) >= min_overlap


def agrees(answer: str, other: str, exclude: str | Sequence[str] = (), min_overlap: float = 0.5) -> bool:
    """Whether ``other`` (the answer to a paraphrase, or a sampled answer) backs ``answer``: both say
    something (neither a refusal nor a hedge) and :func:`consistent` finds them stating one fact."""
    said = [t for t in (answer, other) if t.strip() and not is_safe_response(t) and not is_hedge(t)]
    return len(said) == 2 and consistent(answer, other, exclude, min_overlap=min_overlap)


def agreement(answer: str, others: Sequence[str], exclude: str | Sequence[str] = (),
              min_overlap: float = 0.5) -> float:
    """The fraction of ``others`` that :func:`agrees` with ``answer`` (0 without others)."""
    return sum(agrees(answer, o, exclude, min_overlap) for o in others) / len(others) if others else 0.0


def judge(name: str, question: str, answer: str, paraphrase: str, paraphrase_answer: str,
          samples: Sequence[str] = (), *, min_agreement: float = 0.5, min_overlap: float = 0.5) -> str | None:
    """Why the greedy ``answer`` to ``question`` about ``name`` is not kept as a fact, or ``None``.

    Reasons: ``"empty"``; ``"refusal"`` (:func:`nsru.safe_targets.is_safe_response`); ``"hedge"``
    (:data:`HEDGES`); ``"not specific"`` (no content word outside both questions and the name);
    ``"inconsistent"``: fewer than ``min_agreement`` of the other answers (the answer to the
    ``paraphrase``, then the ``samples``) agree with it (:func:`agreement`). Without samples the
    paraphrase's answer alone decides.
    """
    exclude = (question, paraphrase, name)
    if not answer.strip():
        return "empty"
    if is_safe_response(answer):
        return "refusal"
    if is_hedge(answer):
        return "hedge"
    if not content_words(answer, exclude):
        return "not specific"
    if agreement(answer, [paraphrase_answer, *samples], exclude, min_overlap) < min_agreement:
        return "inconsistent"
    return None


def names_any(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` names any of ``names`` (the full name, or its last word when longer than 3
    letters), as a whole word, in any case."""
    for name in names:
        parts = {name.strip()}
        last = name.strip().split()[-1] if name.strip() else ""
        if len(last) > 3:
            parts.add(last)
        if any(re.search(rf"\b{re.escape(p)}\b", text, flags=re.IGNORECASE) for p in parts if p):
            return True
    return False


def kind_from_text(text: str) -> str:
    """The kind (:data:`KINDS`) a description of an entity points at: "X is a city/novel/company…"
    gives a place, work or organisation; otherwise the person kind with the most keyword hits;
    "person" when none hits."""
    low = text.lower()
    first = _SENTENCE_END.split(" ".join(low.split()))[0]
    for kind, nouns in _THING_NOUNS.items():
        m = re.search(r"\b(?:is|was) (?:a|an|the)\b(?:[\s,]+[\w-]+){0,5}?[\s,]+(" + "|".join(nouns) + r")\b", first)
        if m and not re.search(r"\b(?:is|was) (?:a|an|the)\b(?:[\s,]+[\w-]+){0,5}?[\s,]+(?:man|woman|person|"
                               r"figure|character|physicist|scientist|writer|author|poet|playwright|composer|painter|"
                               r"artist|leader|player|politician|king|queen)\b", first[:m.start(1)] + " "):
            return kind
    words = Counter(stem(w) for w in split_words(low))
    scores = {k: sum(words[stem(w)] for w in kw) for k, kw in _KIND_WORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else "person"


_QUESTION_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)]|Q\d*[:.)])?\s*(.+?\?)\s*$")


def parse_questions(text: str, name: str) -> list[str]:
    """Questions one per line in a generated text (numbering and bullets removed) that name the
    target (the full name or its last word)."""
    out = []
    for line in text.splitlines():
        m = _QUESTION_LINE.match(line)
        if not m:
            continue
        q = " ".join(m.group(1).split())
        if names_any(q, [name]) and q not in out and len(q) < 200:
            out.append(q)
    return out


_NAME = re.compile(r"\b[A-Z][\w'’.-]+"
                   r"(?:[ \t]+(?:(?:van|von|da|de|di|du|der|del|la|le|of|the)[ \t]+)*[A-Z][\w'’.-]+){0,3}")


def parse_names(text: str, exclude: Sequence[str] = ()) -> list[str]:
    """Names (runs of capitalised words on one line, "van"/"da"/"of"... allowed inside) in a generated
    list, without duplicates and without any that names one of ``exclude`` (:func:`names_any`)."""
    out: list[str] = []
    for m in _NAME.finditer(text):
        name = re.sub(r"^(?:Sir|Dame|Lord|Lady|Dr\.?|Saint|St\.)\s+", "", m.group(0).strip(" .,'’"))
        words = name.split()
        if len(words) < 2 and len(name) < 4:
            continue
        if words[0].lower() in STOPWORDS or names_any(name, exclude):
            continue
        if any(n.lower() == name.lower() for n in out):
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def _generate(model: nn.Module, tokenizer, questions: Sequence[str], *, n: int, sample: bool, temperature: float,
              top_p: float, seed: int, batch_size: int, max_new_tokens: int, progress: bool,
              desc: str) -> list[list[str]]:
    """``n`` answers per question (greedy: ``n`` must be 1), left-padded batches, adapters disabled."""
    if not questions:
        return []
    encoded = [prompt_ids(tokenizer, q) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if eos is not None:
        settings["eos_token_id"] = eos
    per_batch = max(1, batch_size // n)
    out: list[list[str]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, unit="question", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), adapter_disabled(model):
            torch.manual_seed(seed)
            for lo in range(0, len(order), per_batch):
                chunk = order[lo:lo + per_batch]
                batch = pad_encodings([{"input_ids": encoded[i]} for i in chunk], pad, padding_side="left")
                texts = generate_texts(model, tokenizer, batch, device, "answering questions about the targets",
                                       max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                                       **settings)
                for j, i in enumerate(chunk):
                    out[i] = [t.strip() for t in texts[j * n:(j + 1) * n]]
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return out


def greedy_answers(model: nn.Module, tokenizer, questions: Sequence[str], *, batch_size: int = 16,
                   max_new_tokens: int = 48, progress: bool = False, desc: str = "target questions") -> list[str]:
    """The model's greedy answers to ``questions``, each asked as :func:`nsru.data.prompt_ids` renders
    it (the chat template when the tokenizer has one), in left-padded batches, adapters disabled
    (the model before unlearning). Texts come back stripped, not trimmed."""
    got = _generate(model, tokenizer, list(questions), n=1, sample=False, temperature=1.0, top_p=1.0, seed=0,
                    batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    return [g[0] for g in got]


def sampled_answers(model: nn.Module, tokenizer, questions: Sequence[str], n: int, *, temperature: float = 0.7,
                    top_p: float = 0.9, seed: int = 0, batch_size: int = 16, max_new_tokens: int = 48,
                    progress: bool = False, desc: str = "samples") -> list[list[str]]:
    """``n`` sampled answers per question (seeded; the caller's random state is left alone), asked
    as :func:`greedy_answers` asks them."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return _generate(model, tokenizer, list(questions), n=n, sample=True, temperature=temperature, top_p=top_p,
                     seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=desc)


class _Asker:
    """Asks questions in batched passes and remembers every answer (each question is asked once)."""

    def __init__(self, model, tokenizer, batch_size, max_new_tokens, progress, temperature, seed):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        self.temperature, self.seed = temperature, seed
        self.greedy: dict[tuple[str, int], str] = {}
        self.sampled: dict[str, list[str]] = {}
        self.count = 0  # generated answers

    def ask(self, questions: Sequence[str], desc: str, max_new_tokens: int | None = None) -> list[str]:
        length = max_new_tokens or self.max_new_tokens
        todo = [q for q in dict.fromkeys(questions) if (q, length) not in self.greedy]
        if todo:
            got = greedy_answers(self.model, self.tokenizer, todo, batch_size=self.batch_size, max_new_tokens=length,
                                 progress=self.progress, desc=desc)
            self.greedy.update({(q, length): a for q, a in zip(todo, got)})
            self.count += len(todo)
        return [self.greedy[(q, length)] for q in questions]

    def sample(self, questions: Sequence[str], n: int, desc: str) -> list[list[str]]:
        todo = [q for q in dict.fromkeys(questions) if q not in self.sampled]
        if todo and n > 0:
            got = sampled_answers(self.model, self.tokenizer, todo, n, temperature=self.temperature, seed=self.seed,
                                  batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                                  progress=self.progress, desc=desc)
            self.sampled.update(zip(todo, got))
            self.count += n * len(todo)
        return [self.sampled.get(q, []) for q in questions]


# --------------------------------------------------------------------------------------------
# the pipeline


def _check_names(names, what: str) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list of names, not one string ({names!r}); write [{names!r}]")
    out = []
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{what}: every name must be a non-empty string, got {n!r}")
        n = " ".join(n.split())
        if n not in out:
            out.append(n)
    return out


def _bank(questions: Mapping | None, kind: str | None) -> Mapping:
    """The template bank (``questions``, else :data:`QUESTION_BANK`), checked, with ``kind`` in it."""
    bank = dict(questions) if questions is not None else QUESTION_BANK
    _check_bank(bank)
    if kind is not None and kind not in bank:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(bank)}")
    return bank


def _check_bank(bank: Mapping) -> None:
    if not isinstance(bank, Mapping) or not bank:
        raise ValueError("questions must map a kind to a list of (topic, question, paraphrase) templates")
    for k, pairs in bank.items():
        if not pairs:
            raise ValueError(f"questions[{k!r}] is empty")
        for entry in pairs:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(x, str) for x in entry)):
                raise ValueError(f"questions[{k!r}]: each entry must be (topic, question, paraphrase), got {entry!r}")
            if "{name}" not in entry[1] or "{name}" not in entry[2]:
                raise ValueError(f"questions[{k!r}]: {entry!r} must use {{name}} in the question and the paraphrase")


def _pairs(name: str, kind: str, bank: Mapping[str, Sequence[tuple[str, str, str]]], limit: int,
           seed: int) -> list[tuple[str, str, str]]:
    templates = list(bank.get(kind) or bank.get("person") or next(iter(bank.values())))
    if len(templates) > limit:
        rng = random.Random(f"{seed}\x00{name}")
        templates = [templates[i] for i in sorted(rng.sample(range(len(templates)), limit))]
    return [(topic, q.format(name=name), p.format(name=name)) for topic, q, p in templates]


def _infer_kinds(asker: _Asker, names: Sequence[str]) -> dict[str, dict]:
    prompts = {n: [p.format(name=n) for p in KIND_PROMPTS] for n in names}
    answers = asker.ask([q for n in names for q in prompts[n]], desc="kinds")
    out, i = {}, 0
    for n in names:
        texts = [trim_answer(t) for t in answers[i:i + len(KIND_PROMPTS)]]
        i += len(KIND_PROMPTS)
        kind = kind_from_text(texts[0])  # "Who or what is X?" first: "X is a city" beats keyword counts
        if kind == "person":
            kind = kind_from_text(" ".join(texts))
        out[n] = {"kind": kind, "from": dict(zip(prompts[n], texts))}
    return out


def _self_questions(asker: _Asker, names: Sequence[str], n: int) -> dict[str, list[tuple[str, str, str]]]:
    """Questions the model writes about each name (chat models only), each with a second wording
    (:data:`SELF_PARAPHRASE`): the model is poor at rephrasing, so their samples carry the check."""
    if n <= 0 or not has_chat_template(asker.tokenizer):
        return {name: [] for name in names}
    prompts = [SELF_QUESTIONS_PROMPT.format(n=n, name=name) for name in names]
    texts = asker.ask(prompts, desc="self-written questions", max_new_tokens=max(24 * n, asker.max_new_tokens))
    return {name: [("self-written", q, SELF_PARAPHRASE.format(name=name, question=q))
                   for q in parse_questions(t, name)[:n]] for name, t in zip(names, texts)}


def _facts(asker: _Asker, plan: Mapping[str, Sequence[tuple[str, str, str]]], desc: str, samples: int,
           min_agreement: float, min_overlap: float) -> dict[str, list[dict]]:
    """Ask every question and paraphrase of ``plan`` (name -> (topic, question, paraphrase)), sample
    ``samples`` more answers to each question, and :func:`judge` each fact."""
    questions = [x for pairs in plan.values() for _, q, p in pairs for x in (q, p)]
    answered = dict(zip(questions, asker.ask(questions, desc=desc)))
    firsts = [q for pairs in plan.values() for _, q, _ in pairs]
    sampled = dict(zip(firsts, asker.sample(firsts, samples, desc=desc + " (samples)")))
    out = {}
    for name, pairs in plan.items():
        items = []
        for topic, q, p in pairs:
            a, b = trim_answer(answered[q]), trim_answer(answered[p])
            drawn = [trim_answer(s) for s in sampled[q]]
            exclude = (q, p, name)
            item = {"topic": topic, "source": "model" if topic == "self-written" else "bank", "question": q,
                    "answer": a, "paraphrased_question": p, "paraphrased_answer": b,
                    "paraphrase_agrees": agrees(a, b, exclude, min_overlap)}
            if samples > 0:
                item.update(samples=drawn, sample_agreement=round(agreement(a, drawn, exclude, min_overlap), 3))
            reason = judge(name, q, a, p, b, drawn, min_agreement=min_agreement, min_overlap=min_overlap)
            item.update(kept=reason is None, reason=reason)
            items.append(item)
        out[name] = items
    return out


def _row(item: Mapping, subject: str, **extra) -> dict:
    row = {"question": item["question"], "answer": item["answer"], "paraphrased_answer": item["paraphrased_answer"],
           "subject": subject, "paraphrased_question": item["paraphrased_question"], "topic": item["topic"],
           "source": item["source"]}
    row.update(extra)
    return row


def _summary(items: Sequence[Mapping]) -> dict:
    dropped = Counter(i["reason"] for i in items if not i["kept"])
    out = {"asked": len(items), "kept": sum(1 for i in items if i["kept"]), "dropped": dict(sorted(dropped.items()))}
    agreements = [i["sample_agreement"] for i in items if "sample_agreement" in i]
    if agreements:
        out["familiarity"] = round(sum(agreements) / len(agreements), 3)
    return out


def _names_target(text: str, own: str, targets: Sequence[str]) -> bool:
    """Whether ``text`` about ``own`` names a target; ``own``'s name itself does not count (a
    neighbour may share a target's last name)."""
    return names_any(re.sub(re.escape(own), " ", text, flags=re.IGNORECASE), targets)


def target_rows(
    model: nn.Module,
    tokenizer,
    targets: Sequence[str],
    *,
    kind: str | None = None,
    questions_per_target: int = 12,
    self_questions: int = 3,
    descriptions: int = 0,
    samples: int = 4,
    temperature: float = 0.7,
    min_agreement: float = 0.5,
    min_familiarity: float = 0.25,
    neighbours: Sequence[str] | None = None,
    neighbours_per_target: int = 3,
    questions_per_neighbour: int = 6,
    avoid: Sequence[str] = (),
    questions: Mapping[str, Sequence[tuple[str, str, str]]] | None = None,
    min_overlap: float = 0.5,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> TargetData:
    """Forget rows about ``targets`` and retain rows about their neighbours, from the model itself.

    ``kind``: one of :data:`KINDS` for every target (and given neighbour); ``None`` asks the model
    (:func:`kind_from_text`). ``questions_per_target``: at most this many template pairs per target
    (a seeded choice when its kind has more); ``self_questions``: how many questions the model
    writes itself per target (chat models only; 0: none). ``descriptions``: how many of
    :data:`DESCRIPTION_PROMPTS` ("Tell me about X.") each known target also gets as a forget row
    whose answer is the model's greedy paragraph (up to four sentences), kept when it is specific and
    states one of the target's kept facts (:func:`consistent` with a kept answer): one row that
    carries many facts, so suppressing it reaches facts no question asked.

    A target's fact is kept when :func:`judge` finds the greedy answer specific and at least
    ``min_agreement`` of the other answers agree with it: the greedy answer to the paraphrase and
    ``samples`` sampled answers to the question (``temperature``, top-p 0.9, ``seed``). A target
    whose mean sample agreement (its *familiarity*) is under ``min_familiarity`` counts as unknown
    even when a fact passed (SmolLM2-135M-Instruct, 4 samples at 0.7: 0.32-0.59 for Einstein, Curie
    and Shakespeare, 0.04-0.15 for four made-up names). ``samples=0``: the paraphrase's answer
    alone decides, and there is no familiarity.

    ``neighbours``: names for the retain rows, or ``None`` to find ``neighbours_per_target`` per
    target: the names the model lists when asked for famous people of the target's kind, then
    :data:`BUILTIN_NEIGHBOURS`; ``[]``: no retain rows. Each neighbour is asked
    ``questions_per_neighbour`` questions, filtered by :func:`judge` without sampling (retain rows
    keep the model's behaviour, so a stable greedy answer is enough); rows that name a target are
    dropped. ``avoid``: names never used as neighbours (e.g. the entities you evaluate on).
    ``questions``: a template bank replacing :data:`QUESTION_BANK` (kind -> ``(topic, question,
    paraphrase)`` with ``{name}``); ``min_overlap``: see :func:`consistent`.

    Raises :class:`NothingToForget` (a ``ValueError``) naming every target the model does not know:
    "the model gave no specific answer about X; nothing to forget"; its ``data`` holds what was
    generated, the retain rows included.
    """
    start = time.perf_counter()
    targets = _check_names(targets, "targets")
    if not targets:
        raise ValueError("targets: give at least one name to forget")
    bank = _bank(questions, kind)
    for label, value in (("questions_per_target", questions_per_target),
                         ("questions_per_neighbour", questions_per_neighbour)):
        if value < 1:
            raise ValueError(f"{label} must be at least 1, got {value}")
    if samples < 0 or self_questions < 0 or neighbours_per_target < 0 or descriptions < 0:
        raise ValueError("samples, self_questions, descriptions and neighbours_per_target must not be negative")
    if descriptions > len(DESCRIPTION_PROMPTS):
        raise ValueError(f"descriptions={descriptions}: at most {len(DESCRIPTION_PROMPTS)} (DESCRIPTION_PROMPTS)")
    if not 0.0 <= min_agreement <= 1.0 or not 0.0 <= min_familiarity <= 1.0:
        raise ValueError("min_agreement and min_familiarity are fractions between 0 and 1")
    given_neighbours = None if neighbours is None else _check_names(neighbours, "neighbours")
    avoid = _check_names(avoid, "avoid")
    asker = _Asker(model, tokenizer, batch_size, max_new_tokens, progress, temperature, seed)

    # 1. kinds
    kinds = {t: {"kind": kind, "from": "given"} for t in targets} if kind else _infer_kinds(asker, targets)

    # 2-4. questions, answers, the filter
    plan = {t: _pairs(t, kinds[t]["kind"], bank, questions_per_target, seed) for t in targets}
    written = _self_questions(asker, targets, self_questions)
    for t in targets:
        plan[t] = plan[t] + written[t]
    facts = _facts(asker, plan, "target questions", samples, min_agreement, min_overlap)
    report: dict = {"targets": {}}
    unknown = []
    for t in targets:
        summary = _summary(facts[t])
        if summary["kept"] and samples and summary["familiarity"] < min_familiarity:
            for item in facts[t]:
                if item["kept"]:
                    item["kept"], item["reason"] = False, "unfamiliar target"
            summary = _summary(facts[t])
        if not summary["kept"]:
            unknown.append(t)
        report["targets"][t] = {"kind": kinds[t]["kind"], "kind_from": kinds[t]["from"], **summary,
                                "self_written": len(written[t]), "questions": facts[t]}
    forget = [_row(i, t) for t in targets for i in facts[t] if i["kept"]]
    if descriptions:
        described = _descriptions(asker, [t for t in targets if t not in unknown], facts, descriptions)
        for t, items in described.items():
            report["targets"][t]["descriptions"] = items
            forget += [_row(i, t) for i in items if i["kept"]]

    # 5. neighbours
    retain, report["neighbours"] = _neighbour_rows(
        asker, [t for t in targets if t not in unknown], kinds, kind=kind, given=given_neighbours,
        per_target=neighbours_per_target, questions_per_neighbour=questions_per_neighbour, avoid=avoid, bank=bank,
        min_agreement=min_agreement, min_overlap=min_overlap, seed=seed, exclude=targets)
    report["settings"] = {
        "kind": kind, "questions_per_target": questions_per_target, "self_questions": self_questions,
        "descriptions": descriptions,
        "samples": samples, "temperature": temperature, "min_agreement": min_agreement,
        "min_familiarity": min_familiarity, "neighbours": given_neighbours,
        "neighbours_per_target": neighbours_per_target, "questions_per_neighbour": questions_per_neighbour,
        "avoid": avoid, "custom_questions": questions is not None, "min_overlap": min_overlap, "seed": seed,
        "max_new_tokens": max_new_tokens,
    }
    report["generated_answers"] = asker.count
    report["seconds"] = round(time.perf_counter() - start, 2)
    data = TargetData(forget=forget, retain=retain, report=report)
    if unknown:
        raise NothingToForget("; ".join(_unknown_message(t, report["targets"][t], min_familiarity) for t in unknown),
                              unknown, data)
    return data


def neighbour_rows(
    model: nn.Module,
    tokenizer,
    subjects: Sequence[str],
    *,
    kind: str | None = None,
    neighbours: Sequence[str] | None = None,
    neighbours_per_target: int = 3,
    questions_per_neighbour: int = 6,
    avoid: Sequence[str] = (),
    questions: Mapping[str, Sequence[tuple[str, str, str]]] | None = None,
    min_overlap: float = 0.5,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> TargetData:
    """The model's own answers about other entities of the same kind as ``subjects``: step 5 of
    :func:`target_rows` alone, for subjects whose forget rows are given (the ``"neighbours"``
    statistics source of :func:`nsru.unlearn`). Same keywords as there; the kinds of ``subjects``
    are asked of the model unless ``kind`` is given. Returns :class:`TargetData` with the rows in
    ``retain`` and no ``forget`` rows; rows that name a subject are dropped."""
    start = time.perf_counter()
    subjects = _check_names(subjects, "subjects")
    bank = _bank(questions, kind)
    if questions_per_neighbour < 1 or neighbours_per_target < 0:
        raise ValueError(f"questions_per_neighbour must be at least 1 and neighbours_per_target not negative, got "
                         f"{questions_per_neighbour} and {neighbours_per_target}")
    given = None if neighbours is None else _check_names(neighbours, "neighbours")
    asker = _Asker(model, tokenizer, batch_size, max_new_tokens, progress, 0.0, seed)
    kinds = {t: {"kind": kind, "from": "given"} for t in subjects} if kind else _infer_kinds(asker, subjects)
    retain, found = _neighbour_rows(asker, subjects, kinds, kind=kind, given=given, per_target=neighbours_per_target,
                                    questions_per_neighbour=questions_per_neighbour,
                                    avoid=_check_names(avoid, "avoid"), bank=bank, min_agreement=0.5,
                                    min_overlap=min_overlap, seed=seed, exclude=subjects)
    report = {"subjects": {t: kinds[t] for t in subjects}, "neighbours": found, "generated_answers": asker.count,
              "seconds": round(time.perf_counter() - start, 2)}
    return TargetData(forget=[], retain=retain, report=report)


def _neighbour_rows(asker: _Asker, targets: Sequence[str], kinds: Mapping[str, Mapping], *, kind: str | None,
                    given: Sequence[str] | None, per_target: int, questions_per_neighbour: int, avoid: Sequence[str],
                    bank: Mapping, min_agreement: float, min_overlap: float, seed: int,
                    exclude: Sequence[str]) -> tuple[list[dict], dict]:
    """Retain rows about the neighbours of ``targets`` (found, or ``given``) and the report per
    neighbour; rows whose answers name one of ``exclude`` are dropped."""
    if given is None:
        chosen = _find_neighbours(asker, targets, kinds, per_target, [*avoid, *exclude], seed)
    else:
        chosen = [(n, "given", None, None) for n in given if n not in exclude and n not in avoid]
    retain: list[dict] = []
    report: dict = {}
    if not chosen:
        return retain, report
    nkinds = ({n: {"kind": kind, "from": "given"} for n, *_ in chosen} if kind else
              _infer_kinds(asker, [n for n, _, k, _ in chosen if k is None]))
    for n, _, k, _ in chosen:
        if k is not None:
            nkinds[n] = {"kind": k, "from": "the target's kind"}
    nplan = {n: _pairs(n, nkinds[n]["kind"], bank, questions_per_neighbour, seed) for n, *_ in chosen}
    nfacts = _facts(asker, nplan, "neighbour questions", 0, min_agreement, min_overlap)
    for n, source, _, of in chosen:
        for item in nfacts[n]:
            if item["kept"] and _names_target(item["answer"] + " " + item["paraphrased_answer"], n, exclude):
                item["kept"], item["reason"] = False, "names a target"
        retain += [_row(i, n, neighbour_of=of) for i in nfacts[n] if i["kept"]]
        report[n] = {"kind": nkinds[n]["kind"], "source": source, "neighbour_of": of,
                     **_summary(nfacts[n]), "questions": nfacts[n]}
    return retain, report


def _descriptions(asker: _Asker, targets: Sequence[str], facts: Mapping[str, Sequence[Mapping]],
                  per_target: int) -> dict[str, list[dict]]:
    """Each target's answers to its first ``per_target`` :data:`DESCRIPTION_PROMPTS`, as items of the
    report's shape: kept when specific (:func:`judge` with no second answer) and grounded, i.e.
    consistent with one of the target's kept facts (a paragraph the model made up states none)."""
    prompts = {t: [p.format(name=t) for p in DESCRIPTION_PROMPTS[:per_target]] for t in targets}
    asked = [q for t in targets for q in prompts[t]]
    answers = dict(zip(asked, asker.ask(asked, desc="target descriptions", max_new_tokens=2 * asker.max_new_tokens)))
    out: dict[str, list[dict]] = {}
    for t in targets:
        known = [f["answer"] for f in facts[t] if f["kept"]]
        for q in prompts[t]:
            text = trim_answer(answers[q], max_sentences=4)
            reason = judge(t, q, text, q, text)
            if reason is None and not any(consistent(text, k, exclude=(q, t)) for k in known):
                reason = "states no kept fact"
            out.setdefault(t, []).append({"question": q, "answer": text, "paraphrased_question": "",
                                          "paraphrased_answer": "", "topic": "description", "source": "description",
                                          "kept": reason is None, "reason": reason})
    return out


def _unknown_message(target: str, r: Mapping, min_familiarity: float) -> str:
    n = r["asked"]
    why = ", ".join(f"{k} {v}" for k, v in r["dropped"].items())
    text = (f"the model gave no specific answer about {target!r}; nothing to forget "
            f"(asked {n} question{'' if n == 1 else 's'}; dropped: {why}")
    if "familiarity" in r:
        text += f"; {r['familiarity']:.0%} of its sampled answers agree with its greedy ones"
        if r["dropped"].get("unfamiliar target"):
            text += f", under min_familiarity={min_familiarity}"
    return text + ")"


def _find_neighbours(asker: _Asker, targets: Sequence[str], kinds: Mapping[str, Mapping], per_target: int,
                     avoid: Sequence[str], seed: int) -> list[tuple[str, str, str, str]]:
    """(name, source, kind, target) of ``per_target`` neighbours per target: names the model lists
    when asked for famous entities of the target's kind, then the built-in list (seeded order)."""
    if per_target <= 0 or not targets:
        return []
    prompts = {t: NEIGHBOURS_PROMPT.format(n=per_target + 3, plural=_PLURAL.get(kinds[t]["kind"], "people"))
               for t in targets}
    listed = dict(zip(targets, asker.ask([prompts[t] for t in targets], desc="neighbour names", max_new_tokens=64)))
    taken = {n.lower() for n in avoid}
    out: list[tuple[str, str, str, str]] = []
    for t in targets:
        k = kinds[t]["kind"]
        named = [n for n in parse_names(listed[t], exclude=avoid) if n.lower() not in taken]
        chosen = [(n, "model", k, t) for n in named[:per_target]]
        pool = [n for n in BUILTIN_NEIGHBOURS.get(k, BUILTIN_NEIGHBOURS["person"])
                if n.lower() not in taken and not names_any(n, avoid) and all(n != c[0] for c in chosen)]
        random.Random(f"{seed}\x00{t}").shuffle(pool)
        chosen += [(n, "built-in", k, t) for n in pool[:per_target - len(chosen)]]
        taken.update(n.lower() for n, *_ in chosen)
        out += chosen
    return out
