#!/usr/bin/env python
"""A long run's results by block of records in stream order: Rel / Gen / Loc, steps and fit
seconds per record (first edit and re-edits together) and re-edits, then the records split at
``--split`` (ZsRE: test records 0-499, dev records 500-999). A run with ``generation: true`` also
gets the generated columns, plain and under the chat template (docs/evaluation.md).

    python tools/stream_blocks.py runs/stream/zsre/repair_stream_T1000/results.json
    python tools/stream_blocks.py results.json --block 50 --split 500

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repair_pl.lifelong import GEN_KEYS, case_means  # noqa: E402

GENERATED_HEADER = " gen Rel | gen Gen | gen Loc | chat Rel | chat Gen | chat Loc |"


def row(name: str, cases: list[dict], generated: bool = False) -> str:
    """One table row for ``cases`` (entries of a run's ``results.json``)."""
    means = case_means([c["post"] for c in cases])
    edits = [c["edit"] for c in cases]
    n = len(cases)
    line = (f"| {name} | {means.get('rewrite_acc', float('nan')):.3f} | {means.get('rephrase_acc', float('nan')):.3f} | "
            f"{means.get('locality', float('nan')):.3f} | {sum(e['steps'] for e in edits) / n:.1f} | "
            f"{sum(e['seconds'] for e in edits) / n:.2f} | {sum(e.get('retries', 0) for e in edits)} |")
    if generated:
        line += "".join(f" {means.get(key, float('nan')):.3f} |" for key in GEN_KEYS)
    return line


def table(results: list[dict], block: int, split: int | None) -> list[str]:
    generated = "gen" in results[0]["post"]
    lines = ["| records | Rel | Gen | Loc | steps/edit | fit s/edit | re-edits |" + (GENERATED_HEADER if generated else ""),
             "|---|---|---|---|---|---|---|" + ("---|" * len(GEN_KEYS) if generated else "")]
    for start in range(0, len(results), block):
        part = results[start: start + block]
        lines.append(row(f"{start}-{start + len(part) - 1}", part, generated))
    if split is not None:
        for name, part in ((f"case_id < {split}", [c for c in results if int(c["case_id"]) < split]),
                           (f"case_id >= {split}", [c for c in results if int(c["case_id"]) >= split])):
            if part:
                lines.append(row(name, part, generated))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a run's results.json")
    parser.add_argument("--block", type=int, default=100, help="records per block (default 100)")
    parser.add_argument("--split", type=int, default=500, help="case id that splits the records in two (default 500)")
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block must be a positive number of records, got {args.block}")
    with open(args.results) as f:
        results = json.load(f)
    if not results:
        parser.error(f"{args.results} holds no records")
    print("\n".join(table(results, args.block, args.split)))


if __name__ == "__main__":
    main()
