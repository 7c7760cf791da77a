"""The EREN editor: edits become notes; questions are answered by reading retrieved notes.

Answering a question (EREN's two-step reading, Chen et al. 2024, Sec. 4):

1. retrieve the ``k`` notes most similar to the question;
2. ask the reader to answer from the notes, with an explicit way out ("unanswerable") for
   notes that do not bear on the question;
3. if the reader takes the way out, answer closed-book: the question alone, exactly as the
   unedited model would see it, so unrelated questions keep their unedited answers.

Two optional steps, not in EREN, help a small reader (both off by default):

- gates before step 2: ``min_score`` sends a question whose best note scores below it
  closed-book unread; ``min_relation_score`` does the same on the *relation score*, the
  similarity of question and note with the edit's subject masked out of both
  (:func:`~repair_pl.eren.extract.mask_subject`; the retrieval score when they do not both
  name it). A question about the same subject but another relation ("Where did X die?"
  against "X's mother tongue is English.") scores high on the first and low on the second.
- ``extract``: an answer that shares no word with the spans the best note adds to the question
  is replaced by the note's last such span (:func:`~repair_pl.eren.extract.prefer_note_span`).

Prompts are plain ``str.format`` templates (:class:`Prompts`), set from the config.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from repair_pl.data.records import EditRecord
from repair_pl.eren.extract import mask_subject, mentions, prefer_note_span
from repair_pl.eren.notebook import Note, Notebook
from repair_pl.eren.reader import Reader, generate_all

READ_TEMPLATE = ('Read the notes and answer the question in a few words. If the notes do not '
                 'answer the question, say "unanswerable".\n\nNotes:\n{notes}\n\nQuestion: {question}')
CLOSED_BOOK_TEMPLATE = "Answer the question in a few words.\n\nQuestion: {question}"
NOTE_TEMPLATE = "Q: {prompt} A: {target}"
"""How a record without an edit sentence (ZsRE) becomes a note; fields: prompt, target, subject."""


@dataclass
class Prompts:
    """The reader's prompt templates.

    Attributes:
        read: step 1; fields ``{notes}`` and ``{question}``.
        closed_book: the fallback and the unedited baseline; field ``{question}``.
        note: one retrieved note inside ``{notes}``; fields ``{text}`` and ``{rank}`` (1 = best).
        joiner: between notes.
        best_last: list the best note last, next to the question (small readers attend most to
            the nearest text); EREN lists best first.
        irrelevant: words or phrases that, found as whole words in the normalised first line of
            the step-1 output, mean "the notes do not answer it" (small readers say "The notes do
            not answer the question." rather than the one word asked for).
        relevance: optional separate yes/no step before reading (fields ``{notes}``,
            ``{question}``); an answer without "yes" means closed-book. ``None``: EREN's joint step.
        record_note: how a record without a statement becomes a note (see :data:`NOTE_TEMPLATE`).
    """

    read: str = READ_TEMPLATE
    closed_book: str = CLOSED_BOOK_TEMPLATE
    note: str = "- {text}"
    joiner: str = "\n"
    best_last: bool = False
    irrelevant: tuple[str, ...] = ("unanswerable", "irrelevant", "do not answer", "does not answer")
    relevance: str | None = None
    record_note: str = NOTE_TEMPLATE


@dataclass
class Answer:
    """The editor's answer to one question and how it was reached."""

    text: str
    relevant: bool
    notes: list[Note] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    read_output: str | None = None
    gated: bool = False
    """Sent closed-book unread by a gate (``min_score`` or ``min_relation_score``)."""
    relation_score: float | None = None
    """Similarity of question and best note with the note's subject masked out of both (the
    retrieval score when they do not both name it; ``None``: no notes)."""
    extracted: bool = False
    """The reader's answer was replaced by a span of the note (the ``extract`` step)."""


def first_line(text: str) -> str:
    """The first non-empty line of a generation (readers often run on after the answer)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def record_note(record: EditRecord, template: str = NOTE_TEMPLATE) -> str:
    """The note for an edit record: its edit sentence when it has one, else ``template``."""
    if record.statement:
        return record.statement.strip()
    return template.format(prompt=record.prompt.strip(), target=record.target.strip(), subject=record.subject)


class ErenEditor:
    """Edit a black-box reader by writing notes and answering from them.

    Args:
        reader: ``generate(prompt) -> text`` (see :mod:`repair_pl.eren.reader`).
        notebook: where the notes live (its encoder does the retrieval).
        k: notes retrieved per question.
        prompts: the templates.
        min_score: optional retrieval gate (not in EREN, off by default): a question whose best
            note scores below it goes closed-book without step 1 (the reader is not asked).
        min_relation_score: optional gate on the relation score (see the module docstring);
            notes without a subject use their retrieval score.
        extract: replace an answer the best note does not support by the note's last span.
    """

    def __init__(self, reader: Reader, notebook: Notebook, k: int = 5, prompts: Prompts | None = None,
                 min_score: float | None = None, min_relation_score: float | None = None, extract: bool = False):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.reader, self.notebook, self.k = reader, notebook, k
        self.prompts, self.min_score = prompts or Prompts(), min_score
        self.min_relation_score, self.extract = min_relation_score, extract

    def edit(self, record: EditRecord | str) -> Note:
        """Add one edit (a record or a sentence) as a note."""
        return self.edit_many([record])[0]

    def edit_many(self, records: Sequence[EditRecord | str]) -> list[Note]:
        """Add many edits in one encoder pass."""
        texts = [r if isinstance(r, str) else record_note(r, self.prompts.record_note) for r in records]
        metas = [{} if isinstance(r, str) else {"case_id": r.case_id, **({"subject": r.subject} if r.subject else {})}
                 for r in records]
        return self.notebook.add_many(texts, metas=metas)

    def reset(self) -> None:
        """Forget every edit."""
        self.notebook.clear()

    def closed_book(self, questions: Sequence[str]) -> list[str]:
        """The reader's answers without notes (what the unedited model says)."""
        return [first_line(t) for t in generate_all(self.reader, [self.prompts.closed_book.format(question=q)
                                                                  for q in questions])]

    def _notes_text(self, notes: list[Note]) -> str:
        ranked = [self.prompts.note.format(text=n.text, rank=i + 1) for i, n in enumerate(notes)]
        return self.prompts.joiner.join(reversed(ranked) if self.prompts.best_last else ranked)

    def _says_irrelevant(self, text: str) -> bool:
        words = " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
        return not words or any(f" {m} " in f" {words} " for m in self.prompts.irrelevant)

    def relation_scores(self, questions: Sequence[str], notes: Sequence[Note]) -> list[float | None]:
        """Similarity of each question and its note with the note's ``subject`` (meta) masked
        out of both; ``None`` unless both name the subject (the gate then uses the retrieval
        score: a question about another subject, or naming it in other words, has nothing to mask)."""
        todo = [i for i, n in enumerate(notes) if mentions(n.text, n.meta.get("subject", ""))
                and mentions(questions[i], n.meta["subject"])]
        out: list[float | None] = [None] * len(notes)
        if todo:
            encode = self.notebook.encoder.encode
            q = encode([mask_subject(questions[i], notes[i].meta["subject"]) for i in todo])
            n = encode([mask_subject(notes[i].text, notes[i].meta["subject"]) for i in todo])
            for i, score in zip(todo, (q * n).sum(-1).tolist()):
                out[i] = float(score)
        return out

    def _gated(self, answer: Answer) -> bool:
        return ((self.min_score is not None and answer.scores[0] < self.min_score) or
                (self.min_relation_score is not None and answer.relation_score < self.min_relation_score))

    def answer(self, question: str) -> Answer:
        """Answer one question (see the module docstring)."""
        return self.answer_batch([question])[0]

    def answer_batch(self, questions: Sequence[str]) -> list[Answer]:
        """Answer many questions; each step is one batched reader call."""
        hits = self.notebook.search(list(questions), self.k)
        answers = [Answer("", False, [n for n, _ in row], [s for _, s in row]) for row in hits]
        found = [i for i, a in enumerate(answers) if a.notes]
        relations = self.relation_scores([questions[i] for i in found], [answers[i].notes[0] for i in found])
        for i, relation in zip(found, relations):  # the gates; the notes stay in the answer as a trace
            answers[i].relation_score = relation if relation is not None else answers[i].scores[0]
            answers[i].gated = self._gated(answers[i])
        todo = [i for i in found if not answers[i].gated]
        p = self.prompts
        if p.relevance is not None and todo:
            verdicts = generate_all(self.reader, [p.relevance.format(notes=self._notes_text(answers[i].notes),
                                                                     question=questions[i]) for i in todo])
            todo = [i for i, v in zip(todo, verdicts) if "yes" in re.findall(r"[a-z]+", v.lower())]
        reads = generate_all(self.reader, [p.read.format(notes=self._notes_text(answers[i].notes),
                                                         question=questions[i]) for i in todo])
        for i, raw in zip(todo, reads):
            answers[i].read_output = raw
            if not self._says_irrelevant(first_line(raw)):
                answers[i].text, answers[i].relevant = first_line(raw), True
                if self.extract:
                    best = answers[i].notes[0]
                    answers[i].text = prefer_note_span(answers[i].text, best.text, questions[i],
                                                       best.meta.get("subject", ""))
                    answers[i].extracted = answers[i].text != first_line(raw)
        fallback = [i for i, a in enumerate(answers) if not a.relevant]
        for i, text in zip(fallback, self.closed_book([questions[i] for i in fallback])):
            answers[i].text = text
        return answers
