"""Loaders for the editing benchmarks' file formats, all producing :class:`EditRecord`.

Formats (``format=`` argument; ``"auto"`` detects from the first record's keys):

- ``zsre`` (alias ``custom``): WISE ZsRE and this project's custom format. One JSON list or JSONL,
  each record ``{"src", "alt", "subject"?, "rephrase"? (str or list), "loc"?, "loc_ans"?,
  "loc_prompt"?}``. ``loc``/``loc_ans`` must come together; ``loc_prompt`` is the out-of-scope
  text used by the routing loss.
- ``easyedit`` (aliases ``counterfact``, ``hallucination``, ``temporal``): EasyEdit/WISE records
  ``{"prompt", "target_new", "subject"?, "rephrase_prompt"?, "ood_rephrase"?, "ground_truth"?,
  "locality_prompt"?, "locality_ground_truth"?}``.
- ``cfh``: EREN CounterFact-Hard ``{"edit_statement", "subject_name", "edit_scope": [[q, a], ...],
  "edit_scope_true_ans", "unrelated": {...}, "unrelated_true_ans": {...}}``.
- ``fever``: EREN FEVER fact-checking ``{"id"?, "edit_statement", "edit_scope": [[claim, "yes"|"no"],
  ...]}``. The file holds the edits, then as many out-of-scope records (EREN's split): record
  ``i`` of the first half is an edit whose in-scope claims are its ``edit_scope`` (labels
  become ``SUPPORTS``/``REFUTES``: does the claim hold given the edit?), and the claims of record
  ``i + n/2`` are its out-of-scope claims (``meta["unrelated"]["out_of_scope"]``, judged
  against the unedited model). One record per edit is returned. ``edit_scope_true_ans`` is not
  read (in EREN's file it does not line up with ``edit_scope`` in 1287 of 2048 records).

Validation: required fields (the prompt and the new answer) must be non-empty strings; an
optional field given as an empty string counts as absent (WISE Hallucination has 7 records with an
empty locality answer: they simply have no locality pair); any other wrong type is an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from repair_pl.data.records import EditDataError, EditRecord

_Row = Mapping[str, Any]


class _Fields:
    """Typed access to one raw record; every failure names file, record and field."""

    def __init__(self, row: _Row, path: str, index: int):
        self.row, self.path, self.index = row, path, index

    def error(self, field: str, message: str) -> EditDataError:
        return EditDataError(message, self.path, self.index, field)

    def text(self, field: str, required: bool = False) -> str | None:
        value = self.row.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing (required)")
            return None
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            if required:
                raise self.error(field, "is an empty string")
            return None  # optional and empty: treated as absent (WISE Hallucination has such records)
        return value

    def texts(self, field: str) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple (missing -> empty)."""
        value = self.row.get(field)
        if value is None:
            return ()
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise self.error(field, f"must be a string or a list of strings, got {value!r}")
        return tuple(v for v in values if v.strip())  # empty entries count as absent

    def pair(self, prompt_field: str, answer_field: str) -> tuple[tuple[str, str], ...]:
        prompt, answer = self.text(prompt_field), self.text(answer_field)  # type-checks both
        if any(isinstance(self.row.get(f), str) and not self.row[f].strip() for f in (prompt_field, answer_field)):
            return ()  # an empty prompt or answer: nothing to measure on
        if (prompt is None) != (answer is None):
            missing = answer_field if answer is None else prompt_field
            raise self.error(missing, f"missing while {prompt_field!r}/{answer_field!r} must come together")
        return ((prompt, answer),) if prompt is not None else ()


def _zsre(f: _Fields) -> EditRecord:
    return EditRecord(prompt=f.text("src", True), target=f.text("alt", True), subject=f.text("subject") or "",
                      rephrases=f.texts("rephrase"), locality=f.pair("loc", "loc_ans"),
                      routing_prompt=f.text("loc_prompt"), ground_truth=f.text("pred"), case_id=f.index)


def _easyedit(f: _Fields) -> EditRecord:
    ground_truth = f.row.get("ground_truth")
    if isinstance(ground_truth, list):  # some EasyEdit files store ["old answer"]
        ground_truth = ground_truth[0] if ground_truth else None
        f = _Fields({**f.row, "ground_truth": ground_truth}, f.path, f.index)
    case_id = f.row.get("case_id", f.index)
    return EditRecord(prompt=f.text("prompt", True), target=f.text("target_new", True),
                      subject=f.text("subject") or "", rephrases=f.texts("rephrase_prompt"),
                      locality=f.pair("locality_prompt", "locality_ground_truth"),
                      ood_rephrases=f.texts("ood_rephrase"), ground_truth=f.text("ground_truth"),
                      case_id=case_id if isinstance(case_id, int) else f.index)


