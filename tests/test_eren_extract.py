"""The relevance path and the extractive step with scripted readers (no model): the relation
gate keeps same-subject questions about another relation from reading the note, the extractive
step replaces answers the note does not support, and the trace sweeps match real runs."""

import re

import pytest

from repair_pl.data import EditRecord
from repair_pl.eren import CachedReader, ErenEditor, Notebook, Prompts, evaluate_editor
from repair_pl.eren.evaluate import failure_breakdown, gate_sweep
from repair_pl.eren.extract import mask_subject, mentions, note_spans, prefer_note_span, stem


class Encoder:
    """Bag of content words with the subject's words weighted heavily, as a sentence encoder
    puts a question near any note about its subject: masking the subject leaves the relation words."""

    name, dim = "toy", 64
    ignored = {"what", "is", "the", "of", "did", "s", "where", "someone"}

    def encode(self, texts):
        import torch

        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for word in set(re.findall(r"[a-z]+", text.lower())) - self.ignored:
                weight = 4.0 if word in ("darrieux", "peru") else 1.0
                out[row, sum(map(ord, stem(word))) % self.dim] += weight
        return torch.nn.functional.normalize(out, dim=-1)


class CopyReader:
    """A small reader's habits: given a note it answers with the note's last word whatever the
    question (the copy that breaks BP), except that for "speak" questions it answers from belief
    ("French"); closed-book it answers "closed <question>"."""

    def __init__(self):
        self.read_prompts = []

    def __call__(self, prompt):
        question = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
        if "Note: " not in prompt:
            return f"closed {question}\nQuestion: next"
        self.read_prompts.append(question)
        if "speak" in question:
            return "French\n"
        return prompt.split("Note: ", 1)[1].split("\n")[0].rstrip(".").split()[-1] + "\nNote: next"


PROMPTS = Prompts(read="Note: {notes}\nQuestion: {question}\nAnswer:", closed_book="Question: {question}\nAnswer:",
                  note="{text}")
RECORD = EditRecord(prompt="What is Danielle Darrieux's mother tongue?", target="English", subject="Danielle Darrieux",
                    statement="Danielle Darrieux's mother tongue is English.", case_id=0,
                    meta={"edit_scope": [("What is Danielle Darrieux's mother tongue?", "English"),
                                         ("What language did Danielle Darrieux speak?", "English")],
                          "unrelated": {"same_subj": ["Where did Danielle Darrieux die?",
                                                      "What is Danielle Darrieux's occupation?"],
                                        "neighbor_subj": ["What is Leon Blum's mother tongue?"]}})
PERU = EditRecord(prompt="What is the capital of Peru?", target="Bergen", subject="Peru", case_id=1,
                  statement="The capital of Peru is Bergen.",
                  meta={"edit_scope": [("What is the capital of Peru?", "Bergen")],
                        "unrelated": {"same_subj": ["What is the anthem of Peru?"]}})


def editor(**kwargs):
    reader = CopyReader()
    return ErenEditor(CachedReader(reader), Notebook(Encoder()), k=1, prompts=PROMPTS, **kwargs), reader


def test_spans_and_masking():
    note = "Danielle Darrieux's mother tongue is English."
    assert note_spans(note, "What language did Danielle Darrieux speak?", "Danielle Darrieux") == [
        "mother tongue", "English"]
    assert note_spans(note, "What is Danielle Darrieux's mother tongue?") == ["English"]
    assert note_spans("Evan Dimas plays quarterback.", "What position does Evan Dimas play?") == ["quarterback"]
    assert prefer_note_span("French", note, "What language did Danielle Darrieux speak?") == "English"
    assert prefer_note_span("She spoke English", note, "What language did she speak?") == "She spoke English"
    assert prefer_note_span("x", "Florence is Florence.", "Florence?") == "x"  # no span: the answer stays
    assert mask_subject("Where did danielle darrieux die?", "Danielle Darrieux") == "Where did someone die?"
    assert mask_subject("text", "") == "text" and mentions("About PERU", "Peru") and not mentions("x", "")


