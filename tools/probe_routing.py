#!/usr/bin/env python
"""Probe editing settings cheaply: edit the first N records in lifelong chunks of T once per
setting, then score each chunk's final memory at several routing thresholds (act_ratio only
changes evaluation, so one edit pass serves every threshold). Loads the model once.

    python tools/probe_routing.py --n 20 --T 10 --act_ratios 1.0 1.03 1.06 \\
        --setting '{"method": "wise", "lr": 5.0, "routing_weight": 0.2, "prompt_weight": 0.5}' \\
        --setting '{"method": "repair", "lr": 5.0, "routing_weight": 0.2, "prompt_weight": 0.5}'

Each --setting is a JSON object of a method and its options (:func:`repair_pl.presets.preset`).
Records default to ZsRE's dev records (``--start 500``): choose settings there, never on the
records a number is reported on. Prints, per setting, steps per
edit, edits whose target was reached, seconds per edit, interventions, and Rel/Gen/Loc per
act_ratio (means over chunks, as ``scripts/edit.py fit``).

With ``--edits RUN/edits`` nothing is edited: the saved state of a finished run (one chunk of
the first ``--n`` records, built with the one --setting) is scored at each act_ratio:

    python tools/probe_routing.py --n 100 --edits runs/repair_T100/edits --act_ratios 1.03 1.1 \
        --setting '{"method": "repair", "lr": 5.0, "routing_weight": 0.2, "prompt_weight": 0.5}'

For a REPAIR run edited as one batch this is the run with ``recalibration_margin`` x
act_ratio / 1.03 (the run's 1.03): below a margin of 1 every edit of the batch still routes at
its merge, so error feedback would have made the same decisions.

For a WISE-Retrieve state (``"retrieve": true``) it also prints how many edits' prompts pick their
own memory top-1 (edit i was written into memory i // merge_freq).

``--rescore mean|last`` (with ``--edits``) reads the routing score of the saved memory the other
way (``score_tokens``), re-measures the threshold at ``recalibration_margin`` x the weakest edit
as REPAIR's merge does (``--margin``), and prints how the scores of the edit prompts and of the unrelated
(locality) prompts overlap before scoring (docs/design.md, last-token routing):

    python tools/probe_routing.py --n 100 --edits runs/repair_T100_cluster20/edits --act_ratios 1.03 \
        --rescore last --setting '{"method": "repair", "lr": 5.0, "routing_weight": 0.2, "prompt_weight": 0.5,
        "act_ratio": 1.03, "stop_loss": 0.1, "max_lr_factor": 2.0, "cluster_size": 20, "score_tokens": "mean"}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from repair_pl.memory import SCORE_TOKENS  # noqa: E402

METRICS = ("rewrite_acc", "rephrase_acc", "locality")


def probe(module, records, T: int, act_ratios: list[float], reference) -> dict:
    """Edit ``records`` in chunks of ``T`` and score each chunk's memory at every act_ratio."""
    sums = {r: {k: [] for k in METRICS} for r in act_ratios}
    start_time, steps, reached = time.perf_counter(), 0, 0
    for start in range(0, len(records), T):
        chunk = records[start:start + T]
        module.reset_edits()
        for _, result in module.edit_stream(chunk, progress=False):
            steps += result.steps
            reached += bool(result.target_reached and not result.retry)
        for ratio, means in score_thresholds(module, chunk, act_ratios, reference[start:start + T]).items():
            for key in METRICS:
                sums[ratio][key].append(means[key])
    n = len(records)
    return {"steps_per_edit": steps / n, "reached": reached, "n": n,
            "seconds_per_edit": (time.perf_counter() - start_time) / n,
            "interventions": module.intervention_counts(),
            "by_act_ratio": {r: {k: sum(v) / len(v) for k, v in m.items()} for r, m in sums.items()}}


def score_thresholds(module, records, act_ratios: list[float], reference) -> dict[float, dict[str, float]]:
    """Rel/Gen/Loc of ``records`` through the module's memory at each act_ratio."""
    from repair_pl.evaluate import evaluate_records

    out = {}
    for ratio in act_ratios:
        module.memory.act_ratio = ratio
        module.memory.invalidate()
        ev = evaluate_records(module.logits_fn(), module.tokenizer, records, reference=reference,
                              batch_size=module.hparams.eval_batch_size, max_length=module.hparams.max_length)
        out[ratio] = {key: ev.means[key] for key in METRICS}
    return out


