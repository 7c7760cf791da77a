#!/usr/bin/env python
"""Compare editing methods across datasets and numbers of edits, one lifelong run each.

    python scripts/compare.py --datasets zsre temporal --T 10 50 --methods repair wise ft_l grace --out runs/sweep_small

Each dataset name maps to configs/<name>.yaml (or give a .yaml path); T values larger than a
dataset are skipped with a note. Run i lands in OUT/<dataset>/<method>_T<T>/ (results.json,
summary.json, ...); a run whose summary.json exists is skipped, so rerunning the same command
after an interruption finishes only the missing runs (delete a run's folder to redo it).
Ablations are extra REPAIR runs with one component off (--ablations progressive closed_loop
error_feedback distribution_aware heterogeneous). OUT/COMPARISON_SUMMARY.md tables every finished
run; OUT/<dataset>_metrics_vs_T.png and OUT/locality_vs_T.png plot them (needs matplotlib).
--wandb logs every run to W&B (configs/wandb.yaml; offline unless WANDB_MODE is set), one group
per sweep. --jobs N runs N at a time, each in its own process with its share of the CPU threads
(output in the run's folder, run.log). Arguments after `--` go to every run (e.g. `-- --model.max_steps 40`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repair_pl.sweep import ABLATIONS, DATASETS, TS, SweepError, collect, default_methods, find_config, plan  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS),
                        help="names of configs/<name>.yaml, or .yaml paths (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=default_methods(),
                        help="repair, eren, or the name of an overlay configs/methods/<name>.yaml (default: %(default)s)")
    parser.add_argument("--T", nargs="+", type=int, default=list(TS), help="edits per run (default: %(default)s)")
    parser.add_argument("--ds_size", type=int, default=None, help="records per run (default: T, one lifelong chunk)")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    parser.add_argument("--model", default=None, help="model.model for every run (e.g. tiny-random)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process with its share of the torch threads and its "
                             "output in <run folder>/run.log (default: 1, in this process)")
    parser.add_argument("--wandb", action="store_true", help="log every run to W&B (configs/wandb.yaml)")
    parser.add_argument("--wandb_project", default=None, help="W&B project (default: configs/wandb.yaml's)")
    parser.add_argument("--wandb_group", default=None, help="W&B group (default: the name of --out)")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(list(sys.argv[1:] if argv is None else argv))
    from repair_pl.data import EditDataError
    from repair_pl.plots import plot_sweep
    from repair_pl.sweep import failure_notes, run_sweep, write_comparison

    out = Path(args.out)
    try:
        runs, notes = plan(args.datasets, args.methods, args.T, args.ablations, args.ds_size)
        wandb = None
        if args.wandb:
            wandb = {"config": find_config("wandb"), "group": args.wandb_group or out.resolve().name,
                     "project": args.wandb_project}
        if args.jobs < 1:
            raise SweepError(f"--jobs must be at least 1, got {args.jobs}")
    except (SweepError, EditDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", flush=True)
    extra = (["--model.model", args.model] if args.model else []) + extra
    failures = run_sweep(runs, out, extra, wandb=wandb, notes=notes, jobs=args.jobs)
    order = [run.name for run in runs]
    summary = write_comparison(out, [*notes, *failure_notes(out, failures)], order)
    plots = plot_sweep(collect(out, order), out)
    print(summary.read_text())
    print(f"summary: {summary}")
    print("plots: " + (" ".join(map(str, plots)) if plots else "none (pip install matplotlib, extra `plots`)"))
    for folder, why in failures:
        print(f"failed: {folder}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
