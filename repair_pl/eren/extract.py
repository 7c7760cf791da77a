"""Extractive help for a small reader: the spans of a note that can answer a question, and the
edit's subject masked out of a question and a note (for the relation score of the gate).

A note states a fact about a subject ("Danielle Darrieux's mother tongue is English."). The
question names the subject and the relation in its own words ("What language did Danielle
Darrieux speak?"). What the note adds is in the words the question does not share with it:
:func:`note_spans` returns those runs of words ("mother tongue", "English"), leaving out the
subject, the question's words (compared by a crude stem: "plays" matches "play") and function
words. A reader's answer that shares no word with any span did not come from the note (the
135M reader sometimes answers from its own belief, or repeats the subject), and
:func:`prefer_note_span` replaces it with the note's last span (the object of the fact, which
English statements put last more often than not).

This step is not in EREN, whose reader's answer is final.
"""

from __future__ import annotations

import re

FUNCTION_WORDS = frozenset(
    "a an the of in on at by for from to with into as and or but is are was were be been being has have had "
    "do does did it its this that these those which who whom whose what where when why how there here".split())
"""Words that never make a span on their own (articles, prepositions, auxiliaries, wh-words)."""

_WORD = re.compile(r"\w[\w'\-.]*\w|\w")
_SUFFIXES = ("ing", "ed", "es", "s", "e")


def stem(word: str) -> str:
    """A crude stem for matching a note's words to a question's: lower case, no possessive
    ``'s``, one of -ing/-ed/-es/-s/-e removed when three letters remain."""
    word = word.lower().removesuffix("'s").removesuffix("'")
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def words(text: str) -> list[str]:
    """The words of ``text`` (letters, digits and inner ``'-.``), punctuation dropped."""
    return _WORD.findall(text)


def note_spans(note: str, question: str, subject: str = "") -> list[str]:
    """Maximal runs of the note's words that are in neither the question nor the subject and
    are not function words, in the note's order."""
    known = {stem(w) for w in words(question) + words(subject)}
    spans, run = [], []
    for word in words(note):
        if stem(word) in known or word.lower() in FUNCTION_WORDS:
            if run:
                spans.append(" ".join(run))
            run = []
        else:
            run.append(word)
    if run:
        spans.append(" ".join(run))
    return spans


def grounded(answer: str, spans: list[str]) -> bool:
    """Whether ``answer`` shares a word (by :func:`stem`) with one of the note's spans."""
    span_stems = {stem(w) for span in spans for w in words(span)}
    return any(stem(w) in span_stems for w in words(answer))


def prefer_note_span(answer: str, note: str, question: str, subject: str = "") -> str:
    """``answer`` when it draws on the note (or the note has no span), else the note's last span."""
    spans = note_spans(note, question, subject)
    return answer if not spans or grounded(answer, spans) else spans[-1]


def mentions(text: str, subject: str) -> bool:
    """Whether ``text`` names ``subject`` (case-insensitive; never for an empty subject)."""
    return bool(subject.strip()) and subject.strip().lower() in text.lower()


def mask_subject(text: str, subject: str, placeholder: str = "someone") -> str:
    """``text`` with every case-insensitive occurrence of ``subject`` replaced by ``placeholder``
    (unchanged when ``subject`` is empty)."""
    if not subject.strip():
        return text
    return re.sub(re.escape(subject.strip()), placeholder, text, flags=re.IGNORECASE)
