"""EREN editor and evaluation with a scripted reader (no model): the relevance step, the
closed-book fallback, the retrieval gate, and ES/BP/EQ."""

import json
import re

import pytest

from repair_pl.data import EditRecord
from repair_pl.eren import (CachedReader, ErenEditor, HashEncoder, Notebook, Prompts, answer_matches,
                            evaluate_editor, normalize_answer, record_note, write_results)
from repair_pl.eren.evaluate import gate_sweep, harmonic_mean


class ScriptedReader:
    """Reads notes "KEY: ANSWER": answers when KEY is in the question, else "unanswerable";
    closed-book prompts get "closed <question>". Records every prompt."""

    def __init__(self, always_answer=False):
        self.prompts, self.always_answer = [], always_answer

    def __call__(self, prompt):
        self.prompts.append(prompt)
        question = prompt.rsplit("Question: ", 1)[1].split("\n")[0].strip()
        if "Notes:" not in prompt:
            return f"closed {question}\nand more text"
        notes = re.findall(r"^- (.+?): (.+)$", prompt, re.M)
        for key, answer in notes:
            if key.lower() in question.lower() or self.always_answer:
                return f"{answer}\nsecond line"
        return 'The notes are "unanswerable".'


def make_editor(reader=None, **kwargs):
    reader = reader or ScriptedReader()
    return ErenEditor(reader, Notebook(HashEncoder(256)), **kwargs), reader


def test_answers_from_relevant_note():
    editor, _ = make_editor()
    editor.edit_many(["Peru capital: Lima", "Toko Yasuda instrument: violin"])
    answer = editor.answer("What is the Peru capital?")
    assert answer.relevant and answer.text == "Lima" and answer.notes[0].text == "Peru capital: Lima"
    assert answer.read_output.startswith("Lima")


def test_unrelated_question_falls_back_to_closed_book():
    editor, reader = make_editor()
    editor.edit_many(["Peru capital: Lima", "Toko Yasuda instrument: violin"])
    answer = editor.answer("Who wrote Hamlet?")
    assert not answer.relevant and answer.text == "closed Who wrote Hamlet?"
    assert answer.text == editor.closed_book(["Who wrote Hamlet?"])[0]  # exactly the unedited answer
    assert "unanswerable" in answer.read_output and len(answer.notes) == 2
    assert any("Notes:" in p for p in reader.prompts)  # the reader was asked with the notes first


def test_batch_mixes_relevant_and_fallback_and_empty_notebook():
    editor, _ = make_editor()
    assert editor.answer("Peru capital?").text == "closed Peru capital?"  # no notes yet
    editor.edit("Peru capital: Lima")
    answers = editor.answer_batch(["Peru capital?", "Chile capital?", "Peru capital?"])
    assert [a.text for a in answers] == ["Lima", "closed Chile capital?", "Lima"]
    assert [a.relevant for a in answers] == [True, False, True]


def test_separate_relevance_step():
    relevance = 'Notes:\n{notes}\n\nRelevant to "{question}"? yes or no'

    class Judge(ScriptedReader):
        def __call__(self, prompt):
            if prompt.startswith("Notes:") and "Relevant to" in prompt:
                self.prompts.append(prompt)
                return "Yes." if "Peru" in prompt.split("Relevant to")[1] else "No"
            return super().__call__(prompt)

    editor, reader = make_editor(Judge(always_answer=True), prompts=Prompts(relevance=relevance))
    editor.edit("Peru capital: Lima")
    peru, chile = editor.answer_batch(["Peru capital?", "Chile capital?"])
    assert peru.text == "Lima" and chile.text == "closed Chile capital?" and chile.read_output is None


def test_min_score_gate_skips_the_reader():
    editor, reader = make_editor(ScriptedReader(always_answer=True), min_score=0.5)
    editor.edit("Peru capital: Lima")
    far = editor.answer("Who wrote Hamlet?")
    assert far.text == "closed Who wrote Hamlet?" and far.gated and far.read_output is None
    assert len(far.notes) == 1 and not any("Notes:" in p for p in reader.prompts)
    assert editor.answer("Peru capital: which city?").text == "Lima"


