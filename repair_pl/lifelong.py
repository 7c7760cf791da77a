"""WISE's lifelong protocol: edit T records one after another, evaluate all T on the final
model, repeat over consecutive chunks of T, and report means over every chunk."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from repair_pl.data.records import EditRecord
from repair_pl.evaluate import evaluate_records

SUMMARY_KEYS = ("rewrite_acc", "rephrase_acc", "locality")
EXTRA_KEYS = ("ood_acc", "rewrite_ppl")  # shown when the data has them: Temporal's OOD rephrases, target perplexity


def case_means(cases: list[dict]) -> dict[str, float]:
    """Means over all scored rows of each metric, from per-case results (EasyEdit shape)."""
    pools: dict[str, list[float]] = {"rewrite_acc": [], "rephrase_acc": [], "locality": [], "ood_acc": [],
                                     "rewrite_em": [], "rewrite_ppl": []}
    for case in cases:
        for key in pools:
            values = case["locality"]["neighborhood_acc"] if key == "locality" else case.get(key, [])
            pools[key] += [v for v in values if not math.isnan(v)]
    return {k: sum(v) / len(v) for k, v in pools.items() if v}


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _markdown(summary: dict) -> str:
    keys = SUMMARY_KEYS + tuple(k for k in EXTRA_KEYS if k in summary["post"])
    rows = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for stage in ("pre", "post"):
        rows.append(f"| {stage} | " + " | ".join(f"{summary[stage].get(k, float('nan')):.4f}" for k in keys) + " |")
    return (f"# {summary['method']} on {summary['dataset']} (T={summary['T']}, {summary['n_edits']} edits)\n\n"
            + "\n".join(rows) + f"\n\nseconds per edit: {summary['seconds_per_edit']:.3f}; "
            f"steps per edit: {summary['steps_per_edit']:.2f}; failed edits: {summary['n_failed']}\n")


def run_lifelong(module, records: list[EditRecord], out_dir: str | Path, T: int | None = None,
                 dataset: str = "custom", logger=None, progress: bool = True) -> dict:
    """Run the lifelong protocol with ``module`` (a :class:`~repair_pl.module.RepairModule`).

    Writes ``out_dir/results.json`` (one entry per case: ``case_id``, ``requested_rewrite``,
    ``pre``, ``post``, ``edit``), ``out_dir/summary.json`` and ``out_dir/summary.md``, and returns
    the summary. ``T=None`` edits all records as one chunk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if T is not None and T > len(records):
        raise ValueError(f"T={T} is larger than the {len(records)} records of the data (lower T or raise data.ds_size)")
    T = T or len(records)
    tok, batch = module.tokenizer, module.hparams.eval_batch_size
    max_length, device = module.hparams.max_length, module.device
    pre = evaluate_records(module.logits_fn(edited=False), tok, records, batch_size=batch, max_length=max_length,
                           device=device, progress=progress)
    _report("pre-edit", pre.means)
    results, steps, seconds = [], 0, 0.0
    for start in range(0, len(records), T):
        chunk = records[start: start + T]
        module.reset_edits()
        # REPAIR may reorder a batch and re-edit records: gather each record's edits by identity.
        edits: dict[int, dict] = {id(r): {"steps": 0, "seconds": 0.0, "loss": None, "success": False, "retries": 0}
                                  for r in chunk}
        for i, (record, result) in enumerate(module.edit_stream(chunk, progress=progress)):
            info = edits[id(record)]
            info["steps"] += result.steps
            info["seconds"] += result.seconds
            info["loss"], info["success"] = result.loss, result.success
            info["retries"] += int(result.retry)
            steps, seconds = steps + result.steps, seconds + result.seconds
            if logger is not None:
                logger.log_metrics({"edit/loss": result.loss, "edit/edit_loss": result.edit_loss,
                                    "edit/routing_loss": result.routing_loss, "edit/steps": result.steps,
                                    "edit/seconds": result.seconds, "edit/in_scope_score": result.in_scope_score,
                                    "edit/success": float(result.success)}, step=start + i)
        post = evaluate_records(module.logits_fn(edited=True), tok, chunk, reference=pre.locality_preds[start: start + T],
                                batch_size=batch, max_length=max_length, device=device, progress=progress)
        for i, record in enumerate(chunk):
            results.append({"case_id": record.case_id, "requested_rewrite": record.requested_rewrite(),
                            "pre": pre.cases[start + i], "post": post.cases[i], "edit": edits[id(record)]})
    failed = sum(not case["edit"]["success"] for case in results) if module.method != "none" else 0
    n = len(records)
    summary = {"method": module.method, "dataset": dataset, "T": T, "n_edits": n,
               "pre": case_means([c["pre"] for c in results]), "post": case_means([c["post"] for c in results]),
               "seconds_per_edit": seconds / n, "steps_per_edit": steps / n, "n_failed": failed,
               "interventions": module.intervention_counts()}
    _report("post-edit", summary["post"])
    _write_json(out / "results.json", results)
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(_markdown(summary))
    if logger is not None:
        logger.log_metrics({f"{stage}/{k}": v for stage in ("pre", "post") for k, v in summary[stage].items()},
                           step=n)
        logger.save()
    return summary


def _report(stage: str, means: dict[str, float]) -> None:
    print(f"{stage}: " + "  ".join(f"{k}={means[k]:.4f}" for k in SUMMARY_KEYS + EXTRA_KEYS if k in means), flush=True)
