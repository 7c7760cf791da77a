"""Distribution-aware memory: cluster a batch of edits, one shard per cluster, merge after it."""

from __future__ import annotations

from repair_pl.clustering import cluster_labels, default_clusters, embed_prompts, plan_shards
from repair_pl.components.base import EditStreamCallback, recalibrate_routing

CLUSTER_METHODS = ("kmeans", "agglomerative")


class DistributionAwareMemory(EditStreamCallback):
    """Before a batch of edits: embed the prompts (hidden states of the frozen model at the
    edited layer), cluster them, and edit cluster by cluster, one shard per cluster, so that
    each shard holds semantically similar edits. After the batch: merge its shards into the
    side memory (TIES by default, the memory's ``merge_method``) and re-measure the routing
    threshold on the merged memory (:func:`~repair_pl.components.base.recalibrate_routing`).

    Args:
        cluster_size: edits per cluster (the number of clusters is the batch size / this).
        n_clusters: a fixed number of clusters instead.
        cluster_method: ``"kmeans"`` or ``"agglomerative"`` (cosine, average linkage).
        heterogeneous: deliberately mix clusters across shards (the ablation).
        disjoint_masks: the batch's shards get non-overlapping masks of ``min(mask_ratio, 1 /
            n_shards)`` each, so a TIES merge keeps every shard whole (ours).
        loss_aware_merge: weigh shards by 1 / (their edits' mean final loss + ``merge_eps``);
            in TIES the weights decide between shards that share an entry, so with disjoint
            masks they change nothing.
        merge_eps: see ``loss_aware_merge``.
        shards_apart: keep every shard as a memory of its own instead of merging a batch's shards
            (ours): an edit then meets no other shard's change at inference. Needs a side memory
            that keeps memories apart and routes to the one that holds an edit (``retrieve`` and a
            ``router``); masks then need not be disjoint.
        train_ahead: hand the memory each shard's planned edits (``SideMemory.plan_replay``), so
            every edit of a shard is trained beside all the others, those to come included: the
            shard's first fit learns the whole cluster at once and the later fits mostly confirm
            their own edit in a few steps (ours). Needs the memory's ``n_replay`` >= ``cluster_size``
            - 1 to cover a whole shard. Each edit is still its own fit: its success, rollback and
            re-edit are its own, and an edit that fails is dropped from its shard's plan.
        max_shard_size: cut a cluster larger than this into shards of at most this many edits
            (ours; ``None``: one shard per cluster, however large). K-means clusters are uneven
            (a batch of 100 in clusters of 10 has clusters of 20-40); a shard larger than the
            memory's ``n_replay`` + 1 no longer replays its first edits when it takes its last.
    """

    def __init__(self, cluster_size: int = 5, n_clusters: int | None = None, cluster_method: str = "kmeans",
                 heterogeneous: bool = False, disjoint_masks: bool = True, loss_aware_merge: bool = True,
                 merge_eps: float = 0.05, shards_apart: bool = False, train_ahead: bool = False,
                 max_shard_size: int | None = None):
        if cluster_method not in CLUSTER_METHODS:
            raise ValueError(f"DistributionAwareMemory.cluster_method must be one of {CLUSTER_METHODS}, "
                             f"got {cluster_method!r}")
        if not isinstance(cluster_size, int) or cluster_size < 1:
            raise ValueError(f"DistributionAwareMemory.cluster_size must be a positive integer, got {cluster_size!r}")
        if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size < 1):
            raise ValueError(f"DistributionAwareMemory.max_shard_size must be a positive integer or null, "
                             f"got {max_shard_size!r}")
        self.cluster_size, self.n_clusters, self.cluster_method = cluster_size, n_clusters, cluster_method
        self.heterogeneous, self.disjoint_masks = heterogeneous, disjoint_masks
        self.loss_aware_merge, self.merge_eps, self.shards_apart = loss_aware_merge, merge_eps, shards_apart
        self.train_ahead, self.max_shard_size = train_ahead, max_shard_size

    def bind(self, module) -> None:
        memory = module.memory
        if self.shards_apart and not (memory.retrieve and memory.router is not None):
            raise ValueError("DistributionAwareMemory.shards_apart keeps each shard as a memory of its own: it needs "
                             "model.memory.retrieve true and a model.memory.router (to reach the right one)")
        if self.train_ahead and not getattr(memory, "n_replay", 0):
            raise ValueError("DistributionAwareMemory.train_ahead trains each edit beside its shard's other edits: "
                             "it needs model.memory.n_replay >= cluster_size - 1 (it is 0)")
        memory.disjoint = self.disjoint_masks and not self.shards_apart
        self.shard_ends: set[int] = set()
        self.plan: list[list] = []
        self._done = 0

    def shards(self, module, records: list) -> list[list]:
        """The shards of a batch of ``records``, in the order they are edited: the prompts embedded
        by ``module``'s frozen model, clustered, one shard per cluster (cut at ``max_shard_size``).
        Changes nothing on ``module``."""
        k = self.n_clusters or default_clusters(len(records), self.cluster_size)
        embeddings = embed_prompts(module, [r.prompt for r in records])
        labels = cluster_labels(embeddings, k, self.cluster_method, module.hparams.seed)
        return plan_shards(records, labels, self.heterogeneous, self.max_shard_size)

    def on_edit_batch_start(self, module, records: list) -> list:
        self.plan = self.shards(module, records)
        module.memory.plan_shards(len(self.plan))
        ends, total = set(), 0
        for group in self.plan:
            total += len(group)
            ends.add(total)
        self.shard_ends, self._done = ends, 0
        module.shard_plan = self.plan
        self._plan_next_shard(module, 0)
        return [r for group in self.plan for r in group]

    def on_edit_end(self, module, record, result) -> None:
        if result.retry:
            return
        self._done += 1
        if self._done in self.shard_ends:
            if self.shards_apart:  # the shard becomes a memory of its own; the next starts from W
                module.memory.merge_shards()
            else:
                module.memory.save_shard()
            self._plan_next_shard(module, sum(end <= self._done for end in self.shard_ends))

    def _plan_next_shard(self, module, index: int) -> None:
        if self.train_ahead and index < len(self.plan):
            module.memory.plan_replay(self.plan[index], module.tokenizer)

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        module.memory.merge_shards(loss_aware=self.loss_aware_merge, eps=self.merge_eps)
        recalibrate_routing(module, [r for r, res in zip(records, results) if res.success],
                            module.components.recalibration_margin)
