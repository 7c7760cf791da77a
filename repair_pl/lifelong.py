"""WISE's lifelong protocol: edit T records one after another, evaluate all T on the final
model, repeat over consecutive chunks of T, and report means over every chunk."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from repair_pl.checkpoint import exclusive_lock, write_file_atomic, write_json_atomic
from repair_pl.data.records import EditRecord
from repair_pl.evaluate import Evaluation, evaluate_records
from repair_pl.generation import (MEAN_KEYS, GenerationCheck, evaluate_generation, generation_means,
                                  generation_scores, generation_summary, module_generate_fn)
from repair_pl.host_memory import rss_mb
from repair_pl.resume import RunCheckpoint, records_sha256, run_fingerprint

SUMMARY_KEYS = ("rewrite_acc", "rephrase_acc", "locality")
EXTRA_KEYS = ("ood_acc", "rewrite_ppl")  # shown when the data has them: Temporal's OOD rephrases, target perplexity
GEN_KEYS = tuple(MEAN_KEYS.values()) + tuple(f"{k}_chat" for k in MEAN_KEYS.values())  # with generation on


def case_means(cases: list[dict]) -> dict[str, float]:
    """Means over all scored rows of each metric, from per-case results (EasyEdit shape)."""
    pools: dict[str, list[float]] = {"rewrite_acc": [], "rephrase_acc": [], "locality": [], "ood_acc": [],
                                     "rewrite_em": [], "rewrite_ppl": []}
    for case in cases:
        for key in pools:
            values = case["locality"]["neighborhood_acc"] if key == "locality" else case.get(key, [])
            pools[key] += [v for v in values if not math.isnan(v)]
        for key, values in generation_scores(case.get("gen")).items():
            pools.setdefault(key, []).extend(values)
    return {k: sum(v) / len(v) for k, v in pools.items() if v}


def _markdown(summary: dict) -> str:
    keys = SUMMARY_KEYS + tuple(k for k in EXTRA_KEYS if k in summary["post"])
    rows = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for stage in ("pre", "post"):
        rows.append(f"| {stage} | " + " | ".join(f"{summary[stage].get(k, float('nan')):.4f}" for k in keys) + " |")
    if "chunk_spread" in summary:  # the std of the per-chunk means
        spread = summary["chunk_spread"]
        rows.append(f"| post std over {len(summary['chunks'])} chunks | "
                    + " | ".join(f"{spread[k]['std']:.4f}" if k in spread else "" for k in keys) + " |")
    return (f"# {summary['method']} on {summary['dataset']} (T={summary['T']}, {summary['n_edits']} edits)\n\n"
            + "\n".join(rows) + _generation_markdown(summary)
            + f"\n\nseconds per edit: {summary['seconds_per_edit']:.3f}; "
            f"steps per edit: {summary['steps_per_edit']:.2f}; failed edits: {summary['n_failed']}\n")


def _generation_markdown(summary: dict) -> str:
    """The generated-answer columns (docs/evaluation.md), when the run has them."""
    if "generation" not in summary:
        return ""
    names = list(MEAN_KEYS.values())
    rows = ["| | template | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for stage in ("pre", "post"):
        for template, suffix in (("plain", ""), ("chat", "_chat")):
            if template in summary["generation"]["templates"]:
                rows.append(f"| {stage} | {template} | " + " | ".join(
                    f"{summary[stage].get(k + suffix, float('nan')):.4f}" for k in names) + " |")
    note = "" if "chat" in summary["generation"]["templates"] else f"\n\nchat template: {summary['generation']['chat']}"
    return ("\n\nGenerated answers (greedy, exact match after normalisation; locality_gen: answer unchanged from "
            "the unedited model's; docs/evaluation.md):\n\n" + "\n".join(rows) + note)


def run_lifelong(module, records: list[EditRecord], out_dir: str | Path, T: int | None = None,
                 dataset: str = "custom", logger=None, progress: bool = True,
                 checkpoint_every: int | None = None, skipped: list | None = None,
                 pre_eval_cache: str | Path | None = None, generation: GenerationCheck | None = None) -> dict:
    """Run the lifelong protocol with ``module`` (a :class:`~repair_pl.module.RepairModule`).

    Writes, each atomically, ``out_dir/results.json`` (one entry per case: ``case_id``,
    ``requested_rewrite``, ``pre``, ``post``, ``edit``), ``out_dir/summary.md``, the final
    edited state ``out_dir/edits/`` (:meth:`~repair_pl.module.RepairModule.save_edits`) and
    last ``out_dir/summary.json``, and returns the summary. ``T=None`` edits all records as one
    chunk. ``skipped``: the loader's errors for records it left out (``data.on_invalid: skip``),
    listed in the summary.

    ``checkpoint_every=N`` checkpoints the run into ``out_dir/checkpoint/``
    (:mod:`repair_pl.resume`) every N edits and after every chunk; calling again with the same
    configuration resumes from it and ends exactly as an uninterrupted run. REPAIR's
    between-batch components (distribution-aware memory, error feedback) reorder and re-edit a
    whole edit batch, so with them the checkpoint waits for the first batch boundary after N
    edits. The finished run removes its checkpoint.

    ``pre_eval_cache`` (a folder): reuse the unedited model's evaluation from there, or store it
    there (:func:`pre_edit_evaluation`); a sweep shares one across its methods.

    ``generation``: also generate the answers greedily and score them (:mod:`repair_pl.generation`,
    docs/evaluation.md); each case's ``pre`` and ``post`` get a ``"gen"`` entry, the summary the
    means ``rewrite_gen_em``, ``rephrase_gen_em``, ``locality_gen`` (and ``..._chat``) and a
    ``"generation"`` entry with the settings. ``None``: teacher-forced scores only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_run_options(T, checkpoint_every, len(records))
    T = T or len(records)
    tok, batch = module.tokenizer, module.hparams.eval_batch_size
    max_length, device = module.hparams.max_length, module.device
    checkpoint = (RunCheckpoint(out / "checkpoint", run_fingerprint(module, records, T, generation))
                  if checkpoint_every else None)
    state = checkpoint.load(module) if checkpoint is not None else None
    if state is None:
        pre = pre_edit_evaluation(module, records, pre_eval_cache, progress, generation)
        state = {"chunk": 0, "position": 0, "logged": 0, "edits": [], "results": [], "steps": 0, "seconds": 0.0,
                 "edited": 0, "blocks": [], "pre": asdict(pre)}
    else:
        pre = Evaluation(**state["pre"])
        print(f"resuming from {checkpoint.folder}: {len(state['results']) + state['position']} of {len(records)} "
              f"edits done", flush=True)
    _report("pre-edit", pre.means)
    segment = _segment_size(module, checkpoint_every)
    for c in range(state["chunk"], math.ceil(len(records) / T)):
        start = c * T
        chunk = records[start: start + T]
        if state["position"] == 0:
            module.reset_edits()
            state.update(logged=0, edits=[{"steps": 0, "seconds": 0.0, "loss": None, "success": False, "retries": 0}
                                          for _ in chunk])
        # REPAIR may reorder a batch and re-edit records: gather each record's edits by identity.
        index = {id(r): i for i, r in enumerate(chunk)}
        bar = _bar(len(chunk), state["position"]) if progress else None
        done = reached = 0  # edits of this process and how many reached their target (the bar's rel)
        saved_at = state["position"]
        for first in range(state["position"], len(chunk), segment or len(chunk)):
            clock = time.perf_counter()  # wall time of editing: fits, clustering, merges, re-checks
            for record, result in module.edit_stream(chunk[first: first + (segment or len(chunk))], progress=False):
                info = state["edits"][index[id(record)]]
                info["steps"] += result.steps
                info["seconds"] += result.seconds
                info["loss"], info["success"] = result.loss, result.success
                info["retries"] += int(result.retry)
                state["steps"] += result.steps
                now = time.perf_counter()
                if not result.retry:
                    # a block ends where the next block's first fit begins: its batch's re-checks and
                    # re-edits (REPAIR's error feedback) count in it, not in the next block
                    began = max(clock, now - result.seconds)
                    state["seconds"] += began - clock
                    clock = began
                    _note_block(state)
                    state["edited"] += 1
                state["seconds"] += now - clock
                clock = now
                if logger is not None:
                    logger.log_metrics({"edit/loss": result.loss, "edit/edit_loss": result.edit_loss,
                                        "edit/routing_loss": result.routing_loss, "edit/steps": result.steps,
                                        "edit/seconds": result.seconds, "edit/in_scope_score": result.in_scope_score,
                                        "edit/success": float(result.success), "edit/lr": result.lr,
                                        "edit/intervention": result.intervention,
                                        "edit/target_reached": float(result.target_reached)},
                                       step=start + state["logged"])
                state["logged"] += 1
                if bar is not None and not result.retry:
                    done, reached = done + 1, reached + result.target_reached
                    bar.set_postfix({"rel": f"{reached / done:.2f}", "loss": f"{result.edit_loss:.3f}",
                                     "steps": result.steps}, refresh=False)
                    bar.update(1)
            state["seconds"] += time.perf_counter() - clock  # the batch's last merge and re-checks
            _note_block(state)
            state["position"] = min(first + (segment or len(chunk)), len(chunk))
            if checkpoint is not None and state["position"] < len(chunk) and \
                    state["position"] - saved_at >= checkpoint_every:
                checkpoint.save(module, state)
                saved_at = state["position"]
        if bar is not None:
            bar.close()
        post = evaluate_records(module.logits_fn(edited=True), tok, chunk, reference=pre.locality_preds[start: start + T],
                                batch_size=batch, max_length=max_length, device=device, progress=progress)
        if generation is not None:  # the unedited model's answers are the locality reference
            entries = evaluate_generation(module_generate_fn(module, edited=True), tok, chunk,
                                          reference=[case["gen"] for case in pre.cases[start: start + T]],
                                          check=generation, batch_size=batch, progress=progress)
            for case, entry in zip(post.cases, entries):
                case["gen"] = entry
        for i, record in enumerate(chunk):
            state["results"].append({"case_id": record.case_id, "requested_rewrite": record.requested_rewrite(),
                                     "pre": pre.cases[start + i], "post": post.cases[i], "edit": state["edits"][i]})
        state.update(chunk=c + 1, position=0, edits=[])
        if checkpoint is not None:
            checkpoint.save(module, state)
    results, steps, seconds = state["results"], state["steps"], state["seconds"]
    failed = [case["case_id"] for case in results if not case["edit"]["success"]] if module.method != "none" else []
    n = len(records)
    summary = {"method": module.method, "dataset": dataset, "T": T, "n_edits": n,
               "pre": case_means([c["pre"] for c in results]), "post": case_means([c["post"] for c in results]),
               "seconds_per_edit": seconds / n, "steps_per_edit": steps / n, "n_failed": len(failed),
               "failed_case_ids": failed, "interventions": module.intervention_counts(),
               "skipped_records": [str(err) for err in skipped or []], **chunk_spread(results, T)}
    if state["blocks"]:
        # what came after the last full block: its edits, and re-edits, merges and re-checks that a
        # batch runs after its edits (REPAIR's error feedback), so the blocks add up to the total
        rest = {"edits": n, "rest_after": state["blocks"][-1]["edits"], "seconds": _seconds_after_blocks(state)}
        summary["blocks"] = state["blocks"] + [rest]
    if generation is not None:
        summary["generation"] = generation_summary(tok, generation)
    _report("post-edit", summary["post"])
    write_json_atomic(out / "results.json", results, indent=1)
    write_file_atomic(out / "summary.md", _markdown(summary))
    module.save_edits(out / "edits")
    write_json_atomic(out / "summary.json", summary, indent=1)  # last: a sweep takes it as "this run is done"
    if checkpoint is not None:
        checkpoint.finish()
    if logger is not None:
        metrics = {f"{stage}/{k}": v for stage in ("pre", "post") for k, v in summary[stage].items()}
        metrics.update({f"{stage}/score": edit_score(summary[stage]) for stage in ("pre", "post")})
        logger.log_metrics(metrics, step=n)
        logger.save()
    return summary