def test_prompt_layout_best_last_and_k():
    editor, reader = make_editor(k=2, prompts=Prompts(best_last=True, note="[{rank}] {text}"))
    editor.edit_many(["alpha beta", "alpha", "gamma"])
    editor.answer("alpha beta")
    read = next(p for p in reader.prompts if "Notes:" in p)
    assert "[2] alpha\n[1] alpha beta" in read and "gamma" not in read
    with pytest.raises(ValueError):
        make_editor(k=0)


def test_record_note():
    zsre = EditRecord(prompt="Which family does Ramalinaceae belong to?", target="Lamiinae")
    assert record_note(zsre) == "Q: Which family does Ramalinaceae belong to? A: Lamiinae"
    assert record_note(zsre, "{prompt} {target}.") == "Which family does Ramalinaceae belong to? Lamiinae."
    cfh = EditRecord(prompt="q?", target="a", statement=" Danielle Darrieux's mother tongue is English. ")
    assert record_note(cfh) == "Danielle Darrieux's mother tongue is English."


def test_cached_reader_dedupes():
    inner = ScriptedReader()
    cached = CachedReader(inner)
    answers = cached.generate_batch(["Question: a", "Question: b", "Question: a"])
    assert answers[0] == answers[2] and answers[0].startswith("closed a") and answers[1].startswith("closed b")
    assert cached("Question: a") == answers[0]
    assert cached.calls == 2 and len(inner.prompts) == 2  # each distinct prompt generated once


def test_match_rules():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffel tower"
    assert answer_matches("Her native language is English.", "English")
    assert not answer_matches("Her native language is Englishish.", "English")
    assert answer_matches("an English", "English", "em") and not answer_matches("English, yes", "English", "em")
    assert not answer_matches("anything", "", "contains")
    with pytest.raises(ValueError):
        answer_matches("a", "a", "fuzzy")
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.5) == pytest.approx(2 / 3)


def cfh_record(i, subject, relation, new, neighbors, same):
    statement = f"{subject} {relation}: {new}"
    return EditRecord(prompt=f"{subject} {relation}?", target=new, statement=statement, case_id=i,
                      meta={"edit_scope": [[f"{subject} {relation}?", new], [f"Tell me {subject} {relation}", new]],
                            "unrelated": {"neighbor_subj": neighbors, "same_subj": same}})


RECORDS = [cfh_record(0, "Peru", "capital", "Lima", ["Chile capital?"], ["Peru anthem?", "Peru flag?"]),
           cfh_record(1, "Toko", "instrument", "violin", ["Ringo instrument?"], ["Toko birthplace?"]),
           cfh_record(2, "Edwin", "religion", "Islam", ["Paul religion?", "Rumi religion?"], [])]


def test_evaluate_cfh_with_scripted_reader(tmp_path):
    editor, _ = make_editor(CachedReader(ScriptedReader()))
    cases, summary = evaluate_editor(editor, RECORDS, dataset="cfh_toy", progress=False)
    assert summary["es"] == 1.0 and summary["bp"] == 1.0 and summary["eq"] == 1.0
    assert summary["pre_es"] == 0.0 and summary["retrieval_recall"] == 1.0
    assert summary["relevant_rate_in_scope"] == 1.0 and summary["relevant_rate_unrelated"] == 0.0
    assert summary["n_queries"] == 6 + 7 and summary["method"] == "eren" and summary["T"] == 3
    assert summary["post"] == {"rewrite_acc": 1.0, "rephrase_acc": 1.0, "locality": 1.0, "rewrite_em": 1.0}
    case = cases[0]
    assert case["post"]["locality"]["neighbor_subj_acc"] == [1.0] and case["pre"]["rewrite_acc"] == [0.0]
    assert case["eren"]["in_scope"][0]["own_note_rank"] == 1 and case["requested_rewrite"]["statement"]
    write_results(tmp_path, cases, summary)
    assert json.loads((tmp_path / "summary.json").read_text())["eq"] == 1.0
    assert "ES 100.0 / BP 100.0" in (tmp_path / "summary.md").read_text()
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3


def test_reader_that_ignores_relevance_breaks_bp_and_gate_sweep_is_exact():
    editor, _ = make_editor(CachedReader(ScriptedReader(always_answer=True)))
    cases, summary = evaluate_editor(editor, RECORDS, progress=False)
    assert summary["bp"] == 0.0 and summary["eq"] == 0.0 and summary["bp_same_subj"] == 0.0
    for t in (0.3, 0.6):  # the sweep equals a real run with the gate
        gated, _ = make_editor(CachedReader(ScriptedReader(always_answer=True)), min_score=t)
        _, real = evaluate_editor(gated, RECORDS, progress=False)
        swept = gate_sweep(cases, [t])[f"{t:g}"]
        assert (swept["es"], swept["bp"]) == (real["es"], real["bp"])


