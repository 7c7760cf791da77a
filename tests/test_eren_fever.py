"""EREN fact-checking (FEVER): the loader and its errors, the verdict parser, and ES/BP/EQ on
verdicts with a scripted reader."""

import json
from pathlib import Path

import pytest
import yaml

from repair_pl.data import EditDataError, detect_format, load_records
from repair_pl.eren import CachedReader, ErenEditor, HashEncoder, Notebook, Prompts, evaluate_editor
from repair_pl.eren.evaluate import answer_matches, same_answer
from repair_pl.eren.verdict import REFUTES, SUPPORTS, parse_verdict

REPO = Path(__file__).resolve().parents[1]


def fever_row(i, statement, claims):
    return {"id": i, "edit_statement": statement, "edit_scope": [list(c) for c in claims],
            "edit_scope_true_ans": ["yes"], "_id": str(1000 + i)}


ROWS = [fever_row(0, "Peru's capital is Lima.",
                  [("Peru's capital is Lima.", "yes"), ("Peru's capital is Cusco.", "no")]),
        fever_row(1, "Toko plays violin.", [("Toko plays violin.", "yes"), ("Toko plays no instrument.", "No")]),
        fever_row(2, "Hamlet is a play.", [("Hamlet is a play.", "yes"), ("Hamlet is a novel.", "no")]),
        fever_row(3, "Rumi wrote poems.", [("Rumi wrote poems.", "yes")])]


