"""Long-stream kill check: run a lifelong stream to the end, then run it again SIGKILLed at
random moments (each attempt resumes from the last checkpoint and is killed after it wrote a
new one), then once more to the end; the two ends must be identical (results.json and
summary.json apart from wall time, and edits/ bit for bit).

    python tools/kill_resume.py --kills 5 --out runs/kill_resume -- \\
        --config configs/zsre.yaml --data.ds_size 300 --T 300 --checkpoint_every 20

Arguments after ``--`` go to ``scripts/edit.py fit``. Writes ``OUT/kill_resume.md`` (the kill
points and the comparison) and exits non-zero when the ends differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repair_pl.interrupt import kill_and_resume, output_differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=0.1,
                        help="a kill comes up to this fraction of the uninterrupted run's editing time after a checkpoint")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds for any one attempt")
    parser.add_argument("--out", default="runs/kill_resume")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of edit.py fit")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    out = Path(opts.out)
    report = kill_and_resume(args + ["--trainer.enable_progress_bar", "false"], out, kills=["checkpoint"] * opts.kills,
                             seed=opts.seed, timeout=opts.timeout, max_delay=opts.max_delay)
    lines = ["# Kill and resume", "", "`edit.py fit " + " ".join(args) + "`", "",
             f"uninterrupted run: {report.reference_seconds:.0f} s, of which editing {report.editing_seconds:.0f} s", "",
             "| kill | seconds into the attempt | last checkpoint (chunk, position) |", "|---|---|---|"]
    lines += [f"| {i + 1} | {k.seconds} | {k.chunk}, {k.position} |" for i, k in enumerate(report.kills)]
    if report.ended_early:
        lines += ["", report.ended_early]
    resumed = sum("resuming from" in log for log in report.logs)
    diffs = output_differences(out / "whole", out / "resumed")
    lines += ["", f"attempts that resumed from a checkpoint: {resumed} of {len(report.logs)}",
              "ends identical (results.json, summary.json without wall time; edits/ bit for bit): "
              + ("yes" if not diffs else "NO: " + ", ".join(diffs))]
    text = "\n".join(lines) + "\n"
    (out / "kill_resume.md").write_text(text)
    print(text)
    return 0 if not diffs and len(report.kills) == opts.kills else 1


if __name__ == "__main__":
    sys.exit(main())
