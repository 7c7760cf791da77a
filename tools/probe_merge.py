#!/usr/bin/env python
"""Probe how REPAIR's merge of a batch's shards keeps its edits: edit one batch of records with
error feedback off, keep the shards as they were just before the merge, then merge them in
several ways and score each merged memory (Rel / Gen / Loc, edits fully predicted). One edit
pass serves every variant; ``--dump`` keeps it on disk and ``--load`` reuses it.

    python tools/probe_merge.py --n 100 --dump runs/probe_merge_T100.pt      # dev records 500-599
    python tools/probe_merge.py --n 100 --load runs/probe_merge_T100.pt --scales 1.0 1.5 --margins 0.91 1.0

Variants: each shard alone (the edits of shard k scored on ``W + tau_k``: what the merge could
keep at best), the loss-aware merge (REPAIR's default), and uniform weights times each of
``--scales``, each with the routing threshold recalibrated at each of ``--margins``.
The module's settings are configs/zsre.yaml's, method repair, plus ``--setting`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from repair_pl.components import recalibrate_routing  # noqa: E402

METRICS = ("rewrite_acc", "rephrase_acc", "locality")


def edit_batch(module, records) -> dict:
    """Edit ``records`` as one batch and return the memory's state just before its merge."""
    memory, state = module.memory, {}
    merge = memory.merge_shards

    def keep_then_merge(*args, **kwargs):
        if not state:
            pending = memory._pending()
            state.update(shards=[s.clone() for s in pending], losses=memory._pending_losses(pending),
                         merged=memory.merged.clone(), min_in_scope=memory.min_in_scope)
        return merge(*args, **kwargs)

    memory.merge_shards = keep_then_merge
    start, steps, ok = time.perf_counter(), 0, {}
    for record, result in module.edit_stream(records, progress=True):
        steps += result.steps
        ok[record.prompt] = result.success
    memory.merge_shards = merge
    plan = [[records.index(r) for r in group] for group in module.shard_plan]
    return {**state, "plan": plan, "success": [ok[r.prompt] for r in records], "steps": steps,
            "seconds": time.perf_counter() - start}


def score(module, records, reference) -> dict:
    from repair_pl.components import rewrite_correct
    from repair_pl.evaluate import evaluate_records

    ev = evaluate_records(module.logits_fn(), module.tokenizer, records, reference=reference,
                          batch_size=module.hparams.eval_batch_size, max_length=module.hparams.max_length)
    return {**{k: ev.means[k] for k in METRICS}, "correct": sum(rewrite_correct(module, records))}


def merged_variant(module, state, records, weights, margin) -> None:
    """Put the batch's shards back, merge them with ``weights`` (None: loss-aware), recalibrate."""
    memory = module.memory
    stack, memory.stack_shards = memory.stack_shards, False  # the saved shards are weights to merge as they are
    memory.shards, memory.shard_losses = [s.clone() for s in state["shards"]], list(state["losses"])
    memory.current_losses = []
    memory.merged = state["merged"].clone()
    with torch.no_grad():
        memory.side.copy_(memory.merged)
    memory.min_in_scope, module.routing_floor = state["min_in_scope"], None
    memory.merge_shards(weights=weights, loss_aware=weights is None)
    memory.stack_shards = stack
    recalibrate_routing(module, [r for r, ok in zip(records, state["success"]) if ok], margin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/zsre/zsre_edit_1000.json")
    parser.add_argument("--start", type=int, default=500, help="first record (ZsRE dev records are 500-999)")
    parser.add_argument("--n", type=int, default=100, help="records start..start+n-1, one batch")
    parser.add_argument("--routing_path", default=None,
                        help="routing text for records without their own (data.routing_path, e.g. a train split)")
    parser.add_argument("--setting", default="{}", help="JSON object of options over configs/zsre.yaml's "
                                                        "(as repair_pl.presets.preset takes them)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.91])
    parser.add_argument("--dump", default=None, help="save the pre-merge state here")
    parser.add_argument("--load", default=None, help="reuse a saved pre-merge state (no editing)")
    args = parser.parse_args(argv)

    from repair_pl.data import EditDataModule
    from repair_pl.evaluate import evaluate_records
    from repair_pl.models import load_model
    from repair_pl.cli import module_arguments
    from repair_pl.module import RepairModule
    from repair_pl.presets import preset
    from repair_pl.sweep import find_config

    settings = preset("repair", base=module_arguments(find_config("zsre")), error_feedback=False,
                      **json.loads(args.setting))
    model, tokenizer = load_model("smollm2")
    data = EditDataModule(args.data, start=args.start, ds_size=args.n, routing_path=args.routing_path)
    data.setup()
    records = data.records
    torch.manual_seed(0)
    module = RepairModule(model, tokenizer, **settings)
    reference = evaluate_records(module.logits_fn(edited=False), tokenizer, records,
                                 batch_size=module.hparams.eval_batch_size,
                                 max_length=module.hparams.max_length).locality_preds
    if args.load:
        state = torch.load(args.load)
    else:
        state = edit_batch(module, records)
        if args.dump:
            import io

            from repair_pl.checkpoint import write_file_atomic

            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_file_atomic(args.dump, buffer.getvalue())
    print(f"{len(state['shards'])} shards, {sum(state['success'])}/{len(records)} edits succeeded, "
          f"{state['steps'] / len(records):.1f} steps and {state['seconds'] / len(records):.2f} s per edit; "
          f"shard losses {[round(x, 3) for x in state['losses']]}", flush=True)

    from repair_pl.components import rewrite_correct

    memory = module.memory
    alone = 0
    for k, group in enumerate(state["plan"]):  # shard k alone: W + tau_k, routed for its own edits
        memory.shards, memory.merged = [], state["merged"].clone()
        with torch.no_grad():
            memory.side.copy_(state["shards"][k])
        memory.invalidate()
        memory.min_in_scope = 0.0  # route everything: the shard's own quality, not the router's
        alone += sum(rewrite_correct(module, [records[i] for i in group]))
    print(f"each shard alone: {alone}/{len(records)} edits fully predicted", flush=True)
    variants = [("loss-aware", None)] + [(f"uniform x{s}", [s] * len(state["shards"])) for s in args.scales]
    for name, weights in variants:
        for margin in args.margins:
            merged_variant(module, state, records, weights, margin)
            m = score(module, records, reference)
            print(f"{name}, margin {margin}: Rel {m['rewrite_acc']:.3f}  Gen {m['rephrase_acc']:.3f}  "
                  f"Loc {m['locality']:.3f}  fully predicted {m['correct']}/{len(records)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