def write(tmp_path, rows, name="fever.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_fever_pairs_each_edit_with_the_record_half_a_file_later(tmp_path):
    records, skipped = load_records(write(tmp_path, ROWS))  # format detected
    assert skipped == [] and [r.case_id for r in records] == [0, 1]
    first = records[0]
    assert (first.prompt, first.target) == ("Peru's capital is Lima.", SUPPORTS)
    assert first.statement == "Peru's capital is Lima."
    assert first.meta["edit_scope"] == [("Peru's capital is Lima.", SUPPORTS), ("Peru's capital is Cusco.", REFUTES)]
    assert first.meta["unrelated"] == {"out_of_scope": ["Hamlet is a play.", "Hamlet is a novel."]}
    assert records[1].meta["unrelated"] == {"out_of_scope": ["Rumi wrote poems."]}
    assert records[1].meta["edit_scope"][1] == ("Toko plays no instrument.", REFUTES)  # label case ignored
    assert detect_format(ROWS[0]) == "fever"
    assert detect_format({"edit_statement": "s", "edit_scope": [["q", "a"]]}) == "cfh"


@pytest.mark.parametrize("row, field, message", [
    ({"edit_scope": [["c", "yes"]]}, "edit_statement", "missing"),
    ({"edit_statement": "s", "edit_scope": [["c", "maybe"]]}, "edit_scope", "claim 0 has label 'maybe'"),
    ({"edit_statement": "s", "edit_scope": [["c"]]}, "edit_scope", "list of \\[question, answer\\]"),
    ({"edit_statement": "s", "edit_scope": "c"}, "edit_scope", "list of \\[question, answer\\]"),
    ({"edit_statement": 3, "edit_scope": [["c", "yes"]]}, "edit_statement", "must be a string"),
])
def test_fever_errors_name_file_record_and_field(tmp_path, row, field, message):
    path = write(tmp_path, [ROWS[0], row, ROWS[2], ROWS[3]])
    with pytest.raises(EditDataError, match=message) as info:
        load_records(path, format="fever")
    assert (info.value.path, info.value.index, info.value.field) == (str(path), 1, field)
    assert f"file {path}, record 1, field '{field}'" in str(info.value)


def test_fever_odd_file_and_empty_scope(tmp_path):
    path = write(tmp_path, ROWS[:3])
    with pytest.raises(EditDataError, match="3 records cannot be split in two halves") as info:
        load_records(path, format="fever")
    assert info.value.path == str(path)
    empty = [ROWS[0], {"edit_statement": "s", "edit_scope": []}, ROWS[2], ROWS[3]]
    with pytest.warns(UserWarning, match="skipped 1 record"):
        records, skipped = load_records(write(tmp_path, empty), format="fever")
    assert [r.case_id for r in records] == [0] and skipped[0].field == "edit_scope"
    bad_partner = [ROWS[0], ROWS[1], ROWS[2], {"edit_statement": "s", "edit_scope": [["c", "perhaps"]]}]
    with pytest.warns(UserWarning, match="skipped 1 record"):
        records, _ = load_records(write(tmp_path, bad_partner), format="fever", on_invalid="skip")
    assert records[1].meta["unrelated"] == {"out_of_scope": []}  # its partner was left out


@pytest.mark.parametrize("text, verdict", [
    ("true", SUPPORTS), (" True.", SUPPORTS), ("Yes, it did.", SUPPORTS), ("SUPPORTS", SUPPORTS),
    ("Verdict: correct", SUPPORTS), ("The claim is true", SUPPORTS),
    ("false", REFUTES), ("No.", REFUTES), ("It is not true that he did", REFUTES), ("REFUTES", REFUTES),
    ("not supported", REFUTES), ("Incorrect", REFUTES),
    ("It's impossible to say", None), ("unanswerable", None), ("", None), ("Perhaps true", None),
    ("nothing", None), ("Truely", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_verdict_rule_for_es_and_bp():
    assert answer_matches("True.", SUPPORTS, "verdict") and answer_matches("no", "REFUTES", "verdict")
    assert not answer_matches("maybe", SUPPORTS, "verdict") and not answer_matches("", "", "verdict")
    assert same_answer("true", "Yes.", "verdict") and not same_answer("true", "false", "verdict")
    assert same_answer("hmm", "who knows", "verdict")  # neither states a verdict: unchanged
    assert not same_answer("true", "Yes.", "contains")


class VerdictReader:
    """Reads "Note: S" prompts: "true" when the claim is the note, "false" when it shares the
    note's first word, else "impossible to say"; closed-book: "true" for every claim."""

    def __call__(self, prompt):
        claim = prompt.rsplit("Claim: ", 1)[1].split("\n")[0]
        if "Note: " not in prompt:
            return "true\nClaim: next"
        note = prompt.split("Note: ", 1)[1].split("\n")[0]
        if claim == note:
            return "true\n"
        return "false" if claim.split()[0] == note.split()[0] else "It's impossible to say"


def test_fact_checking_end_to_end_with_a_scripted_reader(tmp_path):
    records, _ = load_records(write(tmp_path, ROWS))
    prompts = Prompts(read="Note: {notes}\nClaim: {question}\nVerdict:", closed_book="Claim: {question}\nVerdict:",
                      note="{text}", irrelevant=("impossible to say",))
    editor = ErenEditor(CachedReader(VerdictReader()), Notebook(HashEncoder(256)), k=1, prompts=prompts)
    cases, summary = evaluate_editor(editor, records, dataset="fever_toy", rule="verdict", progress=False)
    # in scope: 2 claims true (the notes), 2 negated ones read as false: all right; closed-book says
    # "true" to all, so the unedited model gets the two SUPPORTS claims right
    assert (summary["es"], summary["pre_es"]) == (1.0, 0.5)
    # out of scope: "Hamlet is a play." etc. -> "impossible to say" -> closed-book "true": unchanged
    assert summary["bp"] == 1.0 and summary["bp_out_of_scope"] == 1.0 and summary["match"] == "verdict"
    assert [q["relevant"] for q in cases[0]["eren"]["unrelated"]] == [False, False]


def test_shipped_fever_config_builds_and_formats():
    from repair_pl.eren.run import build_editor

    cfg = yaml.safe_load((REPO / "configs" / "eren_fever.yaml").read_text())
    assert cfg["model"]["match"] == "verdict" and cfg["data"]["format"] == "fever"
    editor = build_editor({**cfg["model"], "encoder": "hash"}, reader=VerdictReader())
    read = editor.prompts.read.format(notes="Peru's capital is Lima.", question="Peru's capital is Cusco.")
    assert read.endswith("Note: Peru's capital is Lima.\nClaim: Peru's capital is Cusco.\nVerdict:")
    closed = editor.prompts.closed_book.format(question="Peru's capital is Cusco.")
    assert closed.endswith("\nClaim: Peru's capital is Cusco.\nVerdict:") and "Note:" not in closed
    # every few-shot example states its verdict in the one-line format the parser reads
    examples = [line.split(": ", 1)[1] for line in read.splitlines() if line.startswith("Verdict: ")]
    assert examples and all(parse_verdict(v) is not None for v in examples)


def test_real_fever_file_splits_as_eren_does():
    path = REPO / "data" / "eren" / "fever_filtered_small.json"
    assert path.is_file(), f"{path} is missing: run python scripts/get_data.py"
    records, skipped = load_records(path)
    raw = json.loads(path.read_text())
    assert len(raw) == 2048 and len(records) == 1024 and skipped == []
    assert [r.statement for r in records] == [row["edit_statement"] for row in raw[:1024]]
    for i in (0, 511, 1023):
        assert records[i].meta["unrelated"]["out_of_scope"] == [c for c, _ in raw[1024 + i]["edit_scope"]]
    assert sum(len(r.meta["edit_scope"]) for r in records) == 8999
    assert sum(len(r.meta["unrelated"]["out_of_scope"]) for r in records) == 9216
    assert {v for r in records for _, v in r.meta["edit_scope"]} == {SUPPORTS, REFUTES}