BLOCK = 100
"""Edits per block of a long run's timeline (``summary["blocks"]``: per block of ``BLOCK`` edits,
wall seconds per edit, peak RSS and RSS at the block's end; a last entry holds the seconds after
the last full block)."""


def _note_block(state: dict) -> None:
    """Close the block of edits just finished, if ``BLOCK`` edits have been made since the last
    one: its wall seconds per edit, the process's peak memory so far and its memory now (what a
    long stream reports; with batches of ``BLOCK`` edits, "now" is after the batch's end, so it
    is what the stream holds, while the peak also holds the largest passing allocation so far).
    Called at the end of each edit segment and before each new edit's fit."""
    done = state["edited"]
    if not done or done % BLOCK or (state["blocks"] and state["blocks"][-1]["edits"] >= done):
        return
    import resource

    spent = _seconds_after_blocks(state)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    state["blocks"].append({"edits": done, "seconds_per_edit": spent / BLOCK, "peak_rss_mb": peak_mb,
                            "rss_mb": rss_mb()})


def _seconds_after_blocks(state: dict) -> float:
    """Editing seconds not yet in a closed block."""
    return state["seconds"] - sum(b["seconds_per_edit"] * BLOCK for b in state["blocks"])


def chunk_spread(results: list[dict], T: int) -> dict:
    """Per-chunk post-edit means and, with several chunks, their mean and sample standard
    deviation per metric (a run over several chunks reports mean and spread, not one chunk)."""
    chunks = [case_means([c["post"] for c in results[i: i + T]]) for i in range(0, len(results), T)]
    if len(chunks) < 2:
        return {}
    spread = {}
    for key in chunks[0]:
        values = [c[key] for c in chunks if key in c]
        mean = sum(values) / len(values)
        spread[key] = {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)),
                       "min": min(values), "max": max(values)}
    return {"chunks": chunks, "chunk_spread": spread}


