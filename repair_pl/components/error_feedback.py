"""Error feedback: after a batch is merged, re-check its edits and re-edit what was lost."""

from __future__ import annotations

import torch

from repair_pl.components.base import EditStreamCallback, recalibrate_routing
from repair_pl.evaluate import predict_answers


@torch.no_grad()
def rewrite_correct(module, records: list) -> list[bool]:
    """Whether each record's target is fully predicted (teacher-forced) by the routed model."""
    out = []
    fn = module.logits_fn(edited=True)
    for batch in module.encoded_records(records):
        preds, target, mask = predict_answers(fn, batch)
        out += (((preds == target) | ~mask).all(-1)).tolist()
    return out


class ErrorFeedback(EditStreamCallback):
    """After a batch is merged, re-check its edits through the routed model. A shard whose error
    rate exceeds ``tau_prune`` is re-initialised: all its edits are re-edited; other failed edits
    are re-edited one by one ("reintegration"), then merged again; at most ``max_retries`` rounds.

    A round is kept only if it leaves more of the batch's edits fully predicted than before it;
    otherwise the memory goes back to its state before the round and error feedback stops (ours:
    a hard edit re-trained at full budget can overwrite the entries that hold its neighbours).
    ``counts`` says how many edits were re-edited, how many rounds were undone and how many edits
    still fail."""

    def __init__(self, tau_prune: float = 0.5, max_retries: int = 2):
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"ErrorFeedback.max_retries must be an integer >= 0, got {max_retries!r}")
        self.tau_prune, self.max_retries = tau_prune, max_retries

    def bind(self, module) -> None:
        self.counts = {"reintegrated": 0, "pruned_shards": 0, "undone_rounds": 0, "still_failing": 0}

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        shards = getattr(module, "shard_plan", None) or [records]
        succeeded = {id(r): res.success for r, res in zip(records, results)}
        correct = dict(zip(map(id, records), rewrite_correct(module, records)))
        for _ in range(self.max_retries):
            redo = []
            for group in shards:
                errors = [r for r in group if not correct[id(r)]]
                if len(group) > 1 and len(errors) / len(group) > self.tau_prune:
                    self.counts["pruned_shards"] += 1
                    redo += group
                else:
                    redo += errors
            if not redo:
                break
            before = module.snapshot_edits()
            self.counts["reintegrated"] += len(redo)
            for record in redo:
                succeeded[id(record)] = module.reedit(record).success
            module.memory.merge_shards(loss_aware=False)
            held = redo if module.memory.retrieve else records  # retrieve: the round's edits are a memory of their own
            recalibrate_routing(module, [r for r in held if succeeded[id(r)]], module.components.recalibration_margin)
            now = dict(zip(map(id, records), rewrite_correct(module, records)))
            if sum(now.values()) <= sum(correct.values()):
                module.restore_edits(*before)
                self.counts["undone_rounds"] += 1
                break
            correct, shards = now, [redo]
        self.counts["still_failing"] += sum(not ok for ok in correct.values())