def test_relation_gate_keeps_same_subject_questions_closed_book():
    plain, plain_reader = editor(min_score=0.3)
    gated, gated_reader = editor(min_score=0.3, min_relation_score=0.5)
    for e in (plain, gated):
        e.edit_many([RECORD, PERU])
    questions = ["What is Danielle Darrieux's mother tongue?", "Where did Danielle Darrieux die?",
                 "What is Danielle Darrieux's occupation?"]
    before = plain.answer_batch(questions)
    assert [a.text for a in before] == ["English", "English", "English"]  # the note copied: BP lost
    after = gated.answer_batch(questions)
    assert after[0].text == "English" and not after[0].gated and after[0].relation_score > 0.5
    assert [a.text for a in after[1:]] == [f"closed {q}" for q in questions[1:]]
    assert all(a.gated and a.read_output is None and a.relation_score < 0.5 for a in after[1:])
    assert gated_reader.read_prompts == questions[:1]  # the gated ones never reached the reader
    assert all(a.relation_score == pytest.approx(a.scores[0]) or a.relation_score < a.scores[0] for a in before)
    # a question that does not name the subject has nothing to mask: the gate uses the retrieval score
    (leon,) = gated.answer_batch(["What is Leon Blum's mother tongue?"])
    assert leon.relation_score == leon.scores[0]


def test_extract_replaces_an_answer_the_note_does_not_support():
    plain, _ = editor(min_score=0.3)
    spans, _ = editor(min_score=0.3, extract=True)
    for e in (plain, spans):
        e.edit_many([RECORD, PERU])
    question = "What language did Danielle Darrieux speak?"
    assert plain.answer(question).text == "French"  # the reader's belief
    fixed = spans.answer(question)
    assert fixed.text == "English" and fixed.extracted and fixed.read_output.startswith("French")
    kept = spans.answer("What is the capital of Peru?")
    assert kept.text == "Bergen" and not kept.extracted


def test_trace_sweeps_equal_real_runs():
    base, _ = editor(min_score=0.1, extract=True)
    cases, summary = evaluate_editor(base, [RECORD, PERU], progress=False)
    assert summary["es"] == 1.0 and summary["bp"] == 0.0  # every unrelated question copied a note
    for t, r in ((0.1, 0.5), (0.3, 0.5), (0.3, None)):
        for extract in (True, False):
            real, _ = editor(min_score=t, min_relation_score=r, extract=extract)
            _, ran = evaluate_editor(real, [RECORD, PERU], progress=False)
            swept = gate_sweep(cases, [t], relation_thresholds=[r], extract=extract)
            key = f"{t:g}" if r is None else f"{t:g}/{r:g}"
            assert (swept[key]["es"], swept[key]["bp"]) == (ran["es"], ran["bp"]), (t, r, extract)
    gated = gate_sweep(cases, [0.1], relation_thresholds=[0.5])["0.1/0.5"]
    # every unrelated question now keeps its answer (Leon Blum's, with no subject to mask, is held
    # by its retrieval score, which the relation gate falls back to)
    assert gated["bp"] == 1.0
    # the toy encoder does not know that "language ... speak" is "mother tongue": that question is gated too
    assert gated["es"] == pytest.approx(2 / 3)
    assert failure_breakdown(cases, min_score=0.1)["extraction"] == {"fixed": pytest.approx(1 / 3), "broke": 0.0}
    breakdown = failure_breakdown(cases, min_score=0.1, min_relation_score=0.5)
    assert breakdown["in_scope"]["gated"] == pytest.approx(1 / 3) and breakdown["extraction"]["fixed"] == 0.0
    assert breakdown["unrelated_changed_by_kind"] == {"neighbor_subj": 0.0, "same_subj": 0.0}
    assert failure_breakdown(cases, min_score=0.1)["unrelated_changed_by_kind"] == {"neighbor_subj": 1.0,
                                                                                   "same_subj": 1.0}
    assert "0.7/0.3" in summary["gate_sweep"] and "0.7" in summary["gate_sweep"]