def pre_edit_evaluation(module, records: list[EditRecord], cache: str | Path | None = None,
                        progress: bool = False, generation: GenerationCheck | None = None) -> Evaluation:
    """The unedited model's evaluation of ``records`` (also the locality reference).

    With ``cache`` (a folder) it is read from ``cache/pre_edit_<key>.json`` when there, else
    computed and written there. The key covers what the scores depend on: the model's name,
    dtype and placement, the evaluation settings and the records. Every method starts from the
    same unedited model, so a sweep scores it once per dataset and T instead of once per run.
    A model passed as an object has no name to key on, so it is always scored.
    ``generation``: the generated answers too (each case's ``"gen"``, see :func:`run_lifelong`).
    """
    hp = module.hparams
    if cache is None or not isinstance(hp.get("model"), str):
        return _evaluate_unedited(module, records, progress, generation)
    key = {"model": hp.model, "dtype": str(hp.dtype), "device": module.device.type, "device_map": repr(hp.device_map),
           "max_length": hp.max_length, "eval_batch_size": hp.eval_batch_size,
           "records_sha256": records_sha256(records)}
    if generation is not None:  # absent when off, so the teacher-forced-only entries keep their keys
        key["generation"] = generation.key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache) / f"pre_edit_{digest}.json"
    # Runs of a sweep side by side (--jobs) wait for the first to score it instead of each scoring it.
    with exclusive_lock(path.with_suffix(".lock")):
        if path.is_file():
            print(f"pre-edit evaluation read from {path}", flush=True)
            return Evaluation(**json.loads(path.read_text()))
        pre = _evaluate_unedited(module, records, progress, generation)
        write_json_atomic(path, asdict(pre), indent=1)
    return pre


