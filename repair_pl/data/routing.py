"""Routing text: the out-of-scope examples the routing (margin) loss trains on while editing.

Under the lifelong protocol every record's prompt, rephrases and locality prompts are scored
after all edits, so none of them may be trained on. Routing text therefore comes from text no
run evaluates: a dataset's train split (``data.routing_path``), or the ``loc_prompt`` a ZsRE
record carries (WISE's train-split text). Both go through :func:`clean_texts`, which drops any
text that overlaps an evaluated one. Records left without routing text keep
``routing_prompt=None``; the editing module decides what to do with them.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from repair_pl.data.formats import load_records
from repair_pl.data.records import EditDataError, EditRecord


def evaluated_texts(records: Iterable[EditRecord]) -> list[str]:
    """Every text a run scores for ``records``: prompts, rephrases, OOD rephrases and locality prompts."""
    return [text for r in records for text in (r.prompt, *r.rephrases, *r.ood_rephrases, *(p for p, _ in r.locality))]


def routing_text(record: EditRecord) -> str:
    """The one routing text a train-split record gives.

    Its first locality prompt followed by that prompt's answer, as WISE builds its routing
    examples from a train split: text of the same kind as the locality prompts Loc is measured
    on (unrelated to any edit), so the routing loss learns the boundary the metric tests. A
    record without a locality pair gives its own routing prompt (``loc_prompt``), else its
    prompt followed by its target (an edit request the run never makes: still out of scope).
    """
    if record.locality:
        prompt, answer = record.locality[0]
        return f"{prompt} {answer}"
    return record.routing_prompt or f"{record.prompt} {record.target}"


def _string_list(text: str) -> list[str] | None:
    """The strings of a JSON list or JSON lines of strings; ``None`` if ``text`` is not that."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        try:
            values = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return values
    return None


def load_routing_texts(path: str | Path, format: str = "auto", on_invalid: str = "raise") -> list[str]:
    """Read a routing-text file: a JSON list or JSON lines of strings (used as they are), or
    of records in any format :func:`~repair_pl.data.formats.load_records` reads (each becomes
    :func:`routing_text`). Empty strings are dropped."""
    path = Path(path)
    if not path.is_file():
        raise EditDataError("routing text file not found (data.routing_path)", str(path))
    strings = _string_list(path.read_text(encoding="utf-8", errors="replace"))
    if strings is None:
        records, _ = load_records(path, format, on_invalid)
        strings = [routing_text(r) for r in records]
    texts = [s for s in strings if s.strip()]
    if not texts:
        raise EditDataError("holds no non-empty routing text (data.routing_path)", str(path))
    return texts


def _normal(text: str) -> str:
    # Case and spacing differences do not make a text unseen.
    return " ".join(text.casefold().split())


def overlapping(texts: Sequence[str], evaluated: Iterable[str]) -> list[bool]:
    """For each of ``texts``: does it equal, contain or lie inside any ``evaluated`` text
    (ignoring case and spacing)?"""
    candidates = [_normal(t) for t in texts]
    scored = sorted({n for n in map(_normal, evaluated) if n})
    flags = [not c for c in candidates]  # an empty text lies inside every text
    # One joined string per side makes each check a C-level substring search ("\n" never
    # occurs in a normalised text, so no match spans two texts).
    joined, starts, offset = "\n".join(candidates), [], 0
    for c in candidates:
        starts.append(offset)
        offset += len(c) + 1
    for text in scored:  # candidate contains (or equals) an evaluated text
        at = joined.find(text)
        while at != -1:
            flags[bisect.bisect_right(starts, at) - 1] = True
            at = joined.find(text, at + 1)
    scored_joined = "\n".join(scored)
    for i, c in enumerate(candidates):  # candidate lies inside an evaluated text
        flags[i] = flags[i] or c in scored_joined
    return flags


def clean_texts(texts: Iterable[str], evaluated: Iterable[str]) -> list[str]:
    """``texts`` without those that overlap an ``evaluated`` text (see :func:`overlapping`)
    and without repeats, in their first order."""
    unique = list(dict.fromkeys(texts))
    return [t for t, bad in zip(unique, overlapping(unique, evaluated)) if not bad]


def assign_routing_prompts(records: Sequence[EditRecord], evaluated: Iterable[str],
                           pool: Sequence[str] = (), seed: int = 0) -> list[EditRecord]:
    """Give ``records`` routing prompts that no run evaluates.

    A record's own routing prompt (ZsRE's ``loc_prompt``) is kept unless it overlaps an
    ``evaluated`` text, in which case it is dropped. Records without one then take texts of
    ``pool`` (cleaned the same way), in an order shuffled with ``seed``: distinct records get
    distinct texts while the pool lasts, then the pool repeats. With no pool the record keeps
    ``routing_prompt=None``.

    ``evaluated`` should hold the texts of every record the run could score (e.g.
    :func:`evaluated_texts` of the whole edit file, a superset of any selection of it).
    """
    evaluated = list(evaluated)
    own = [r.routing_prompt or "" for r in records]
    kept = [text if text and not bad else None for text, bad in zip(own, overlapping(own, evaluated))]
    taken = {text for text in kept if text}
    free = [text for text in clean_texts(pool, evaluated) if text not in taken]
    random.Random(seed).shuffle(free)
    out, next_free = [], 0
    for record, text in zip(records, kept):
        if text is None and free:
            text, next_free = free[next_free % len(free)], next_free + 1
        out.append(record if text == record.routing_prompt else replace(record, routing_prompt=text))
    return out
