"""A sweep of lifelong runs, methods x datasets x T (+ REPAIR ablations), that resumes.

Each run is one ``EditCLI fit`` (what ``scripts/edit.py fit`` runs) into
``OUT/<dataset>/<method>_T<T>/`` with ``data.ds_size = T`` unless told otherwise. A run is
finished when its ``summary.json`` exists (the lifelong runner writes it last, atomically): a
rerun of the sweep skips finished runs and redoes the others (an interrupted run picks up its
own checkpoint, ``checkpoint_every``). The unedited model is evaluated once per dataset and
record set (``OUT/<dataset>/pre_edit/``), not once per method. ``OUT/COMPARISON_SUMMARY.md`` is rewritten from every
finished run after each run; :func:`repair_pl.plots.plot_sweep` draws the plots.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("zsre", "hallucination", "temporal", "counterfact")
TS = (10, 100, 500, 1000)
ABLATIONS = {
    "progressive": ("--model.components.progressive", "null"),
    "closed_loop": ("--model.components.closed_loop", "null"),
    "error_feedback": ("--model.components.error_feedback", "null"),
    "distribution_aware": ("--model.components.distribution_aware", "null"),
    "heterogeneous": ("--model.components.distribution_aware.heterogeneous", "true"),
}
COLUMNS = (("rewrite_acc", "Rel"), ("rephrase_acc", "Gen"), ("locality", "Loc"), ("ood_acc", "OOD"),
           ("rewrite_ppl", "PPL"), ("rewrite_gen_em", "gen Rel"), ("rephrase_gen_em", "gen Gen"),
           ("locality_gen", "gen Loc"))
OPTIONAL_COLUMNS = ("ood_acc", "rewrite_ppl", "rewrite_gen_em", "rephrase_gen_em", "locality_gen")
"""Columns shown only where some run has them (OOD: Temporal; gen: runs with ``generation: true``)."""
CONFIG_DIRS = (Path("configs"), Path(__file__).resolve().parents[1] / "configs")
"""Where configs are looked up by name: the working directory's ``configs/``, else the repository's."""
EREN_COLUMNS = ("es", "bp", "eq")  # EREN's edit success, behaviour preservation, edit quality (EREN runs only)


class SweepError(ValueError):
    """A sweep that cannot be planned (unknown dataset config, bad sizes)."""


def default_methods() -> list[str]:
    """REPAIR, WISE and the baselines (FT-L, FT-M, GRACE)."""
    return ["repair", "wise", "ft_l", "ft_m", "grace"]


def method_args(method: str) -> tuple[str, ...]:
    """CLI arguments that switch a dataset config (REPAIR) to ``method``: its overlay
    ``configs/methods/<method>.yaml`` (none for ``repair``)."""
    if method == "repair":
        return ()
    try:
        return ("--config", str(find_config(f"methods/{method}")))
    except SweepError:
        known = sorted({p.stem for base in CONFIG_DIRS for p in (base / "methods").glob("*.yaml")})
        raise SweepError(f"unknown method {method!r}: there is no configs/methods/{method}.yaml "
                         f"(methods: repair, eren, {', '.join(known)})") from None


def find_config(name: str) -> Path:
    """``configs/<name>.yaml`` (from the working directory, else the repository's), or ``name``
    itself when it is a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SweepError(f"config {name} does not exist")
        return path
    for base in CONFIG_DIRS:
        if (base / f"{name}.yaml").is_file():
            return base / f"{name}.yaml"
    raise SweepError(f"no config for {name!r}: expected configs/{name}.yaml (or pass the path of a .yaml file)")


def dataset_size(config: Path) -> int:
    """Records the config's data section yields (the whole file; ``ds_size`` is set per run)."""
    import yaml

    from repair_pl.data import EditDataModule

    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    module = EditDataModule(path=data.get("path", "demo"), format=data.get("format", "auto"),
                            on_invalid=data.get("on_invalid", "raise"))
    module.setup()
    return len(module.records)


@dataclass(frozen=True)
class Run:
    """One lifelong run of the sweep."""

    dataset: str
    config: Path
    name: str  # the method, or repair-no-<component> for an ablation
    T: int
    n_records: int
    args: tuple[str, ...]  # CLI arguments that select the method

    def folder(self, out: Path) -> Path:
        return Path(out) / self.dataset / f"{self.name}_T{self.T}"

    def cli_args(self, out: Path, extra: Sequence[str] = (), wandb: dict | None = None) -> list[str]:
        """Arguments of ``EditCLI`` for this run; ``wandb`` (``{"config", "group", "project"?}``)
        adds the W&B logger with this run's folder, group and name."""
        folder = str(self.folder(out))
        args = ["fit", "--config", str(self.config), *self.args, "--T", str(self.T),
                "--data.ds_size", str(self.n_records), "--trainer.default_root_dir", folder]
        if self.name != "eren":  # every weight-editing method starts from the same unedited model
            args += ["--pre_eval_cache", str(Path(out) / self.dataset / "pre_edit")]
        if wandb is not None:
            args += ["--config", str(wandb["config"]), "--trainer.logger.init_args.save_dir", folder,
                     "--trainer.logger.init_args.group", wandb["group"],
                     "--trainer.logger.init_args.name", f"{self.dataset}/{self.name}_T{self.T}"]
            if wandb.get("project"):
                args += ["--trainer.logger.init_args.project", wandb["project"]]
        return args + list(extra)


def plan(datasets: Sequence[str], methods: Sequence[str], ts: Sequence[int], ablations: Sequence[str] = (),
         ds_size: int | None = None) -> tuple[list[Run], list[str]]:
    """The runs of the sweep, and notes on what was left out (a T larger than the data)."""
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        raise SweepError(f"unknown ablations {unknown}; choose from {sorted(ABLATIONS)}")
    runs, notes = [], []
    for dataset in datasets:
        try:
            config, weights = find_config(dataset), True
        except SweepError:
            if "eren" not in methods or Path(dataset).suffix in (".yaml", ".yml"):
                raise
            # a task only EREN runs (FEVER fact-checking): its EREN config gives the records
            config, weights = find_config(f"eren_{dataset}"), False
            skipped = [m for m in methods if m != "eren"]
            skipped += [f"repair ablations ({', '.join(ablations)})"] if ablations else []
            if skipped:
                notes.append(f"{dataset}: {', '.join(skipped)} skipped, there is no configs/{dataset}.yaml (EREN only)")
        name = config.stem if Path(dataset).suffix in (".yaml", ".yml") else dataset
        available = dataset_size(config)
        for t in ts:
            if t > available:
                notes.append(f"{name}: T={t} skipped, the data has {available} records")
                continue
            n = ds_size or t
            if n < t:
                raise SweepError(f"--ds_size {n} is smaller than T={t}: every run needs at least T records")
            if n > available:
                notes.append(f"{name}: T={t} uses all {available} records (ds_size {n} asked)")
                n = available
            variants = [(m, method_args(m)) for m in methods if m != "eren" and weights]
            variants += [(f"repair-no-{a}" if a != "heterogeneous" else "repair-heterogeneous", ABLATIONS[a])
                         for a in ablations if weights]
            runs += [Run(name, config, v, t, n, args) for v, args in variants]
            if "eren" in methods:  # EREN edits no weights: its own config (reader, encoder, prompts)
                try:
                    runs.append(Run(name, find_config(f"eren_{name}"), "eren", t, n, ()))
                except SweepError:
                    notes.append(f"{name}: eren skipped, there is no configs/eren_{name}.yaml")
    return runs, notes


def run_sweep(runs: Sequence[Run], out: Path, extra: Sequence[str] = (), wandb: dict | None = None,
              notes: Sequence[str] = (), log: Callable[[str], None] = print, jobs: int = 1) -> list[tuple[Path, str]]:
    """Run every unfinished run in order; returns the runs that failed (and why). A failed run
    does not stop the sweep; rerunning the sweep retries it.

    ``jobs=1`` runs in this process, in order. ``jobs=N`` runs N at a time, largest T first,
    each in a process of its own with ``torch threads // N`` threads and its output in
    ``<run folder>/run.log``: for machines whose cores one run cannot keep busy (on 2 cores it
    gained ~1.2x: two one-thread runs side by side each ran ~1.7x slower than one two-thread run
    alone). Thread counts change float summation order, so numbers may differ in the last digits
    from a one-job sweep."""
    if jobs < 1:
        raise SweepError(f"jobs must be at least 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    todo = []
    for i, run in enumerate(runs, 1):
        if (run.folder(out) / "summary.json").exists():
            log(f"[{i}/{len(runs)}] skip {run.folder(out)} (done)")
        else:
            todo.append((i, run))
    lock = threading.Lock()

    def one(i: int, run: Run) -> None:
        folder = run.folder(out)
        args = run.cli_args(out, extra, wandb)
        log(f"[{i}/{len(runs)}] run {folder}" + (f" (log: {folder / 'run.log'})" if jobs > 1 else ""))
        start = time.perf_counter()
        why = _run_in_process(run, args) if jobs == 1 else _run_in_subprocess(args, folder, _threads(jobs))
        with lock:
            if why is not None:
                failures.append((folder, why))
                log(f"[{i}/{len(runs)}] failed {folder}: {why}")
            elif jobs > 1:
                log(f"[{i}/{len(runs)}] done {folder} in {time.perf_counter() - start:.0f} s")
            write_comparison(out, [*notes, *failure_notes(out, failures)], order=[r.name for r in runs])

    if jobs == 1:
        for i, run in todo:
            one(i, run)
    else:
        # Longest first (by T, a run's cost grows with it), so that the last runs, which leave
        # cores idle beside them, are short ones.
        todo.sort(key=lambda item: -item[1].T)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(one, i, run) for i, run in todo]:
                future.result()
    return failures


def _run_in_process(run: Run, args: list[str]) -> str | None:
    """One run through ``EditCLI`` (or EREN's runner) here; why it failed, or None."""
    from repair_pl.cli import EditCLI
    from repair_pl.eren.run import main as eren_main
    from repair_pl.tracking import finish_run

    why = None
    try:
        with warnings.catch_warnings():  # the sweep's own argv is not the run's
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            if run.name == "eren":
                eren_main(args)
            else:
                EditCLI(args=args, parser_kwargs={"default_env": False})
    except SystemExit as err:  # the CLI's parser exits on bad arguments
        if err.code in (0, None):
            raise
        why = f"bad arguments (exit {err.code})"
    except Exception as err:  # noqa: BLE001 - one failed run must not end a long sweep
        why = f"{type(err).__name__}: {err}"
        why = why if len(why) < 400 else why[:400] + " ..."
    if why is not None:
        finish_run(failed=True)
    gc.collect()  # the previous run's model
    return why


def _run_in_subprocess(args: list[str], folder: Path, threads: int) -> str | None:
    """One run as ``scripts/edit.py`` would run it, in a child process with ``threads`` torch
    threads, output in ``folder/run.log``; why it failed (the log's last error line), or None."""
    folder.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    log_path = folder / "run.log"
    with open(log_path, "w") as f:
        code = subprocess.call([sys.executable, "-c", "from repair_pl.cli import main; main()", *args],
                               stdout=f, stderr=subprocess.STDOUT, env=env)
    if code == 0:
        return None
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    last = (errors or lines or ["no output"])[-1]
    return f"exit {code}: {last[:400]} (see {log_path})"


def _threads(jobs: int) -> int:
    """Torch threads per run when ``jobs`` runs share this machine."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def failure_notes(out: Path, failures: Sequence[tuple[Path, str]]) -> list[str]:
    """One line per failed run for the summary's "Not run" list."""
    return [f"{Path(folder).relative_to(out)} failed: {why}" for folder, why in failures]


def collect(out: Path, order: Sequence[str] = ()) -> list[dict]:
    """Summaries of every finished run under ``out`` with ``dataset`` and ``run`` (its name),
    by dataset, then run name (those in ``order`` first, in that order), then T."""
    rows = []
    for path in Path(out).glob("*/*/summary.json"):
        summary = json.loads(path.read_text())
        rows.append({**summary, "dataset": path.parent.parent.name, "run": path.parent.name.rsplit("_T", 1)[0]})
    rank = {name: i for i, name in enumerate(dict.fromkeys(order))}
    return sorted(rows, key=lambda r: (r["dataset"], rank.get(r["run"], len(rank)), r["run"], r["T"]))


def _cell(value, spread: dict | None = None) -> str:
    """A number; with ``spread`` (a run over several chunks) the mean over chunks +- their std."""
    if spread is not None:
        return f"{_cell(spread['mean'])} ± {_cell(spread['std'])}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def comparison_table(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """``COMPARISON_SUMMARY.md``: one table per dataset, one row per run (post-edit means)."""
    text = ["# Comparison", "",
            "Post-edit means over all edits of each run (WISE's lifelong protocol: T edits, then evaluation). "
            "Rel / Gen / Loc: rewrite, generalisation and locality token accuracy (higher is better); "
            "OOD: out-of-distribution rephrases (Temporal); PPL: perplexity of the target after the edit "
            "prompt (WISE's Hallucination metric, lower is better); steps and seconds per edit include "
            "re-edits; failed: edits undone by closed-loop feedback. ES / BP / EQ (EREN runs): edit success, "
            "behaviour preservation and their harmonic mean, on generated answers (EREN's metrics). "
            "gen Rel / gen Gen / gen Loc (runs with generation on): exact match of the greedy answer to the target, "
            "and the share of unrelated answers unchanged from the unedited model's (docs/evaluation.md). "
            "A run of several chunks (n > T) shows the mean of its chunks' means ± their standard deviation.", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        keys = [(k, label) for k, label in COLUMNS
                if k not in OPTIONAL_COLUMNS or any(k in r["post"] for r in group)]
        eren = [(k, k.upper()) for k in EREN_COLUMNS if any(k in r for r in group)]  # EREN's own metrics
        text += [f"## {dataset}", "",
                 "| method | T | n | " + " | ".join(label for _, label in keys + eren)
                 + " | steps/edit | s/edit | failed |",
                 "|---|---|---|" + "---|" * len(keys + eren) + "---|---|---|"]
        for r in group:
            text.append(f"| {r['run']} | {r['T']} | {r['n_edits']} | "
                        + " | ".join([_cell(r["post"].get(k), (r.get("chunk_spread") or {}).get(k)) for k, _ in keys]
                                     + [_cell(r.get(k)) for k, _ in eren])
                        + f" | {r['steps_per_edit']:.1f} | {r['seconds_per_edit']:.2f} | {r.get('n_failed', 0)} |")
        text.append("")
    text += stream_table(rows)
    if notes:
        text += ["## Not run", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(text)


def stream_table(rows: Sequence[dict]) -> list[str]:
    """The "Long streams" section: for each run with a timeline (``summary["blocks"]``, runs of
    at least one block of edits), its editing wall time, seconds per edit in each block of edits
    and the process's peak memory and memory at the end of the first and the last block."""
    timelines = [(r, [b for b in r.get("blocks") or [] if "seconds_per_edit" in b]) for r in rows]
    timelines = [(r, blocks) for r, blocks in timelines if blocks]
    if not timelines:
        return []
    text = ["## Long streams", "",
            "Editing wall time (evaluation apart) and, per block of edits, seconds per edit (with the re-checks "
            "and re-edits that follow the block's last edit); peak RSS of the process so far and its RSS at the "
            "end of the first and the last full block.", "",
            "| dataset | method | T | n | editing time | s/edit per block | peak RSS (MB), first / last block "
            "| RSS at block end (MB), first / last block |",
            "|---|---|---|---|---|---|---|---|"]
    for r, blocks in timelines:
        size = blocks[0]["edits"]
        per_block = " ".join(f"{b['seconds_per_edit']:.2f}" for b in blocks)
        minutes = r["seconds_per_edit"] * r["n_edits"] / 60
        text.append(f"| {r['dataset']} | {r['run']} | {r['T']} | {r['n_edits']} | {minutes:.1f} min | "
                    f"{per_block} (per {size}) | {blocks[0]['peak_rss_mb']:.0f} / {blocks[-1]['peak_rss_mb']:.0f} | "
                    f"{_megabytes(blocks[0].get('rss_mb'))} / {_megabytes(blocks[-1].get('rss_mb'))} |")
    return text + [""]


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"  # "-": a run from before blocks recorded it


def write_comparison(out: Path, notes: Sequence[str] = (), order: Sequence[str] = ()) -> Path:
    """Rewrite ``OUT/COMPARISON_SUMMARY.md`` from every finished run (rows in ``order``)."""
    from repair_pl.checkpoint import write_file_atomic

    path = Path(out) / "COMPARISON_SUMMARY.md"
    write_file_atomic(path, comparison_table(collect(out, order), notes))
    return path