def _evaluate_unedited(module, records: list[EditRecord], progress: bool,
                       generation: GenerationCheck | None = None) -> Evaluation:
    hp = module.hparams
    pre = evaluate_records(module.logits_fn(edited=False), module.tokenizer, records, batch_size=hp.eval_batch_size,
                           max_length=hp.max_length, device=module.device, progress=progress)
    if generation is not None:
        entries = evaluate_generation(module_generate_fn(module, edited=False), module.tokenizer, records,
                                      check=generation, batch_size=hp.eval_batch_size, progress=progress)
        for case, entry in zip(pre.cases, entries):
            case["gen"] = entry
        pre.means.update(generation_means(entries))
    return pre


def edit_score(means: dict[str, float]) -> float:
    """One number per run, the objective of hyperparameter sweeps (``post/score``): the plain mean
    of rewrite accuracy, generalisation and locality, so that no one of them is bought with another."""
    values = [means[k] for k in SUMMARY_KEYS if k in means]
    return sum(values) / len(values) if values else float("nan")


def check_run_options(T: int | None, checkpoint_every: int | None, n_records: int | None = None) -> None:
    """Start-up checks of the run's own options; the errors name the key."""
    if T is not None and (not isinstance(T, int) or T < 1):
        raise ValueError(f"T must be a positive integer or null (all records in one chunk), got {T!r}")
    if T is not None and n_records is not None and T > n_records:
        raise ValueError(f"T={T} is larger than the {n_records} records of the data (lower T or raise data.ds_size)")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer or null (no checkpoints), got {checkpoint_every!r}")


def _segment_size(module, checkpoint_every: int | None) -> int | None:
    """Edits per ``edit_stream`` call: REPAIR's between-batch callbacks need whole edit batches
    (``None``: the whole chunk); otherwise edits are independent and the run can stop every
    ``checkpoint_every`` edits."""
    from repair_pl.components import EditStreamCallback

    batched = any(getattr(type(cb), hook, None) is not getattr(EditStreamCallback, hook)
                  for cb in module.edit_callbacks if isinstance(cb, EditStreamCallback)
                  for hook in ("on_edit_batch_start", "on_edit_batch_end"))
    return module.components.edit_batch_size if batched else checkpoint_every


def _bar(total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="editing", unit="edit")


def _report(stage: str, means: dict[str, float]) -> None:
    print(f"{stage}: " + "  ".join(f"{k}={means[k]:.4f}" for k in SUMMARY_KEYS + EXTRA_KEYS + GEN_KEYS if k in means),
          flush=True)
