"""Where the retain statistics come from (``stats=`` of :func:`nsru.unlearn`).

The retain subspace is only as good as the data its statistics saw: directions that data never
uses fall into the null space, where the adapter is free to change them. Statistics from the
retain split alone leave the model's other knowledge there (DESIGN §5), so they can come from
broader data:

* ``"auto"`` (the default): the retain data and ``"self"``, or ``"self"`` alone without retain
  data (measured in the README: on the offline world and on SmolLM2 the statistics with the
  model's own texts keep more of what no loss and no statistic saw than the retain data alone);
* ``"retain"``: the retain data (question-answer or text rows);
* ``"self"``: what the target model writes itself before training — its answers to generic
  prompts (chat models) or continuations of BOS — seeded, cached, and with every sample that
  names a forget subject dropped;
* ``"neighbours"``: the model's own answers about other entities of the same kind as the forget
  rows' subjects (:func:`nsru.targets.neighbour_rows`): the knowledge that lies closest to what is
  forgotten, where the generic ``"self"`` texts (which avoid named people) say little;
* a corpus: a JSON/JSONL path, a list of rows or a ``datasets.Dataset`` of text or question-answer
  rows (disjoint from what you evaluate on);
* a list of these, combined: each source's mean second moment counts equally, whatever its size
  (a large retain set would otherwise drown the rest). ``stats_tokens`` bounds the tokens of all
  of them together, shared equally between the sources.

:meth:`nsru.config.UnlearnConfig.stats_sources` reads the option; :mod:`nsru.self_samples` writes
the ``"self"`` texts; this module encodes the sources and combines their statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from nsru.data import encode_qa, encode_text, is_qa, load_rows
from nsru.self_samples import row_subjects, sample_self, subjects_of
from nsru.subspace import SecondMoments, collect_second_moments
from nsru.targets import neighbour_rows


def encode_rows(rows: Sequence[Mapping], tokenizer, max_length: int | None) -> list[dict]:
    """Encodings of question-answer or text rows (the whole sequence counts for statistics)."""
    if is_qa(rows):
        return [encode_qa(tokenizer, r["question"], r["answer"], max_length) for r in rows]
    return [encode_text(tokenizer, r["text"], max_length) for r in rows]


def _budget(encodings: list[dict], tokens: int | None) -> list[dict]:
    if tokens is None:
        return encodings
    kept, used = [], 0
    for enc in encodings:
        if used >= tokens:
            break
        kept.append(enc)
        used += len(enc["input_ids"])
    return kept


def stats_encodings(
    sources: Sequence,
    *,
    model: nn.Module,
    tokenizer,
    retain_rows: Sequence[Mapping] | None,
    forget_rows: Sequence[Mapping],
    max_length: int | None = None,
    tokens: int | None = None,
    self_samples: int = 64,
    self_max_new_tokens: int = 64,
    seed: int = 0,
    avoid: Sequence[str] = (),
    cache: str | Path | None = None,
    progress: bool = False,
) -> dict[str, list[dict]]:
    """The encodings of each source of the retain statistics, by source name. ``sources``: a list
    of ``"retain"``, ``"self"``, ``"neighbours"`` and corpora, as
    :meth:`nsru.config.UnlearnConfig.stats_sources` gives it (``"auto"`` resolved); see the module
    docstring. ``avoid``: names kept out of the generated sources beside the forget subjects.
    ``progress``: bars while the model writes them."""
    if isinstance(sources, (str, Path)) or not sources:
        raise ValueError("stats: give a list of at least one source ('retain', 'self', 'neighbours' or a corpus)")
    share = None if tokens is None else max(1, tokens // len(sources))
    out: dict[str, list[dict]] = {}
    for i, source in enumerate(sources):
        if isinstance(source, str) and source == "retain":
            if retain_rows is None:
                raise ValueError("stats: 'retain' was asked for but no retain data was given")
            name, rows = "retain", retain_rows
        elif isinstance(source, str) and source == "self":
            name = "self"
            rows = sample_self(model, tokenizer, self_samples, max_new_tokens=self_max_new_tokens, seed=seed,
                               exclude=[*subjects_of(forget_rows), *avoid], cache=cache, progress=progress)
            if not rows:
                raise ValueError("stats: 'self' produced no usable samples (all named a forget subject?)")
        elif isinstance(source, str) and source == "neighbours":
            name = "neighbours"
            subjects = row_subjects(forget_rows)
            if not subjects:
                raise ValueError("stats: 'neighbours' needs forget rows with a 'subject' (the name each row is about)")
            rows = neighbour_rows(model, tokenizer, subjects, avoid=avoid, seed=seed, progress=progress).retain
            if not rows:
                raise ValueError(f"stats: 'neighbours' found no entity of the kind of {', '.join(subjects)} that the "
                                 "model answers about specifically and consistently")
        else:
            name = f"corpus{i}" if not isinstance(source, (str, Path)) else str(source)
            rows = load_rows(source, f"stats source {name}")
        out[name] = _budget(encode_rows(rows, tokenizer, max_length), share)
    return out


def describe(sources: Mapping[str, list[dict]]) -> dict[str, dict]:
    """``{source: {"rows", "tokens"}}`` of :func:`stats_encodings`' result, for reports."""
    return {name: {"rows": len(enc), "tokens": sum(len(e["input_ids"]) for e in enc)} for name, enc in sources.items()}


def source_holding(sources: Mapping[str, list[dict]], encodings: Sequence[Mapping]) -> str | None:
    """The name of the source of ``sources`` whose encodings are ``encodings`` (the same token ids
    and attention masks in the same order), e.g. the retain rows as a statistics source; else
    ``None``. Its batches can then stand for ``encodings`` without another forward."""
    def key(e: Mapping) -> tuple:  # what a batch is made of (no mask: every token counts)
        ids, mask = e["input_ids"], e.get("attention_mask")
        return list(ids), list(mask) if mask is not None else [1] * len(ids)

    for name, enc in sources.items():
        if len(enc) == len(encodings) and all(key(a) == key(b) for a, b in zip(enc, encodings)):
            return name
    return None


def global_source_means(model: nn.Module, sources: Mapping[str, list[dict]], batches,
                        progress: bool = False) -> tuple[SecondMoments, dict[str, list]]:
    """The retain statistics of ``sources``: each source's mean second moment over the data of
    every process (where :func:`nsru.subspace.collect_second_moments` gives this process's raw
    sums), the means added so that each source weighs equally; and each source's batches
    (``batches(encodings)`` makes them), by source name. ``progress``: a bar per source,
    ``statistics (NAME)``, counting its batches."""
    combined: SecondMoments | None = None
    by_source: dict[str, list] = {}
    for name, encodings in sources.items():
        source_batches = batches(encodings)
        moments = collect_second_moments(model, source_batches, progress=progress,
                                         desc=f"statistics ({Path(name).name})").all_reduce().normalize_()
        combined = moments if combined is None else combined.add_(moments)
        by_source[name] = source_batches
    for name in combined.names():
        if not torch.isfinite(combined[name]).all():
            raise FloatingPointError(f"retain statistics of module {name!r} contain NaN/Inf; "
                                     "check the model's activations on the statistics data")
    return combined, by_source