def test_evaluate_zsre_shape_and_T_chunks():
    records = [EditRecord(prompt=f"Topic{i} founder?", target=f"Name{i}", rephrases=(f"Who founded Topic{i}?",),
                          locality=((f"nq question: unrelated {i}", "x"),), case_id=i) for i in range(4)]
    editor, _ = make_editor(CachedReader(ScriptedReader()), prompts=Prompts(record_note="{prompt}: {target}"))
    cases, summary = evaluate_editor(editor, records, T=2, progress=False)
    assert summary["T"] == 2 and len(cases) == 4 and summary["post"]["locality"] == 1.0
    assert cases[0]["post"]["locality"]["loc_acc"] == [1.0] and len(editor.notebook) == 2  # reset per chunk
    assert editor.notebook.list()[0].text == "Topic2 founder?: Name2"
    assert cases[0]["post"]["rewrite_acc"] == [1.0] and cases[0]["post"]["rephrase_acc"] == [0.0]
    with pytest.raises(ValueError, match="larger"):
        evaluate_editor(editor, records, T=5, progress=False)


def test_unrelated_subsample_per_kind():
    editor, _ = make_editor(CachedReader(ScriptedReader()))
    cases, summary = evaluate_editor(editor, RECORDS, unrelated_per_kind=1, progress=False)
    asked = [[q["question"] for q in c["eren"]["unrelated"]] for c in cases]
    assert asked == [["Chile capital?", "Peru anthem?"], ["Ringo instrument?", "Toko birthplace?"], ["Paul religion?"]]
    assert summary["n_queries"] == 6 + 5 and summary["unrelated_per_kind"] == 1


def test_failure_breakdown_names_the_step_that_failed():
    from repair_pl.eren.evaluate import failure_breakdown

    def q(post, relevant, rank, score, pre="old", target="new"):
        return {"pre": pre, "post": post, "target": target, "relevant": relevant, "own_note_rank": rank,
                "scores": [score]}

    in_scope = [q("It is new.", True, 1, 0.9),   # right
                q("old", False, None, 0.8),      # own note not retrieved
                q("old", False, 1, 0.9),         # reader said "unanswerable"
                q("It is newer", True, 1, 0.6)]  # read, wrong answer (and below a 0.7 gate)
    unrelated = [q("changed", True, 2, 0.8, pre="same"), q("same", False, 1, 0.3, pre="same")]
    cases = [{"eren": {"in_scope": in_scope, "unrelated": unrelated}}]
    plain = failure_breakdown(cases)
    assert plain["in_scope"] == {"retrieval_miss": 0.25, "gated": 0.0, "judged_irrelevant": 0.25, "wrong_answer": 0.25}
    assert plain["unrelated"] == {"judged_relevant": 0.5, "changed_after_fallback": 0.0}
    gated = failure_breakdown(cases, min_score=0.7)
    assert gated["in_scope"]["gated"] == 0.25 and gated["in_scope"]["wrong_answer"] == 0.0
    in_scope[3]["gated"] = True  # a trace from a run with the gate on
    assert failure_breakdown(cases)["in_scope"] == gated["in_scope"]


def test_irrelevance_said_in_a_sentence_falls_back():
    class Wordy(ScriptedReader):
        def __call__(self, prompt):
            if "Notes:" in prompt and "Hamlet" in prompt:
                self.prompts.append(prompt)
                return "The notes do not answer the question of who wrote Hamlet."
            return super().__call__(prompt)

    editor, _ = make_editor(Wordy())
    editor.edit("Peru capital: Lima")
    hamlet, peru = editor.answer_batch(["Who wrote Hamlet?", "What is the Peru capital?"])
    assert not hamlet.relevant and hamlet.text == "closed Who wrote Hamlet?" and peru.text == "Lima"
    assert editor._says_irrelevant("Unanswerable.") and not editor._says_irrelevant("The answer is Lima.")
    assert not editor._says_irrelevant("Irrelevantly, Lima.")  # whole words only
