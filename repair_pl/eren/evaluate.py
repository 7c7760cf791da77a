"""Evaluate an :class:`~repair_pl.eren.editor.ErenEditor` by generation, as EREN does.

Questions per record:

- in scope: CounterFact-Hard's ``edit_scope`` questions (the first is the rewrite prompt, the
  others paraphrases); for other formats the edit prompt and its rephrases.
- unrelated: CounterFact-Hard's ``unrelated`` questions (``neighbor_subj``: same relation, other
  subjects; ``same_subj``: same subject, other relations); for other formats the locality prompts.

Metrics (EREN, Chen et al. 2024, Sec. 5):

- Edit Success (ES): share of in-scope questions whose answer matches the new answer.
- Behaviour Preservation (BP): share of unrelated questions whose answer with the notebook
  equals (after normalisation) the unedited model's closed-book answer.
- Edit Quality (EQ): harmonic mean of ES and BP.

Match rule. EREN's released code dumps predictions but not its scorer. We normalise both
strings SQuAD-style (lower case, no punctuation, no articles, single spaces) and count a hit
when the normalised target occurs as a whole-word span of the normalised answer (``contains``,
the default and the reported ES): EREN's Flan-T5 reader emits bare spans, where this equals exact
match, whereas a chat reader answers in sentences ("His native language is English."). Strict
normalised exact match (``em``) is recorded next to it (``rewrite_em``, ``es_em``).
Fact-checking (FEVER) uses ``verdict``: the answer and the label are compared as verdicts
(:func:`~repair_pl.eren.verdict.parse_verdict`), for ES and for BP alike.

Results use the project's shape (see :mod:`repair_pl.lifelong`): per case ``pre``/``post`` with
``rewrite_acc`` (first in-scope question), ``rephrase_acc`` (the rest), ``rewrite_em`` and
``locality.neighborhood_acc`` (1.0 = unrelated answer unchanged), so EREN and REPAIR share one
results table; ``pre`` is the unedited model answering closed-book.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from repair_pl.checkpoint import write_file_atomic
from repair_pl.data.records import EditRecord
from repair_pl.eren.editor import ErenEditor, first_line
from repair_pl.eren.verdict import parse_verdict

GATE_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
"""Retrieval-gate thresholds whose effect every summary reports (see :func:`gate_sweep`)."""
RELATION_THRESHOLDS = (None, 0.2, 0.25, 0.3, 0.35, 0.4)
"""Relation-gate thresholds crossed with :data:`GATE_THRESHOLDS` in every summary (``None``: off)."""
MATCH_RULES = ("contains", "em", "verdict")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(output: str, target: str, rule: str = "contains") -> bool:
    """Whether ``output`` gives ``target``: ``"em"`` (equal after normalisation),
    ``"contains"`` (the normalised target is a whole-word span of the normalised output) or
    ``"verdict"`` (both state the same verdict, SUPPORTS or REFUTES)."""
    if rule == "verdict":
        verdict = parse_verdict(output)
        return verdict is not None and verdict == parse_verdict(target)
    out, gold = normalize_answer(output), normalize_answer(target)
    if rule == "em":
        return out == gold
    if rule == "contains":
        return bool(gold) and f" {gold} " in f" {out} "
    raise ValueError(f"unknown match rule {rule!r}; choose one of {', '.join(MATCH_RULES)}")


def same_answer(before: str, after: str, rule: str = "contains") -> bool:
    """Whether an unrelated question's answer is unchanged (Behaviour Preservation): the same
    verdict under the ``verdict`` rule (also when neither states one), else the same
    normalised text."""
    if rule == "verdict":
        return parse_verdict(before) == parse_verdict(after)
    return normalize_answer(before) == normalize_answer(after)


def record_questions(record: EditRecord, unrelated_per_kind: int | None = None
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(in_scope, unrelated)``: ``[(question, new answer)]`` and ``[(question, kind)]``;
    ``unrelated_per_kind`` keeps only the first that many unrelated questions of each kind."""
    scope = record.meta.get("edit_scope")
    if scope:
        in_scope = [(q, a) for q, a in scope]
    else:
        in_scope = [(record.prompt, record.target)] + [(q, record.target) for q in record.rephrases]
    unrelated_meta = record.meta.get("unrelated")
    if unrelated_meta:
        unrelated = [(q, kind) for kind in sorted(unrelated_meta) for q in unrelated_meta[kind][:unrelated_per_kind]]
    else:
        unrelated = [(q, "loc") for q, _ in record.locality[:unrelated_per_kind]]
    return in_scope, unrelated


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    """EREN's Edit Quality: ``2ab / (a + b)`` (0 when both are 0)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def evaluate_editor(editor: ErenEditor, records: Sequence[EditRecord], dataset: str = "custom",
                    T: int | None = None, rule: str = "contains", slice_records: int = 10,
                    distractors: Sequence[EditRecord] = (), unrelated_per_kind: int | None = None,
                    progress: bool = True, checkpoint: str | Path | None = None) -> tuple[list[dict], dict]:
    """Edit ``T`` records at a time into an empty notebook and answer all their questions.

    Returns ``(cases, summary)``; see the module docstring for the metrics. ``slice_records``
    records' questions are answered per batched call (progress is printed after each).
    ``distractors`` are edited into every notebook too but not evaluated (e.g. to tune prompts
    on a few records against a full-size notebook). ``unrelated_per_kind`` evaluates only the
    first that many unrelated questions of each kind per record (CounterFact-Hard has about 24
    per record; a subsample keeps a run of all records affordable on a CPU).

    ``checkpoint``: a file (:class:`~repair_pl.resume.ProgressLog`) that records every finished
    slice (its cases, the timing, the reader's new cached answers); called again with the same
    arguments, the evaluation resumes after the last finished slice. Removed at the end.
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; choose one of {', '.join(MATCH_RULES)}")
    T = T or len(records)
    if T > len(records):
        raise ValueError(f"T={T} is larger than the {len(records)} records")
    cases: list[dict] = []
    timing = {"edit": 0.0, "pre": 0.0, "post": 0.0, "n_pre": 0, "n_post": 0}
    diag = {"recall": [], "relevant_in": [], "relevant_out": []}
    log, cache = None, getattr(editor.reader, "cache", None)  # a CachedReader's answers
    if checkpoint is not None:
        log = _progress_log(checkpoint, editor, records, T, rule, slice_records, distractors, unrelated_per_kind)
        for entry in log.load():
            cases += entry["cases"]
            timing = entry["timing"]
            if cache is not None:
                cache.update(entry["cache"])
        for case in cases:
            _add_diag(diag, case)
        if cases and progress:
            print(f"[eren] resuming from {checkpoint}: {len(cases)}/{len(records)} records done", file=sys.stderr,
                  flush=True)
    n_cached = len(cache) if cache is not None else 0
    start_all = time.perf_counter()
    for start in range(0, len(records), T):
        chunk = records[start: start + T]
        if start + len(chunk) <= len(cases) and start + T < len(records):  # finished before an interruption
            continue  # (the last chunk's notebook is rebuilt: it is the one the caller keeps)
        editor.reset()
        tick = time.perf_counter()
        editor.edit_many(list(chunk) + [d for d in distractors if d not in chunk])
        timing["edit"] += time.perf_counter() - tick
        for s in range(0, len(chunk), slice_records):
            if start + s < len(cases):
                continue
            part = chunk[s: s + slice_records]
            qs = [record_questions(r, unrelated_per_kind) for r in part]
            flat = [q for ins, out in qs for q in [q for q, _ in ins] + [q for q, _ in out]]
            tick = time.perf_counter()
            pre = editor.closed_book(flat)
            timing["pre"], timing["n_pre"] = timing["pre"] + time.perf_counter() - tick, timing["n_pre"] + len(flat)
            tick = time.perf_counter()
            post = editor.answer_batch(flat)
            timing["post"], timing["n_post"] = timing["post"] + time.perf_counter() - tick, timing["n_post"] + len(flat)
            offset = 0
            for record, (ins, out) in zip(part, qs):
                n_in, n_out = len(ins), len(out)
                case = _case(record, ins, out, pre[offset: offset + n_in + n_out],
                             post[offset: offset + n_in + n_out], rule)
                offset += n_in + n_out
                cases.append(case)
                _add_diag(diag, case)
            if log is not None:
                new = dict(list(cache.items())[n_cached:]) if cache is not None else {}
                log.append({"cases": cases[-len(part):], "timing": timing, "cache": new})
                n_cached += len(new)
            if progress:
                done = len(cases)
                elapsed = time.perf_counter() - start_all
                es, bp = _pooled(cases, "post", "es"), _pooled(cases, "post", "bp")
                print(f"[eren] {done}/{len(records)} records  ES={es:.3f} BP={bp:.3f}  "
                      f"{elapsed:.0f}s elapsed, ~{elapsed / done * (len(records) - done):.0f}s left",
                      file=sys.stderr, flush=True)
    summary = _summary(cases, dataset, T, rule, timing, diag)
    summary["unrelated_per_kind"] = unrelated_per_kind
    if log is not None:
        log.finish()
    return cases, summary


def _add_diag(diag: dict, case: dict) -> None:
    """Retrieval diagnostics of one case (own note retrieved, reader's relevance verdicts)."""
    diag["recall"] += [q["own_note_rank"] is not None for q in case["eren"]["in_scope"]]
    diag["relevant_in"] += [q["relevant"] for q in case["eren"]["in_scope"]]
    diag["relevant_out"] += [q["relevant"] for q in case["eren"]["unrelated"]]


def _progress_log(path, editor: ErenEditor, records, T, rule, slice_records, distractors, unrelated_per_kind):
    """The checkpoint of one evaluation; what must not change between a run and its resumption."""
    import hashlib
    from dataclasses import asdict

    from repair_pl.resume import ProgressLog

    content = repr([(r.case_id, r.prompt, r.target, r.statement, r.rephrases, r.locality, sorted(r.meta.items()))
                    for r in list(records) + list(distractors)])
    return ProgressLog(path, {"T": T, "rule": rule, "slice_records": slice_records, "n_records": len(records),
                              "unrelated_per_kind": unrelated_per_kind, "k": editor.k, "min_score": editor.min_score,
                              "min_relation_score": editor.min_relation_score, "extract": editor.extract,
                              "prompts": asdict(editor.prompts), "encoder": editor.notebook.encoder.name,
                              "records_sha256": hashlib.sha256(content.encode()).hexdigest()})


def _case(record: EditRecord, ins, out, pre: list[str], post, rule: str) -> dict:
    n_in = len(ins)
    own = record.case_id

    def scope_scores(answers: list[str], which: str) -> list[float]:
        return [float(answer_matches(a, t, which)) for a, (_, t) in zip(answers, ins)]

    pre_in, post_in = pre[:n_in], [a.text for a in post[:n_in]]
    unchanged = [float(same_answer(p, a.text, rule)) for p, a in zip(pre[n_in:], post[n_in:])]
    by_kind: dict[str, list[float]] = {}
    for (_, kind), same in zip(out, unchanged):
        by_kind.setdefault(f"{kind}_acc", []).append(same)

    def stage(scores: list[float], em: list[float], kinds: dict[str, list[float]]) -> dict:
        # `out` is grouped by kind, so the kinds' lists concatenated are in question order
        loc = [v for values in kinds.values() for v in values]
        return {"rewrite_acc": scores[:1], "rephrase_acc": scores[1:], "rewrite_em": em,
                "locality": {"neighborhood_acc": loc, **kinds}}

    def trace(answer, question: str, **extra) -> dict:
        ids = [n.meta.get("case_id") for n in answer.notes]
        return {"question": question, **extra, "post": answer.text, "relevant": answer.relevant, "gated": answer.gated,
                "read_output": answer.read_output, "extracted": answer.extracted, "notes": [n.id for n in answer.notes],
                "scores": list(answer.scores), "relation_score": answer.relation_score,
                "own_note_rank": ids.index(own) + 1 if own in ids else None}

    return {
        "case_id": record.case_id,
        "requested_rewrite": {**record.requested_rewrite(), "statement": record.statement},
        # pre: the unedited model against itself, so every unrelated answer is unchanged
        "pre": stage(scope_scores(pre_in, rule), scope_scores(pre_in, "em"),
                     {k: [1.0] * len(v) for k, v in by_kind.items()}),
        "post": stage(scope_scores(post_in, rule), scope_scores(post_in, "em"), by_kind),
        "eren": {"in_scope": [trace(a, q, target=t, pre=p) for a, (q, t), p in zip(post[:n_in], ins, pre_in)],
                 "unrelated": [trace(a, q, kind=k, pre=p, unchanged=bool(u))
                               for a, (q, k), p, u in zip(post[n_in:], out, pre[n_in:], unchanged)]},
    }


def _pooled(cases: list[dict], stage: str, metric: str) -> float:
    if metric == "bp":
        return _mean([v for c in cases for v in c[stage]["locality"]["neighborhood_acc"]])
    key = "rewrite_em" if metric == "es_em" else None
    return _mean([v for c in cases for v in (c[stage][key] if key else
                                             c[stage]["rewrite_acc"] + c[stage]["rephrase_acc"])])


def _passes(q: dict, min_score: float | None, min_relation_score: float | None) -> bool:
    """Whether a traced question gets past the gates (and was not gated in its run)."""
    if q.get("gated", False) or not q["scores"]:
        return False
    if min_score is not None and q["scores"][0] < min_score:
        return False
    relation = q.get("relation_score")
    return min_relation_score is None or relation is None or relation >= min_relation_score


def answer_as_if(q: dict, min_score: float | None = None, min_relation_score: float | None = None,
                 extract: bool | None = None) -> str:
    """The answer a traced question would get had the editor run with these gates (the closed-book
    ``pre`` answer when gated) and, with ``extract=False``, without the extractive step."""
    if not _passes(q, min_score, min_relation_score):
        return q["pre"]
    if extract is False and q.get("extracted"):
        return first_line(q["read_output"] or "")
    return q["post"]


def gate_sweep(cases: list[dict], thresholds: Sequence[float], rule: str = "contains",
               relation_thresholds: Sequence[float | None] = (None,), extract: bool | None = None) -> dict[str, dict]:
    """ES/BP/EQ had the editor run with ``min_score=t`` (and ``min_relation_score=r``) for each
    pair, from the traces; keys ``"t"`` or ``"t/r"`` (``"-"`` for ``t=None``).

    Exact, not an estimate, for gates at least as tight as the run's own: a gate only sends a
    question closed-book (its ``pre`` answer); every other question is read exactly as it was.
    ``extract=False``: as if the extractive step were off (the reader's own answer).
    """
    sweep = {}
    for t in thresholds:
        for r in relation_thresholds:
            es = _mean([float(answer_matches(answer_as_if(q, t, r, extract), q["target"], rule))
                        for c in cases for q in c["eren"]["in_scope"]])
            bp = _mean([float(same_answer(q["pre"], answer_as_if(q, t, r, extract), rule))
                        for c in cases for q in c["eren"]["unrelated"]])
            key = ("-" if t is None else f"{t:g}") + ("" if r is None else f"/{r:g}")
            sweep[key] = {"es": es, "bp": bp, "eq": harmonic_mean(es, bp)}
    return sweep


def failure_breakdown(cases: list[dict], rule: str = "contains", min_score: float | None = None,
                      min_relation_score: float | None = None) -> dict:
    """Why questions fail, from the traces in ``cases`` (as if run with these gates).

    In scope (the new answer is not given): ``retrieval_miss`` (the record's own note is not
    among the retrieved ones), ``gated`` (a gate sent it closed-book), ``judged_irrelevant``
    (the reader said the notes do not answer it), ``wrong_answer`` (answered from the notes,
    but not with the new answer); ``extraction`` holds the shares the extractive step made
    right (``fixed``) and wrong (``broke``). Unrelated (the answer changed): ``judged_relevant``
    (answered from the notes) and ``changed_after_fallback`` (closed-book differed: should not
    happen, greedy decoding), and the share changed per kind. Shares are of all in-scope /
    all unrelated questions (per kind: of that kind's questions).
    """
    ins = [q for c in cases for q in c["eren"]["in_scope"]]
    outs = [q for c in cases for q in c["eren"]["unrelated"]]
    miss = {"retrieval_miss": 0, "gated": 0, "judged_irrelevant": 0, "wrong_answer": 0}
    extraction = {"fixed": 0, "broke": 0}
    for q in ins:
        answer = answer_as_if(q, min_score, min_relation_score)
        hit = answer_matches(answer, q["target"], rule)
        if q.get("extracted") and _passes(q, min_score, min_relation_score):
            own = answer_matches(answer_as_if(q, min_score, min_relation_score, extract=False), q["target"], rule)
            extraction["fixed"] += hit and not own
            extraction["broke"] += own and not hit
        if hit:
            continue
        key = ("retrieval_miss" if q["own_note_rank"] is None else
               "gated" if not _passes(q, min_score, min_relation_score) else
               "wrong_answer" if q["relevant"] else "judged_irrelevant")
        miss[key] += 1
    changed = {"judged_relevant": 0, "changed_after_fallback": 0}
    by_kind: dict[str, list[float]] = {}
    for q in outs:
        answer = answer_as_if(q, min_score, min_relation_score)
        moved = not same_answer(q["pre"], answer, rule)
        by_kind.setdefault(q.get("kind", "loc"), []).append(float(moved))
        if moved:
            relevant = q["relevant"] and _passes(q, min_score, min_relation_score)
            changed["judged_relevant" if relevant else "changed_after_fallback"] += 1
    return {"in_scope": {k: v / max(len(ins), 1) for k, v in miss.items()},
            "unrelated": {k: v / max(len(outs), 1) for k, v in changed.items()},
            "extraction": {k: v / max(len(ins), 1) for k, v in extraction.items()},
            "unrelated_changed_by_kind": {k: _mean(v) for k, v in sorted(by_kind.items())},
            "n_in_scope": len(ins), "n_unrelated": len(outs), "min_score": min_score,
            "min_relation_score": min_relation_score}


def _summary(cases: list[dict], dataset: str, T: int, rule: str, timing: dict, diag: dict) -> dict:
    from repair_pl.lifelong import case_means

    n = len(cases)
    es, bp = _pooled(cases, "post", "es"), _pooled(cases, "post", "bp")
    kinds = sorted({k for c in cases for k in c["post"]["locality"] if k != "neighborhood_acc"})
    return {
        "method": "eren", "dataset": dataset, "T": T, "n_edits": n, "match": rule,
        "pre": case_means([c["pre"] for c in cases]), "post": case_means([c["post"] for c in cases]),
        "es": es, "bp": bp, "eq": harmonic_mean(es, bp), "es_em": _pooled(cases, "post", "es_em"),
        "pre_es": _pooled(cases, "pre", "es"),
        **{f"bp_{k.removesuffix('_acc')}": _mean([v for c in cases for v in c["post"]["locality"].get(k, [])])
           for k in kinds},
        "retrieval_recall": _mean([float(x) for x in diag["recall"]]),
        "relevant_rate_in_scope": _mean([float(x) for x in diag["relevant_in"]]),
        "relevant_rate_unrelated": _mean([float(x) for x in diag["relevant_out"]]),
        "gate_sweep": gate_sweep(cases, GATE_THRESHOLDS, rule, RELATION_THRESHOLDS),
        "failures": failure_breakdown(cases, rule),
        "n_queries": timing["n_post"],
        "seconds_per_edit": timing["edit"] / max(n, 1),
        "seconds_per_query": timing["post"] / max(timing["n_post"], 1),
        "seconds_per_closed_book_query": timing["pre"] / max(timing["n_pre"], 1),
        "steps_per_edit": 0.0, "n_failed": 0,
    }


def _markdown(summary: dict, extra: dict | None = None) -> str:
    keys = ("rewrite_acc", "rephrase_acc", "locality")
    rows = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for stage in ("pre", "post"):
        rows.append(f"| {stage} | " + " | ".join(f"{summary[stage].get(k, float('nan')):.4f}" for k in keys) + " |")
    lines = [f"# eren on {summary['dataset']} (T={summary['T']}, {summary['n_edits']} edits)", "",
             *rows, "",
             f"ES {100 * summary['es']:.1f} / BP {100 * summary['bp']:.1f} / EQ {100 * summary['eq']:.1f} "
             f"(match: {summary['match']}; ES by exact match {100 * summary['es_em']:.1f}; "
             f"closed-book ES {100 * summary['pre_es']:.1f})", "",
             f"retrieval recall@k {100 * summary['retrieval_recall']:.1f}; notes judged relevant on "
             f"{100 * summary['relevant_rate_in_scope']:.1f}% of in-scope and "
             f"{100 * summary['relevant_rate_unrelated']:.1f}% of unrelated questions", "",
             f"seconds per query {summary['seconds_per_query']:.3f} ({summary['n_queries']} queries); "
             f"closed-book {summary['seconds_per_closed_book_query']:.3f}; per edit {summary['seconds_per_edit']:.4f}"]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, cases: list[dict], summary: dict, extra: dict | None = None) -> Path:
    """Write ``results.json``, ``summary.md`` and last ``summary.json`` (a sweep takes it as "this
    run is done") into ``out_dir``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "results.json", json.dumps(cases, indent=1, ensure_ascii=False))
    write_file_atomic(out / "summary.md", _markdown(summary, extra))
    write_file_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return out