def _qa_list(f: _Fields, field: str, value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p) for p in value):
        raise f.error(field, "must be a non-empty list of [question, answer] string pairs")
    return [tuple(p) for p in value]


class UneditableRecord(EditDataError):
    """A well-formed record that holds nothing to edit; always skipped (and reported) by loaders."""


def _cfh(f: _Fields) -> EditRecord:
    if f.row.get("edit_scope") == []:  # 8 of the 1024 published records have no question
        raise UneditableRecord("edit_scope is empty: the record has no question to edit or test",
                               f.path, f.index, "edit_scope")
    scope = _qa_list(f, "edit_scope", f.row.get("edit_scope"))
    unrelated, answers = f.row.get("unrelated") or {}, f.row.get("unrelated_true_ans") or {}
    if not isinstance(unrelated, Mapping) or not isinstance(answers, Mapping):
        raise f.error("unrelated", "must be an object of question lists")
    locality = []
    for kind in sorted(unrelated):
        questions, truths = unrelated[kind] or [], answers.get(kind) or []
        # In the published file `same_subj` answers do not line up with the questions (947 of
        # 1024 records); only aligned lists become teacher-forced locality pairs. EREN's own
        # Behaviour Preservation needs no true answers: all questions stay in `meta`.
        if len(questions) == len(truths):
            locality += list(zip(questions, truths))
    true_answers = f.texts("edit_scope_true_ans")
    return EditRecord(prompt=scope[0][0], target=scope[0][1], subject=f.text("subject_name") or "",
                      rephrases=tuple(q for q, _ in scope[1:]), locality=tuple(locality),
                      statement=f.text("edit_statement", True),
                      ground_truth=true_answers[0] if true_answers else None,
                      case_id=f.row.get("id", f.index) if isinstance(f.row.get("id"), int) else f.index,
                      meta={"edit_scope": scope, "edit_scope_true_ans": list(true_answers),
                            "unrelated": {k: list(v or []) for k, v in unrelated.items()},
                            "unrelated_true_ans": {k: list(v or []) for k, v in answers.items()}})


def _fever(f: _Fields) -> EditRecord:
    from repair_pl.eren.verdict import LABELS

    if f.row.get("edit_scope") == []:
        raise UneditableRecord("edit_scope is empty: the record has no claim to check", f.path, f.index,
                               "edit_scope")
    scope = _qa_list(f, "edit_scope", f.row.get("edit_scope"))
    for number, (_, label) in enumerate(scope):
        if label.strip().lower() not in LABELS:
            raise f.error("edit_scope", f"claim {number} has label {label!r}; expected 'yes' or 'no'")
    claims = [(claim, LABELS[label.strip().lower()]) for claim, label in scope]
    return EditRecord(prompt=claims[0][0], target=claims[0][1], rephrases=tuple(c for c, _ in claims[1:]),
                      statement=f.text("edit_statement", True),
                      case_id=f.row.get("id", f.index) if isinstance(f.row.get("id"), int) else f.index,
                      meta={"edit_scope": claims, "row": f.index})


def pair_fever_halves(records: list[EditRecord], n_rows: int, path: str) -> list[EditRecord]:
    """The edits of a FEVER file (its first half), each with the claims of the record half a
    file later as its out-of-scope claims (an edit whose partner was skipped has none)."""
    if n_rows % 2:
        raise EditDataError(f"a FEVER file holds its edits, then as many out-of-scope records; "
                            f"{n_rows} records cannot be split in two halves", path)
    half = n_rows // 2
    by_row = {r.meta["row"]: r for r in records}
    pairs = []
    for row in range(half):
        if row in by_row:
            partner = by_row.get(row + half)
            claims = [c for c, _ in partner.meta["edit_scope"]] if partner is not None else []
            edit = by_row[row]
            pairs.append(replace(edit, meta={**edit.meta, "unrelated": {"out_of_scope": claims},
                                             "out_of_scope_row": row + half}))
    return pairs


FORMATS: dict[str, Callable[[_Fields], EditRecord]] = {
    "zsre": _zsre, "custom": _zsre, "easyedit": _easyedit, "counterfact": _easyedit,
    "hallucination": _easyedit, "temporal": _easyedit, "cfh": _cfh, "fever": _fever,
}


def _is_fever(row: _Row) -> bool:
    """EREN's FEVER rows: edit_scope labels all yes/no, no CounterFact-Hard fields."""
    scope = row.get("edit_scope")
    return ("subject_name" not in row and "unrelated" not in row and isinstance(scope, list) and bool(scope)
            and all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], str)
                    and p[1].strip().lower() in ("yes", "no") for p in scope))


