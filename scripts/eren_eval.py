#!/usr/bin/env python3
"""Evaluate EREN (edit by reading notes) with the embedded SmolLM2 reader.

Examples::

    python scripts/eren_eval.py --data cfh --n 200 --out runs/eren_cfh
    python scripts/eren_eval.py --data zsre --n 100 --out runs/eren_zsre
    python scripts/eren_eval.py --data cfh --n 20 --offset 200 --out runs/dev   # prompt tuning slice
    python scripts/eren_eval.py --bench-index                                   # retrieval speed at 10k notes
    python scripts/eren_eval.py --bench-notebook                                # add 10k notes (MiniLM) + query
    python scripts/eren_eval.py --analyze runs/eren_cfh --min-score 0.7         # why questions fail
    python scripts/eren_eval.py --analyze runs/dev --grid --no-extract          # ES/BP/EQ for every gate pair

Defaults come from ``configs/eren_<data>.yaml``; the flags override them. Writes
``results.json``, ``summary.json``, ``summary.md`` and the notebook under ``--out`` and prints
ES/BP/EQ, Rel/Gen/Loc and seconds per query.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = {"cfh": "eren/cfh_filtered.json", "zsre": "zsre/zsre_edit_1000.json", "fever": "eren/fever_filtered_small.json"}


def data_path(name: str) -> str:
    """The project's data/ copy when present, else the shared folder beside the repository."""
    for base in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (base / DATA[name]).exists():
            return str(base / DATA[name])
    raise SystemExit(f"no {DATA[name]} under data/ or ../shared/data: run scripts/get_data.py")


def bench_index(n: int = 10_000, dim: int = 384, k: int = 5) -> None:
    import torch

    from repair_pl.eren.retrieval import VectorIndex

    index = VectorIndex(dim)
    for _ in range(n // 1000):  # incremental adds, as edits arrive
        index.add(torch.nn.functional.normalize(torch.randn(1000, dim), dim=-1))
    for batch in (1, 64):
        queries = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
        index.search(queries, k)
        tick, reps = time.perf_counter(), 50
        for _ in range(reps):
            index.search(queries, k)
        ms = (time.perf_counter() - tick) / reps / batch * 1000
        print(f"top-{k} of {len(index)} x {dim}, batch {batch}: {ms:.3f} ms/query "
              f"({torch.get_num_threads()} thread(s))")


def bench_notebook(n: int = 10_000, k: int = 5, encoder: str | None = None) -> None:
    """Time a real notebook: add ``n`` notes 1000 at a time (encoder included), then answer
    retrieval queries one at a time (question encoding + top-k), and check the hits."""
    import random

    import torch

    from repair_pl.eren.notebook import Notebook
    from repair_pl.eren.retrieval import load_encoder

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pi", "quan", "zu", "bex", "nor", "ti"]
    relations = ["{s} was born in {o}.", "{s} works as a {o}.", "The headquarters of {s} are in {o}.",
                 "{s} plays the {o}.", "{s}'s mother tongue is {o}.", "{s} is a citizen of {o}."]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(3)).capitalize()

    subjects = [f"{word()} {word()}" for _ in range(n)]
    notes = [rng.choice(relations).format(s=s, o=word()) for s in subjects]
    book = Notebook(load_encoder(encoder))
    tick = time.perf_counter()
    for start in range(0, n, 1000):  # incremental adds, as edits arrive
        book.add_many(notes[start: start + 1000])
    added = time.perf_counter() - tick
    probes = rng.sample(range(n), 50)
    tick = time.perf_counter()
    hits = [book.search([f"What do you know about {subjects[i]}?"], k)[0] for i in probes]
    per_query = (time.perf_counter() - tick) / len(probes)
    found = sum(any(note.text == notes[i] for note, _ in row) for i, row in zip(probes, hits))
    print(f"notebook of {len(book)} notes ({book.encoder.name}): added in {added:.1f} s "
          f"({added / n * 1000:.2f} ms/note); one query (encode + top-{k}) {per_query * 1000:.1f} ms; "
          f"own note in top-{k} for {found}/{len(probes)} probes ({torch.get_num_threads()} thread(s))")


