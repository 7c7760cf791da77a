#!/usr/bin/env python
"""Compare editing methods (and ablations) side by side, one lifelong run each.

    python scripts/compare.py --config configs/zsre.yaml --methods wise repair --T 10 100 \
        --ds_size 100 --out runs/compare

Each run is ``scripts/edit.py fit`` with ``--model.method M --T T``; ablations are extra runs
with one REPAIR flag off (``--ablations progressive closed_loop error_feedback
distribution_aware heterogeneous``). Runs land in ``OUT/<name>_T<T>/``; a run whose
``summary.json`` exists is skipped, so an interrupted sweep resumes where it stopped.
``OUT/COMPARISON_SUMMARY.md`` tables every finished run. Extra arguments after ``--`` go to
every run (e.g. ``-- --model.max_steps 40``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ABLATIONS = {
    "progressive": ["--model.progressive", "false"],
    "closed_loop": ["--model.closed_loop", "false"],
    "error_feedback": ["--model.error_feedback", "false"],
    "distribution_aware": ["--model.distribution_aware", "false"],
    "heterogeneous": ["--model.heterogeneous", "true"],
}


def runs(methods, ts, ablations):
    """(name, T, extra CLI args) for every run of the sweep."""
    out = []
    for t in ts:
        out += [(m, t, ["--model.method", m]) for m in methods]
        out += [(f"repair-no-{a}" if a != "heterogeneous" else "repair-heterogeneous", t,
                 ["--model.method", "repair", *ABLATIONS[a]]) for a in ablations]
    return out


def table(out: Path) -> str:
    rows = ["| run | T | n | Rel | Gen | Loc | steps/edit | s/edit | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        p = s["post"]
        rows.append(f"| {path.parent.name.rsplit('_T', 1)[0]} | {s['T']} | {s['n_edits']} | "
                    f"{p.get('rewrite_acc', float('nan')):.3f} | {p.get('rephrase_acc', float('nan')):.3f} | "
                    f"{p.get('locality', float('nan')):.3f} | {s['steps_per_edit']:.1f} | "
                    f"{s['seconds_per_edit']:.2f} | {s.get('n_failed', 0)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/zsre.yaml")
    parser.add_argument("--methods", nargs="+", default=["wise", "repair"])
    parser.add_argument("--T", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--ds_size", type=int, default=None, help="records per run (default: the config's)")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args(argv)

    from repair_pl.cli import EditCLI

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, t, method_args in runs(args.methods, args.T, args.ablations):
        run_dir = out / f"{name}_T{t}"
        if (run_dir / "summary.json").exists():
            print(f"skip {run_dir} (done)")
            continue
        ds = ["--data.ds_size", str(args.ds_size or t)]
        print(f"run {run_dir}", flush=True)
        EditCLI(args=["fit", "--config", args.config, *method_args, "--T", str(t), *ds,
                      "--trainer.default_root_dir", str(run_dir), *extra])
        (out / "COMPARISON_SUMMARY.md").write_text("# Comparison\n\n" + table(out))
    (out / "COMPARISON_SUMMARY.md").write_text("# Comparison\n\n" + table(out))
    print((out / "COMPARISON_SUMMARY.md").read_text())


if __name__ == "__main__":
    main()