def detect_format(row: _Row) -> str:
    """Guess the format from one record's keys."""
    if _is_fever(row):
        return "fever"
    if "edit_statement" in row or "edit_scope" in row:
        return "cfh"
    if "src" in row or "alt" in row:
        return "zsre"
    if "prompt" in row or "target_new" in row:
        return "easyedit"
    raise EditDataError(f"cannot tell the format from the keys {sorted(row)}; expected ZsRE/custom "
                        f"('src', 'alt'), EasyEdit ('prompt', 'target_new') or CounterFact-Hard ('edit_scope')",
                        index=0)


def _diagnose(path: Path, text: str) -> EditDataError:
    """Explain why ``text`` is not a JSON list of objects nor JSON lines of objects."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return EditDataError(f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}", str(path))
        return EditDataError("could not read the JSON list", str(path))
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return EditDataError(f"malformed JSON on line {number}, column {err.colno}: {err.msg}", str(path))
            if not isinstance(value, dict):
                return EditDataError(f"line {number} is a {type(value).__name__}, expected a JSON object", str(path))
    return EditDataError("not a JSON list of objects nor JSON lines of objects", str(path))


def read_rows(path: str | Path) -> list[dict]:
    """Read a JSON list or JSONL file of objects through ``datasets``, with clear errors."""
    path = Path(path)
    if not path.is_file():
        hint = " (run `python scripts/get_data.py` to fill data/)" if "data" in path.parts else ""
        raise EditDataError(f"file not found{hint}", str(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise EditDataError("file is empty", str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise EditDataError(f"not UTF-8 text (bad byte at line {line}, offset {err.start})", str(path)) from None
    stripped = text.lstrip()
    if not stripped.startswith(("[", "{")):
        raise _diagnose(path, text)
    if stripped.startswith("[") and stripped[1:].strip().startswith("]"):
        raise EditDataError("holds an empty list: no records", str(path))
    import datasets

    datasets.disable_progress_bars()
    import logging

    quiet = logging.getLogger("datasets")  # it logs its own parse error; ours (below) names line and column
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        # force_redownload: datasets keys its cache on path + mtime only, so a file rewritten
        # with the same mtime (cp -p, rsync -t) would silently return the old records.
        rows = datasets.load_dataset("json", data_files=str(path), split="train",
                                     download_mode="force_redownload").to_list()
    except Exception as err:  # datasets wraps parse errors in several exception types
        raise _diagnose(path, text) from err
    finally:
        quiet.setLevel(level)
    if stripped.startswith("["):  # datasets wraps non-object items as {"text": item}: check the source
        first = json.loads(text)[0] if len(text) < 50_000_000 else {}
        if not isinstance(first, dict):
            raise EditDataError(f"expected a list of JSON objects, but item 0 is a {type(first).__name__}",
                                str(path), 0)
    return rows


def load_records(source: str | Path, format: str = "auto", on_invalid: str = "raise",
                 split: str = "train") -> tuple[list[EditRecord], list[EditDataError]]:
    """Load edit records from a file (JSON list or JSONL) or, when online, a hub dataset id.

    Returns ``(records, skipped)``. With ``on_invalid="raise"`` (default) the first bad record
    raises :class:`EditDataError` and nothing is returned; with ``"skip"`` bad records are left
    out and their errors returned in ``skipped``. Records that are well formed but hold nothing
    to edit (:class:`UneditableRecord`) are always skipped and listed in ``skipped``.
    """
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if format != "auto" and format not in FORMATS:
        raise EditDataError(f"unknown format {format!r}; choose 'auto' or one of {sorted(FORMATS)}")
    path = Path(source)
    if path.suffix in (".json", ".jsonl") or path.exists() or str(source).count("/") != 1:
        rows, name = read_rows(path), str(path)
    else:  # a hub id "owner/name": only works with internet access
        import datasets

        rows, name = datasets.load_dataset(str(source), split=split).to_list(), str(source)
    try:
        format = detect_format(rows[0]) if format == "auto" else format
    except EditDataError as err:
        raise EditDataError(str(err).split(": ", 1)[-1], name, 0) from None
    convert = FORMATS[format]
    records, skipped = [], []
    for index, row in enumerate(rows):
        try:
            records.append(convert(_Fields(row, name, index)))
        except EditDataError as err:
            if on_invalid == "raise" and not isinstance(err, UneditableRecord):
                raise
            skipped.append(err)
    if format == "fever":
        records = pair_fever_halves(records, len(rows), name)
    if skipped:
        import warnings

        warnings.warn(f"{name}: skipped {len(skipped)} record(s), first: {skipped[0]}", stacklevel=2)
    if not records:
        raise EditDataError("no valid records", name)
    return records, skipped