def analyze(folder: str, min_score: float | None, min_relation_score: float | None = None,
            extract: bool | None = None, grid: bool = False, records: str | None = None) -> dict:
    """ES/BP/EQ of a finished run as if run with the gates ``min_score`` / ``min_relation_score``
    (and, with ``extract=False``, without the extractive step), exact from its traces, and the
    share of questions lost at each step. ``grid``: print ES/BP/EQ for every pair of gate
    thresholds. ``records``: only the cases whose position in the run is in ``"A-B"``."""
    import json

    from repair_pl.eren.evaluate import GATE_THRESHOLDS, RELATION_THRESHOLDS, failure_breakdown, gate_sweep

    cases = json.loads((Path(folder) / "results.json").read_text())
    if records:
        first, last = (int(x) for x in records.split("-"))
        cases = cases[first: last + 1]
    rule = json.loads((Path(folder) / "summary.json").read_text()).get("match", "contains")
    if grid:
        sweep = gate_sweep(cases, GATE_THRESHOLDS, rule, RELATION_THRESHOLDS, extract)
        print("min_score/min_relation_score: ES BP EQ")
        for key, v in sweep.items():
            print(f"  {key:>9}: {100 * v['es']:.1f} {100 * v['bp']:.1f} {100 * v['eq']:.1f}")
    breakdown = failure_breakdown(cases, rule, min_score, min_relation_score)
    gated = gate_sweep(cases, [min_score], rule, [min_relation_score], extract)
    (scores,) = gated.values()
    print(f"{len(cases)} records; with min_score {min_score}, min_relation_score {min_relation_score}"
          f"{', extract off' if extract is False else ''}: ES {100 * scores['es']:.1f}  BP {100 * scores['bp']:.1f}  "
          f"EQ {100 * scores['eq']:.1f}")
    print(f"in-scope questions not answered with the new answer ({breakdown['n_in_scope']}): " +
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in breakdown["in_scope"].items()))
    print("extractive step: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in breakdown["extraction"].items()))
    print(f"unrelated questions whose answer changed ({breakdown['n_unrelated']}): " +
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in breakdown["unrelated"].items()) + "; by kind: " +
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in breakdown["unrelated_changed_by_kind"].items()))
    return {**breakdown, "scores": scores}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), default="cfh")
    parser.add_argument("--n", type=int, default=None, help="records (default: the config's ds_size)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many records first")
    parser.add_argument("--T", type=int, default=None, help="edits per notebook (default: the config's T, else n)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/eren_<data>)")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/eren_<data>.yaml)")
    parser.add_argument("--model", default=None, help="reader model (default: the config's, smollm2)")
    parser.add_argument("--encoder", default=None, help="encoder: default, hash, or a sentence-transformers folder")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--unrelated-per-kind", type=int, default=None,
                        help="evaluate only the first N unrelated questions of each kind per record")
    parser.add_argument("--min-score", type=float, default=None, help="retrieval gate (default: the config's)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--prompt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a prompt field (read, closed_book, note, best_last, ...); YAML value")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--bench-index", action="store_true", help="only time retrieval at 10k notes")
    parser.add_argument("--analyze", metavar="RUN_DIR", default=None,
                        help="only break down a finished run's failures (with --min-score / --min-relation-score: "
                             "as if gated)")
    parser.add_argument("--min-relation-score", type=float, default=None,
                        help="relation gate (default: the config's; with --analyze: none)")
    parser.add_argument("--no-extract", action="store_true",
                        help="with --analyze: as if without the extractive step; else: switch it off")
    parser.add_argument("--grid", action="store_true", help="with --analyze: ES/BP/EQ for every pair of gate thresholds")
    parser.add_argument("--records", default=None, metavar="A-B",
                        help="with --analyze: only the run's cases A to B (positions in the run, inclusive)")
    parser.add_argument("--bench-notebook", action="store_true",
                        help="only time adding 10k notes with the encoder (--encoder) and querying them")
    args = parser.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    if args.bench_index:
        bench_index()
        return None
    if args.analyze:
        return analyze(args.analyze, args.min_score, args.min_relation_score, False if args.no_extract else None,
                       args.grid, args.records)
    if args.bench_notebook:
        bench_notebook(encoder=args.encoder)
        return None
    from repair_pl.eren.run import run_config

    config = Path(args.config) if args.config else ROOT / "configs" / f"eren_{args.data}.yaml"
    cfg = yaml.safe_load(config.read_text()) if config.exists() else {}
    model, data = cfg.setdefault("model", {}), cfg.setdefault("data", {})
    data["path"] = data_path(args.data)
    data["offset"] = args.offset
    if args.n is not None:
        data["ds_size"] = args.n
    if args.unrelated_per_kind is not None:
        data["unrelated_per_kind"] = args.unrelated_per_kind
    cfg["T"] = args.T if args.T is not None else cfg.get("T")
    if cfg["T"] is not None and data.get("ds_size") is not None:
        cfg["T"] = min(cfg["T"], data["ds_size"])
    for key, value in (("model", args.model), ("encoder", args.encoder), ("k", args.k),
                       ("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size),
                       ("min_score", args.min_score), ("min_relation_score", args.min_relation_score)):
        if value is not None:
            model[key] = value
    if args.no_extract:
        model["extract"] = False
    for item in args.prompt:
        key, _, value = item.partition("=")
        model.setdefault("prompts", {})[key] = yaml.safe_load(value) if key == "best_last" else value
    cfg.setdefault("trainer", {})["default_root_dir"] = args.out or f"runs/eren_{args.data}"
    tick = time.perf_counter()
    summary = run_config(cfg)
    post = summary["post"]
    print(f"eren on {args.data}: {summary['n_edits']} edits (T={summary['T']}), reader {summary['reader']}, "
          f"encoder {summary['encoder']}, k={summary['k']}")
    print(f"  ES {100 * summary['es']:.1f}  BP {100 * summary['bp']:.1f}  EQ {100 * summary['eq']:.1f}  "
          f"(ES exact match {100 * summary['es_em']:.1f}; closed-book ES {100 * summary['pre_es']:.1f})")
    print(f"  Rel {post.get('rewrite_acc', float('nan')):.4f}  Gen {post.get('rephrase_acc', float('nan')):.4f}  "
          f"Loc {post.get('locality', float('nan')):.4f}")
    print(f"  retrieval recall@k {100 * summary['retrieval_recall']:.1f}; relevant on "
          f"{100 * summary['relevant_rate_in_scope']:.1f}% in-scope / {100 * summary['relevant_rate_unrelated']:.1f}% "
          f"unrelated")
    print(f"  {summary['seconds_per_query']:.3f} s/query ({summary['n_queries']} queries), closed-book "
          f"{summary['seconds_per_closed_book_query']:.3f} s/query; total {time.perf_counter() - tick:.0f} s")
    print(f"  written to {cfg['trainer']['default_root_dir']}")
    return summary


if __name__ == "__main__":
    main()