def rescore(module, records, score_tokens: str, margin: float) -> dict[str, float]:
    """Read the routing score of the module's memory as ``score_tokens``, put the threshold at
    ``margin`` x the weakest of ``records`` (REPAIR's recalibration, no floor), and return how
    edit prompts and unrelated prompts (each record's first locality prompt) overlap."""
    from dataclasses import replace

    from repair_pl.components import recalibrate_routing

    module.memory.score_tokens = score_tokens
    module.routing_floor = None
    recalibrate_routing(module, records, margin)
    edits = module.in_scope_scores(records)
    unrelated = module.in_scope_scores([replace(r, prompt=r.locality[0][0], target=r.locality[0][1])
                                        for r in records if r.locality])
    weakest, strongest = min(edits), max(unrelated)
    return {"edit_min": weakest, "edit_median": sorted(edits)[len(edits) // 2], "unrelated_max": strongest,
            "unrelated_above_weakest_edit": sum(u > weakest for u in unrelated),
            "edits_below_strongest_unrelated": sum(e < strongest for e in edits),
            "epsilon": module.memory.epsilon}


@torch.no_grad()
def retrieved_memories(module, records) -> list[int]:
    """WISE-Retrieve: the memory each record's prompt is routed to when the threshold is ignored
    (the best score relative to its memory's scale wins; -1 when every score is 0)."""
    memory, previous = module.memory, (module.memory.mode, module.memory.act_ratio)
    memory.mode, memory.act_ratio = "route", 0.0
    choices: list[int] = []
    try:
        for enc in module.encoded_records(records):
            module(enc.input_ids, enc.attention_mask, enc.prompt_mask)
            choices += memory.last_choice.tolist()
    finally:
        memory.mode, memory.act_ratio = previous
    return choices


def print_scores(by_ratio: dict[float, dict[str, float]]) -> None:
    for ratio, m in by_ratio.items():
        print(f"  act_ratio {ratio}: Rel {m['rewrite_acc']:.3f}  Gen {m['rephrase_acc']:.3f}  Loc {m['locality']:.3f}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/zsre/zsre_edit_1000.json")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--start", type=int, default=500, help="first record (ZsRE dev records are 500-999)")
    parser.add_argument("--n", type=int, default=20, help="records")
    parser.add_argument("--routing_path", default=None,
                        help="routing text for records without their own (data.routing_path, e.g. a train split)")
    parser.add_argument("--T", type=int, default=10, help="edits per lifelong chunk")
    parser.add_argument("--act_ratios", type=float, nargs="+", default=[1.0])
    parser.add_argument("--setting", action="append", required=True,
                        help="JSON object: method and options as repair_pl.presets.preset takes them")
    parser.add_argument("--margin", type=float, default=0.91, help="with --rescore: the recalibration margin")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--edits", default=None, help="score this saved state (a run's edits/ folder) instead of editing")
    parser.add_argument("--rescore", choices=SCORE_TOKENS, default=None,
                        help="with --edits: read the routing score this way and re-measure the threshold first")
    args = parser.parse_args(argv)
    try:
        settings = [json.loads(s) for s in args.setting]
    except json.JSONDecodeError as err:
        parser.error(f"--setting is not JSON: {err}")
    if args.edits and len(settings) != 1:
        parser.error("--edits scores one saved state: give exactly one --setting (the run's)")
    if args.rescore and not args.edits:
        parser.error("--rescore needs --edits (a saved state to re-read)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from repair_pl.data import EditDataModule
    from repair_pl.evaluate import evaluate_records
    from repair_pl.models import load_model
    from repair_pl.module import RepairModule
    from repair_pl.presets import preset

    model, tokenizer = load_model(args.model)
    data = EditDataModule(args.data, start=args.start, ds_size=args.n, routing_path=args.routing_path)
    data.setup()
    records = data.records
    reference = None
    for setting in settings:
        torch.manual_seed(0)
        module = RepairModule(model, tokenizer, **preset(**setting))
        if reference is None:
            reference = evaluate_records(module.logits_fn(edited=False), tokenizer, records,
                                         batch_size=module.hparams.eval_batch_size,
                                         max_length=module.hparams.max_length).locality_preds
        if args.edits:
            module.load_edits(args.edits)
            scores = module.in_scope_scores(records)
            print(f"{args.edits}: {len(records)} records, in-scope scores min {min(scores):.2f} "
                  f"median {sorted(scores)[len(scores) // 2]:.2f}, saved min_in_scope {module.memory.min_in_scope:.2f}")
            if args.rescore:
                overlap = rescore(module, records, args.rescore, args.margin)
                print(f"score_tokens={args.rescore}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                                 for k, v in overlap.items()), flush=True)
            if getattr(module.memory, "memories", None):  # WISE-Retrieve: does each edit's prompt find its own memory?
                per = module.memory.merge_freq or len(records)
                chosen = retrieved_memories(module, records)
                own = sum(c == i // per for i, c in enumerate(chosen))
                counts = {k: chosen.count(k) for k in sorted(set(chosen))}
                print(f"retrieve: {len(module.memory.memories)} memories of {per} edits; top-1 is the edit's own "
                      f"memory for {own}/{len(records)} edits; edits per chosen memory {counts}", flush=True)
            print_scores(score_thresholds(module, records, args.act_ratios, reference))
            return 0
        out = probe(module, records, args.T, args.act_ratios, reference)
        print(f"{json.dumps(setting)}: steps/edit {out['steps_per_edit']:.1f}, reached {out['reached']}/{out['n']}, "
              f"{out['seconds_per_edit']:.2f} s/edit, interventions {out['interventions']}")
        print_scores(out["by_act_ratio"])
        module.unwrap_model()  # the next setting starts from the plain model
    return 0


if __name__ == "__main__":
    sys.exit(main())
