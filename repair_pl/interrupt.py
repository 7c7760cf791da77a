"""Kill a command-line run at random moments, rerun it, and compare its end with an
uninterrupted run's: the check behind the resume tests and ``tools/kill_resume.py``.

A run's outputs are compared without their wall-time fields: ``results.json`` and
``summary.json`` as canonical JSON text, and the final edited state (``edits/``) tensor by tensor,
bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WALL_TIME_KEYS = ("seconds", "seconds_per_edit", "blocks")  # "blocks": seconds and peak RSS per 100 edits


class CliRun:
    """``scripts/edit.py fit ARGS`` in a subprocess (one torch thread), output in ``log``."""

    def __init__(self, args: list[str], log: Path, threads: int = 1):
        self.log = Path(log)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "edit.py"), "fit", *args], cwd=ROOT,
                                         stdout=f, stderr=subprocess.STDOUT, env=env)
        self.started = time.time()

    def wait_for(self, ready, timeout: float) -> bool:
        """Wait until ``ready()``; False if the run ended first."""
        while time.time() - self.started < timeout:
            if ready():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        self.proc.kill()
        raise TimeoutError(f"{self.log}: not ready after {timeout:.0f} s\n" + self.log.read_text()[-2000:])

    def finish(self, timeout: float) -> str:
        """Wait for the end; the log, or ``RuntimeError`` with its tail if the run failed."""
        if self.proc.wait(timeout) != 0:
            raise RuntimeError(f"{self.log}: exit code {self.proc.returncode}\n" + self.log.read_text()[-3000:])
        return self.log.read_text()


@dataclass
class Kill:
    """One SIGKILL: seconds after its attempt started, and where the checkpoint stood then."""

    seconds: float
    chunk: int | None
    position: int | None


@dataclass
class KillReport:
    kills: list[Kill] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    reference_seconds: float = 0.0  # the uninterrupted run, start to end
    editing_seconds: float = 0.0  # its editing alone (what a kill's delay is a fraction of)
    ended_early: str | None = None  # why an attempt finished before its kill came


def checkpoint_position(out: Path) -> tuple[int | None, int | None]:
    """(chunk, position in the chunk) of the run's last checkpoint, or (None, None)."""
    try:
        progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    except (OSError, ValueError):
        return None, None
    return progress.get("chunk"), progress.get("position")


def kill_and_resume(args: list[str], folder: Path, kills: list[str], seed: int, timeout: float,
                    max_delay: float = 0.3) -> KillReport:
    """Run ``edit.py fit ARGS`` to the end into ``folder/whole`` (the reference), then into
    ``folder/resumed``, SIGKILLed once per entry of
    ``kills`` at a seeded random moment, up to ``max_delay`` x the reference's editing time, after editing
    began (``"editing"``) or after the attempt wrote a checkpoint (``"checkpoint"``, so that every
    attempt makes progress), then once more to the end."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = KillReport()
    began = time.monotonic()
    CliRun([*args, "--trainer.default_root_dir", str(folder / "whole")], folder / "whole.log").finish(timeout)
    report.reference_seconds = time.monotonic() - began
    summary = json.loads((folder / "whole" / "summary.json").read_text())
    report.editing_seconds = summary["seconds_per_edit"] * summary["n_edits"]
    rng = random.Random(seed)
    out = folder / "resumed"
    progress = out / "checkpoint" / "progress.json"
    for k, moment in enumerate(kills):
        attempt = CliRun([*args, "--trainer.default_root_dir", str(out)], folder / f"killed{k}.log")
        if moment == "editing":
            ready = lambda: "pre-edit:" in attempt.log.read_text()  # noqa: E731
        elif moment == "checkpoint":
            ready = lambda: progress.is_file() and progress.stat().st_mtime > attempt.started  # noqa: E731
        else:
            raise ValueError(f"kill moment must be 'editing' or 'checkpoint', got {moment!r}")
        fired = attempt.wait_for(ready, timeout)
        if fired:
            time.sleep(rng.uniform(0.0, max_delay) * report.editing_seconds)
        if attempt.proc.poll() is not None:  # it ended before the kill: nothing left to resume
            report.logs.append(attempt.finish(timeout))
            if fired:
                report.ended_early = f"attempt {k + 1} ended during the delay before its kill (lower max_delay)"
            elif moment == "checkpoint":  # REPAIR checkpoints between batches only
                report.ended_early = (f"attempt {k + 1} wrote no checkpoint before it ended (one REPAIR batch "
                                      "per chunk? set components.edit_batch_size)")
            else:
                report.ended_early = f"attempt {k + 1} ended before editing began"
            return report
        attempt.proc.send_signal(signal.SIGKILL)
        attempt.proc.wait()
        report.kills.append(Kill(round(time.time() - attempt.started, 1), *checkpoint_position(out)))
        report.logs.append(attempt.log.read_text())
    report.logs.append(CliRun([*args, "--trainer.default_root_dir", str(out)], folder / "last.log").finish(timeout))
    return report


def without_wall_time(obj):
    """``obj`` without wall-time fields, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: without_wall_time(v) for k, v in obj.items() if k not in WALL_TIME_KEYS}
    if isinstance(obj, list):
        return [without_wall_time(v) for v in obj]
    return obj


def run_outputs(folder: Path) -> tuple[str, str, dict, dict]:
    """results.json and summary.json without wall time (as canonical JSON text, so NaN == NaN),
    and the saved final edited state (tensors, metadata)."""
    from repair_pl.checkpoint import read_state

    folder = Path(folder)
    results = json.dumps(without_wall_time(json.loads((folder / "results.json").read_text())), sort_keys=True)
    summary = json.dumps(without_wall_time(json.loads((folder / "summary.json").read_text())), sort_keys=True)
    tensors, meta = read_state(folder / "edits")
    return results, summary, tensors, meta


def output_differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs' outputs (empty: identical, tensors bit for bit)."""
    import torch

    results_a, summary_a, tensors_a, meta_a = run_outputs(a)
    results_b, summary_b, tensors_b, meta_b = run_outputs(b)
    diffs = [name for name, x, y in (("summary.json", summary_a, summary_b), ("results.json", results_a, results_b),
                                     ("edits/ metadata", meta_a, meta_b)) if x != y]
    if tensors_a.keys() != tensors_b.keys():
        diffs.append(f"edits/ tensors: {sorted(tensors_a.keys() ^ tensors_b.keys())}")
    diffs += [f"edits/ tensor {key}" for key in sorted(tensors_a.keys() & tensors_b.keys())
              if not torch.equal(tensors_a[key], tensors_b[key])]
    return diffs
