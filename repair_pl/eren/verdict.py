"""Fact-checking verdicts: what a reader's free text says about a claim.

EREN evaluates fact-checking (FEVER) by asking the reader whether a claim follows from the
notes; its Flan-T5 reader picks one of the options "Yes", "It's impossible to say", "No". A
chat or few-shot reader answers in its own words ("True.", "No, it was released in 1998"), so
answers are compared as verdicts, not as strings: :func:`parse_verdict` reads the verdict off
the start of the text.
"""

from __future__ import annotations

import re

SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"
"""The two verdicts (FEVER's label names)."""

LABELS = {"yes": SUPPORTS, "no": REFUTES}
"""How EREN's FEVER files write the verdict of a claim given the edit."""

_OPENINGS = (  # the first matching opening decides; negated forms before the bare words
    (REFUTES, ("not true", "not supported", "not correct", "no", "false", "refutes", "refuted", "incorrect",
               "wrong", "untrue")),
    (SUPPORTS, ("yes", "true", "supports", "supported", "correct", "right")),
)


def parse_verdict(text: str) -> str | None:
    """``SUPPORTS`` or ``REFUTES`` from the opening words of ``text`` (case, punctuation and a
    leading "Verdict:"/"Answer:" ignored), or ``None`` when it opens with neither (e.g. "It's
    impossible to say", "unanswerable", an empty string)."""
    words = " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())
    for lead in ("verdict ", "answer ", "the claim is ", "it is ", "that is "):
        words = words.removeprefix(lead)
    for verdict, openings in _OPENINGS:
        if any(words == o or words.startswith(o + " ") for o in openings):
            return verdict
    return None
