"""Between batches of edits: distribution-aware sharding, merging, and error feedback."""

from __future__ import annotations

import copy

import torch

from repair_pl.callbacks.base import EditStreamCallback
from repair_pl.clustering import cluster_labels, default_clusters, embed_prompts, plan_shards
from repair_pl.evaluate import predict_answers


class DistributionAwareMemory(EditStreamCallback):
    """Before a batch of edits: embed the prompts (hidden states of the frozen model at the
    edited layer), cluster them, and edit cluster by cluster, one shard per cluster, so that
    each shard holds semantically similar edits. ``heterogeneous=True`` deliberately mixes
    clusters across shards (the ablation). With disjoint masks (the module's ``disjoint_masks``)
    the batch's shards get non-overlapping masks sized to fit (:meth:`SideMemory.plan_shards`)."""

    def __init__(self, cluster_size: int = 5, n_clusters: int | None = None, method: str = "kmeans",
                 heterogeneous: bool = False, seed: int = 0):
        self.cluster_size, self.n_clusters, self.method = cluster_size, n_clusters, method
        self.heterogeneous, self.seed = heterogeneous, seed
        self.shard_ends: set[int] = set()
        self.plan: list[list] = []
        self._done = 0

    def on_edit_batch_start(self, module, records: list) -> list:
        k = self.n_clusters or default_clusters(len(records), self.cluster_size)
        labels = cluster_labels(embed_prompts(module, [r.prompt for r in records]), k, self.method, self.seed)
        self.plan = plan_shards(records, labels, self.heterogeneous)
        module.memory.plan_shards(len(self.plan))
        ends, total = set(), 0
        for group in self.plan:
            total += len(group)
            ends.add(total)
        self.shard_ends, self._done = ends, 0
        module.shard_plan = self.plan
        return [r for group in self.plan for r in group]

    def on_edit_end(self, module, record, result) -> None:
        if result.retry:
            return
        self._done += 1
        if self._done in self.shard_ends:
            module.memory.save_shard()


class MemoryMerging(EditStreamCallback):
    """After a batch of edits, merge the stored shards (and the current one) into the side
    memory (TIES by default, the module's ``merge_method``); with ``loss_aware`` shards whose
    edits ended with a lower loss weigh more (weight = 1 / (mean final loss + eps)). In TIES the
    weights decide between shards that share an entry, so with disjoint masks they change nothing."""

    def __init__(self, loss_aware: bool = True, eps: float = 0.05):
        self.loss_aware, self.eps = loss_aware, eps

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        module.memory.merge_shards(loss_aware=self.loss_aware, eps=self.eps)
        module.recalibrate_routing([r for r, res in zip(records, results) if res.success])


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
        self.tau_prune, self.max_retries = tau_prune, max_retries
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
            tensors, meta = module.edited_state()  # on CPU it shares storage with the memory: copy it
            before = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)
            self.counts["reintegrated"] += len(redo)
            for record in redo:
                succeeded[id(record)] = module.reedit(record).success
            module.memory.merge_shards(loss_aware=False)
            module.recalibrate_routing([r for r in records if succeeded[id(r)]])
            now = dict(zip(map(id, records), rewrite_correct(module, records)))
            if sum(now.values()) <= sum(correct.values()):
                module.restore_edits(*before)
                self.counts["undone_rounds"] += 1
                break
            correct, shards = now, [redo]
        self.counts["still_failing"] += sum(not ok for ok in correct.values())
