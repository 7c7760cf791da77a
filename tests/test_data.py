"""Tests for repair_pl.data: the real benchmark files, the custom format, every bad-input
case, the EditDataModule, and hypothesis property tests of load_records."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repair_pl.data import (
    DEMO_PATH,
    FORMATS,
    EditDataError,
    EditDataModule,
    EditRecord,
    UneditableRecord,
    detect_format,
    load_records,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    local = REPO_ROOT / "data"
    if (local / "zsre" / "zsre_edit_1000.json").is_file():
        return local
    shared = REPO_ROOT / ".." / "shared" / "data"
    if (shared / "zsre" / "zsre_edit_1000.json").is_file():
        return shared
    return None


DATA = _data_root()


def real_file(rel: str) -> Path:
    """A benchmark file; missing, the test fails saying how to get it (``make test`` does)."""
    if DATA is None or not (DATA / rel).is_file():
        pytest.fail(f"data/{rel} is missing (neither data/ nor ../shared/data/ has it): run `make data` "
                    f"(python scripts/get_data.py)", pytrace=False)
    return DATA / rel


def raw_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def zsre_row(i: int, **extra) -> dict:
    row = {"subject": f"S{i}", "src": f"What is q{i}?", "alt": f"a{i}", "rephrase": f"Tell me q{i}?",
           "loc": f"nq question: unrelated {i}", "loc_ans": f"ans{i}"}
    row.update(extra)
    return row


GOOD = [zsre_row(i) for i in range(5)]


def load_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_records(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Real benchmark files
# ---------------------------------------------------------------------------------------------


def test_real_zsre_loads_with_field_mapping():
    path = real_file("zsre/zsre_edit_1000.json")
    records, skipped = load_records(path)
    raw = raw_rows(path)
    assert len(records) == 1000 and skipped == []
    r0, raw0 = records[0], raw[0]
    assert r0.prompt == raw0["src"]
    assert r0.target == raw0["alt"]
    assert r0.subject == raw0["subject"]
    assert r0.rephrases == (raw0["rephrase"],)
    assert r0.locality == ((raw0["loc"], raw0["loc_ans"]),)
    assert r0.routing_prompt == raw0["loc_prompt"]
    assert r0.ood_rephrases == () and r0.case_id == 0
    assert [r.case_id for r in records] == list(range(1000))
    assert records[999].prompt == raw[999]["src"] and records[999].target == raw[999]["alt"]


def test_real_counterfact_loads_with_field_mapping():
    path = real_file("counterfact/counterfact_edit_2000.json")
    records, skipped = load_records(path)
    raw = raw_rows(path)
    assert len(records) == 2000 and skipped == []
    r0, raw0 = records[0], raw[0]
    assert (r0.prompt, r0.target, r0.subject) == (raw0["prompt"], raw0["target_new"], raw0["subject"])
    assert r0.ground_truth == raw0["ground_truth"]
    assert r0.rephrases == (raw0["rephrase_prompt"],)
    assert r0.locality == ((raw0["locality_prompt"], raw0["locality_ground_truth"]),)
    assert r0.routing_prompt is None
    # case_id comes from the file, not the position
    assert [row["case_id"] for row in raw[:50]] != list(range(50))
    assert [r.case_id for r in records[:50]] == [row["case_id"] for row in raw[:50]]


def test_real_hallucination_loads_and_empty_locality_answers_are_absent():
    path = real_file("hallucination/hallucination-edit.json")
    records, skipped = load_records(path)
    raw = raw_rows(path)
    assert len(records) == 600 and skipped == []
    r0, raw0 = records[0], raw[0]
    assert (r0.prompt, r0.target, r0.subject) == (raw0["prompt"], raw0["target_new"], raw0["subject"])
    assert r0.locality == ((raw0["locality_prompt"], raw0["locality_ground_truth"]),)
    assert r0.rephrases == ()
    empty = [i for i, row in enumerate(raw) if not row["locality_ground_truth"].strip()]
    assert len(empty) == 7
    assert [i for i, r in enumerate(records) if not r.locality] == empty


def test_real_temporal_loads_with_ood_rephrases():
    path = real_file("temporal/temporal-edit.json")
    records, skipped = load_records(path)
    raw = raw_rows(path)
    assert len(records) == 75 and skipped == []
    r0, raw0 = records[0], raw[0]
    assert (r0.prompt, r0.target) == (raw0["prompt"], raw0["target_new"])
    assert r0.ood_rephrases == (raw0["ood_rephrase"],)
    assert r0.locality == ((raw0["locality_prompt"], raw0["locality_ground_truth"]),)
    assert all(r.ood_rephrases and all(s.strip() for s in r.ood_rephrases) for r in records)


def test_real_cfh_loads_skipping_uneditable_records_with_warning():
    path = real_file("eren/cfh_filtered.json")
    with pytest.warns(UserWarning, match=r"skipped 8 record"):
        records, skipped = load_records(path)
    raw = raw_rows(path)
    assert len(raw) == 1024
    assert len(records) == 1016 and len(skipped) == 8
    empty = [i for i, row in enumerate(raw) if row["edit_scope"] == []]
    assert all(isinstance(e, UneditableRecord) for e in skipped)
    assert [e.index for e in skipped] == empty
    assert all(e.field == "edit_scope" and e.path == str(path) for e in skipped)
    assert {r.case_id for r in records} == {row["id"] for row in raw} - {raw[i]["id"] for i in empty}

    r0, raw0 = records[0], raw[0]
    scope = raw0["edit_scope"]
    assert r0.prompt == scope[0][0] and r0.target == scope[0][1]
    assert r0.rephrases == tuple(q for q, _ in scope[1:])
    assert r0.statement == raw0["edit_statement"]
    assert r0.subject == raw0["subject_name"]
    assert r0.ground_truth == raw0["edit_scope_true_ans"][0]
    # aligned question/answer lists become locality pairs; misaligned ones do not
    expected_loc = []
    for kind in sorted(raw0["unrelated"]):
        qs, ans = raw0["unrelated"][kind], raw0["unrelated_true_ans"].get(kind, [])
        if len(qs) == len(ans):
            expected_loc += list(zip(qs, ans))
    assert r0.locality == tuple(expected_loc)
    assert ("What is Leon Blum's mother tongue?", "French") in r0.locality
    assert r0.meta["unrelated"] == raw0["unrelated"]


# ---------------------------------------------------------------------------------------------
# The custom format
# ---------------------------------------------------------------------------------------------


def test_custom_json_list_and_jsonl_give_the_same_records(tmp_path):
    rows = GOOD + [{"src": "Only required?", "alt": "yes"}]
    from_list, s1 = load_records(write_json(tmp_path / "edits.json", rows))
    from_lines, s2 = load_records(write_jsonl(tmp_path / "edits.jsonl", rows))
    assert s1 == s2 == []
    assert from_list == from_lines
    assert len(from_list) == 6
    r = from_list[1]
    assert r == EditRecord(prompt="What is q1?", target="a1", subject="S1", rephrases=("Tell me q1?",),
                           locality=(("nq question: unrelated 1", "ans1"),), case_id=1)
    last = from_list[5]
    assert (last.prompt, last.target, last.subject, last.rephrases, last.locality, last.routing_prompt) == (
        "Only required?", "yes", "", (), (), None)


def test_rephrase_list_and_loc_prompt(tmp_path):
    rows = [zsre_row(0, rephrase=["p1", "p2"], loc_prompt="nq question: x y")]
    (r,), _ = load_records(write_jsonl(tmp_path / "e.jsonl", rows))
    assert r.rephrases == ("p1", "p2") and r.routing_prompt == "nq question: x y"


@pytest.mark.parametrize("fmt", ["auto", "zsre", "custom"])
def test_explicit_and_auto_format_agree(tmp_path, fmt):
    path = write_jsonl(tmp_path / "e.jsonl", GOOD)
    records, _ = load_records(path, format=fmt)
    assert [r.prompt for r in records] == [row["src"] for row in GOOD]


def test_auto_detects_easyedit_and_cfh(tmp_path):
    easy = [{"prompt": "The capital of X is", "target_new": "Y", "rephrase_prompt": "X's capital is",
             "locality_prompt": "Paris is in", "locality_ground_truth": "France", "ood_rephrase": "Where is X's seat"}]
    (r,), _ = load_records(write_json(tmp_path / "easy.json", easy))
    assert (r.prompt, r.target, r.rephrases, r.locality, r.ood_rephrases) == (
        "The capital of X is", "Y", ("X's capital is",), (("Paris is in", "France"),), ("Where is X's seat",))
    cfh = [{"id": 7, "edit_statement": "X's capital is Y.", "subject_name": "X",
            "edit_scope": [["What is X's capital?", "Y"], ["Capital of X?", "Y"]],
            "edit_scope_true_ans": ["Z", "Z"], "unrelated": {"neighbor_subj": ["Capital of W?"]},
            "unrelated_true_ans": {"neighbor_subj": ["V"]}}]
    (c,), _ = load_records(write_json(tmp_path / "cfh.json", cfh))
    assert (c.prompt, c.target, c.rephrases, c.locality, c.case_id, c.statement) == (
        "What is X's capital?", "Y", ("Capital of X?",), (("Capital of W?", "V"),), 7, "X's capital is Y.")


def test_detect_format():
    assert detect_format({"src": "a", "alt": "b"}) == "zsre"
    assert detect_format({"prompt": "a", "target_new": "b"}) == "easyedit"
    assert detect_format({"edit_scope": []}) == "cfh"
    with pytest.raises(EditDataError, match="cannot tell the format"):
        detect_format({"question": "a"})


def test_explicit_wrong_format_names_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", GOOD)
    with pytest.raises(EditDataError) as info:
        load_records(path, format="easyedit")
    assert info.value.field == "prompt" and info.value.index == 0
    assert str(path) in str(info.value)


def test_unknown_format_is_named(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", GOOD)
    with pytest.raises(EditDataError, match=r"unknown format 'nope'"):
        load_records(path, format="nope")
    assert "nope" not in FORMATS


def test_bad_on_invalid_value(tmp_path):
    with pytest.raises(ValueError, match="on_invalid"):
        load_records(write_jsonl(tmp_path / "e.jsonl", GOOD), on_invalid="ignore")


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file, the record index and the field
# ---------------------------------------------------------------------------------------------


def path_re(path: Path) -> str:
    return re.escape(str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*not found") as info:
        load_records(path)
    assert info.value.path == str(path)


def test_missing_file_under_data_hints_get_data(tmp_path):
    path = tmp_path / "data" / "zsre" / "missing.json"
    with pytest.raises(EditDataError, match=r"not found.*get_data\.py"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*empty"):
        load_records(path)


@pytest.mark.parametrize("content", ["[]", "  [ \n ]\n"])
def test_empty_list(tmp_path, content):
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*empty list"):
        load_records(path)


def test_malformed_json_list_reports_line_and_column(tmp_path):
    text = '[{"src": "a", "alt": "b"},\n {"src": "c" "alt": "d"}]'
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    line, col = expected.value.lineno, expected.value.colno
    assert line == 2
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*malformed JSON.*line {line}, column {col}"):
        load_records(path)


def test_malformed_jsonl_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in GOOD[:3]] + ['{"src": "c" "alt": "d"}'] + [json.dumps(GOOD[4])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*malformed JSON on line 4\b"):
        load_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "[1, 2]\n")
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*line 2 is a list"):
        load_records(path)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b'\n{"src": "caf\xe9?", "alt": "x"}\n')
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*not UTF-8.*line 2"):
        load_records(path)


@pytest.mark.parametrize("writer", [write_json, write_jsonl], ids=["json", "jsonl"])
@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ({"src": "third?"}, "alt", "missing"),
        ({"src": "third?", "alt": None}, "alt", "missing"),
        ({"src": "third?", "alt": ""}, "alt", "empty string"),
        ({"src": "third?", "alt": "  \t"}, "alt", "empty string"),
        ({"src": "third?", "alt": 5}, "alt", "must be a string, got int 5"),
        ({"src": ["third?"], "alt": "x"}, "src", "must be a string, got list"),
        ({"src": "", "alt": "x"}, "src", "empty string"),
        ({"alt": "x"}, "src", "missing"),
        ({"src": "third?", "alt": "x", "loc": "nq question: q"}, "loc_ans", "must come together"),
        ({"src": "third?", "alt": "x", "loc_ans": "y"}, "loc", "must come together"),
        ({"src": "third?", "alt": "x", "rephrase": 3}, "rephrase", "a string or a list of strings"),
        ({"src": "third?", "alt": "x", "rephrase": ["ok", 3]}, "rephrase", "a string or a list of strings"),
        ({"src": "third?", "alt": "x", "subject": 12}, "subject", "must be a string"),
        ({"src": "third?", "alt": "x", "loc_prompt": ["a"]}, "loc_prompt", "must be a string"),
    ],
    ids=["no-alt", "alt-null", "alt-empty", "alt-blank", "alt-int", "src-list", "src-empty", "no-src",
         "loc-no-ans", "ans-no-loc", "rephrase-int", "rephrase-list-int", "subject-int", "loc_prompt-list"],
)
def test_bad_record_names_file_index_and_field(tmp_path, writer, bad, field, message):
    rows = [GOOD[0], GOOD[1], bad, GOOD[3]]
    path = writer(tmp_path / ("edits" + (".json" if writer is write_json else ".jsonl")), rows)
    result = None
    with pytest.raises(EditDataError) as info:
        result = load_records(path)
    assert result is None  # raised: nothing half-loaded is returned
    err = info.value
    assert (err.path, err.index, err.field) == (str(path), 2, field)
    text = str(err)
    assert str(path) in text and "record 2" in text and repr(field) in text
    assert message in text


def test_first_bad_record_is_reported(tmp_path):
    rows = [GOOD[0], {"src": "q", "alt": 1}, {"src": "q"}]
    with pytest.raises(EditDataError) as info:
        load_records(write_jsonl(tmp_path / "e.jsonl", rows))
    assert (info.value.index, info.value.field) == (1, "alt")


def test_empty_optional_locality_is_absent(tmp_path):
    rows = [zsre_row(0, loc_ans=""), zsre_row(1, loc="", loc_ans=""), zsre_row(2, loc_prompt="", subject="")]
    records, skipped = load_records(write_jsonl(tmp_path / "e.jsonl", rows))
    assert skipped == []
    assert records[0].locality == () and records[1].locality == ()
    assert records[2].routing_prompt is None and records[2].subject == ""


def test_empty_optional_rephrase_is_absent(tmp_path):
    (record,), _ = load_quiet(write_jsonl(tmp_path / "e.jsonl", [zsre_row(0, rephrase="")]))
    assert record.rephrases == ()


def test_wrong_type_loc_with_empty_answer_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [zsre_row(0, loc=5, loc_ans="")])
    with pytest.raises(EditDataError) as info:
        load_quiet(path)
    assert (info.value.index, info.value.field) == (0, "loc")


def test_bad_cfh_scope(tmp_path):
    rows = [{"edit_statement": "s", "edit_scope": [["q", "a"]]},
            {"edit_statement": "s", "edit_scope": [["q only"]]}]
    with pytest.raises(EditDataError) as info:
        load_records(write_json(tmp_path / "c.json", rows))
    assert (info.value.index, info.value.field) == (1, "edit_scope")


def test_list_with_a_non_object_item(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([GOOD[0], 3]))
    with pytest.raises(EditDataError, match=path_re(path)):
        load_records(path)


def test_top_level_object_is_not_a_record_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": GOOD}, indent=2))
    with pytest.raises(EditDataError, match=path_re(path)):
        load_quiet(path)


def test_list_of_scalars_is_not_a_record_list(tmp_path):
    path = tmp_path / "numbers.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*(object|dict)"):
        load_quiet(path)


def test_rewritten_file_with_same_mtime_is_reread(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"src": "q", "alt": "old"}) + "\n")
    os.utime(path, (1_000_000, 1_000_000))
    assert load_records(path)[0][0].target == "old"
    path.write_text(json.dumps({"src": "q", "alt": "new"}) + "\n")
    os.utime(path, (1_000_000, 1_000_000))  # e.g. `cp -p`, `rsync -t`, `touch -r`
    assert load_records(path)[0][0].target == "new"


def test_on_invalid_skip_returns_good_records_and_errors(tmp_path):
    rows = [GOOD[0], {"src": "q"}, GOOD[2], {"src": "q", "alt": 5}, GOOD[4]]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.warns(UserWarning, match="skipped 2 record"):
        records, skipped = load_records(path, on_invalid="skip")
    assert [r.prompt for r in records] == [GOOD[i]["src"] for i in (0, 2, 4)]
    assert [r.case_id for r in records] == [0, 2, 4]
    assert [(e.index, e.field) for e in skipped] == [(1, "alt"), (3, "alt")]
    assert all(isinstance(e, EditDataError) and e.path == str(path) for e in skipped)


def test_on_invalid_skip_with_nothing_valid(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"src": "q"}, {"src": "r", "alt": ""}])
    with pytest.raises(EditDataError, match=rf"{path_re(path)}.*no valid records"):
        load_quiet(path, on_invalid="skip")


def test_edit_record_validates_required_fields():
    with pytest.raises(EditDataError) as info:
        EditRecord(prompt="q", target="  ", case_id=4)
    assert (info.value.index, info.value.field) == (4, "target")
    rec = EditRecord(prompt="q", target="a", locality=(("p", "x"),))
    assert rec.requested_rewrite()["locality"]["neighborhood"] == {"prompt": ["p"], "ground_truth": ["x"]}
    assert rec.requested_rewrite()["target_new"] == "a"


# ---------------------------------------------------------------------------------------------
# EditDataModule
# ---------------------------------------------------------------------------------------------


def test_datamodule_demo():
    dm = EditDataModule("demo")
    dm.setup()
    assert 30 <= len(dm.records) <= 50
    assert dm.dataset_name == "demo"
    expected, _ = load_records(DEMO_PATH)
    assert [r.prompt for r in dm.records] == [r.prompt for r in expected]
    assert all(isinstance(r, EditRecord) and r.routing_prompt for r in dm.records)


def test_datamodule_ds_size_takes_the_first_n():
    dm = EditDataModule("demo", ds_size=5)
    dm.setup()
    full, _ = load_records(DEMO_PATH)
    assert [r.prompt for r in dm.records] == [r.prompt for r in full[:5]]
    assert [r.case_id for r in dm.records] == [0, 1, 2, 3, 4]


def test_datamodule_ds_size_too_large():
    dm = EditDataModule("demo", ds_size=10_000)
    with pytest.raises(EditDataError, match=r"ds_size=10000.*larger") as info:
        dm.setup()
    assert info.value.path == str(DEMO_PATH)
    assert dm.records == []  # nothing half-loaded


@pytest.mark.parametrize("size", [0, -3])
def test_datamodule_ds_size_not_positive(size):
    with pytest.raises(EditDataError, match="ds_size"):
        EditDataModule("demo", ds_size=size)


def prompts_of(**kwargs) -> list[str]:
    dm = EditDataModule("demo", **kwargs)
    dm.setup()
    return [r.prompt for r in dm.records]


def test_datamodule_shuffle():
    file_order = [r.prompt for r in load_records(DEMO_PATH)[0]]
    assert prompts_of(shuffle=False, seed=3) == file_order
    a, b, c = prompts_of(shuffle=True, seed=1), prompts_of(shuffle=True, seed=1), prompts_of(shuffle=True, seed=2)
    assert a == b
    assert a != c
    assert a != file_order
    assert sorted(a) == sorted(file_order) == sorted(c)
    # ds_size takes the first N after shuffling
    assert prompts_of(shuffle=True, seed=1, ds_size=7) == a[:7]


def test_datamodule_custom_file_and_skip(tmp_path):
    rows = [GOOD[0], {"src": "q"}, GOOD[2]]
    path = write_jsonl(tmp_path / "my_edits.jsonl", rows)
    dm = EditDataModule(str(path))
    assert dm.dataset_name == "my_edits"
    with pytest.raises(EditDataError) as info:
        dm.setup()
    assert (info.value.index, info.value.field) == (1, "alt")
    assert dm.records == []  # nothing half-loaded

    dm = EditDataModule(str(path), on_invalid="skip")
    with pytest.warns(UserWarning):
        dm.setup()
    assert [r.prompt for r in dm.records] == [GOOD[0]["src"], GOOD[2]["src"]]
    assert [(e.index, e.field) for e in dm.skipped] == [(1, "alt")]


def test_train_dataloader_yields_records_one_at_a_time_in_order():
    dm = EditDataModule("demo", ds_size=12, shuffle=True, seed=5)
    items = list(dm.train_dataloader())  # sets up on demand
    assert len(items) == 12
    assert all(isinstance(item, EditRecord) for item in items)
    assert items == dm.records
    assert list(dm.train_dataloader()) == items  # deterministic, not reshuffled per epoch


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "\t\n ", "ok"]))
ANY = st.one_of(TEXT, st.integers(), st.none(), st.lists(TEXT, max_size=3), st.floats(allow_nan=False),
                st.booleans())
ZSRE_ROW = st.fixed_dictionaries(
    {"src": ANY, "alt": ANY},
    optional={"subject": ANY, "rephrase": ANY, "loc": ANY, "loc_ans": ANY, "loc_prompt": ANY})

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_rows(rows, fmt):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        write_jsonl(path, rows)
        return load_quiet(path, format=fmt)


@PROPERTY
@given(rows=st.lists(ZSRE_ROW, min_size=1, max_size=4), fmt=st.sampled_from(["auto", "zsre"]))
def test_property_load_returns_inputs_or_raises_edit_data_error(rows, fmt):
    try:
        records, skipped = _load_rows(rows, fmt)
    except EditDataError:
        return
    assert skipped == []
    assert len(records) == len(rows)
    for record, row in zip(records, rows):
        assert record.prompt == row["src"] and record.target == row["alt"]
        assert isinstance(record.prompt, str) and record.prompt.strip()
        assert isinstance(record.target, str) and record.target.strip()


NONBLANK = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())


@PROPERTY
@given(rows=st.lists(st.fixed_dictionaries({"src": NONBLANK, "alt": NONBLANK},
                                           optional={"rephrase": NONBLANK, "loc": NONBLANK}),
                     min_size=1, max_size=4),
       answer=NONBLANK)
def test_property_valid_rows_always_load(rows, answer):
    rows = [dict(row, loc_ans=answer) if "loc" in row else row for row in rows]
    records, skipped = _load_rows(rows, "auto")
    assert skipped == []
    assert [(r.prompt, r.target) for r in records] == [(row["src"], row["alt"]) for row in rows]
    for record, row in zip(records, rows):
        assert record.rephrases == ((row["rephrase"],) if "rephrase" in row else ())
        assert record.locality == (((row["loc"], answer),) if "loc" in row else ())
