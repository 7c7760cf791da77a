"""Distribution-aware memory: embed edits, cluster them, and plan shards cluster by cluster."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from repair_pl.data.records import EditRecord


@torch.no_grad()
def embed_prompts(module, prompts: list[str], batch_size: int = 32) -> Tensor:
    """Mean-pooled hidden states of the frozen model at the edited layer's input, L2-normalised."""
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = module.tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True)
        batch = {"input_ids": enc.input_ids.to(module.device), "attention_mask": enc.attention_mask.to(module.device)}
        hidden = module.lower_states(batch)[0][0].float()
        mask = batch["attention_mask"].unsqueeze(-1).float().to(hidden.device)  # differ under a device_map
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
    return torch.cat(out)


def cluster_labels(embeddings: Tensor, n_clusters: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster rows of ``embeddings`` with k-means or agglomerative (cosine, average linkage)."""
    n_clusters = max(1, min(n_clusters, len(embeddings)))
    if n_clusters == 1:
        return np.zeros(len(embeddings), dtype=int)
    x = embeddings.numpy()
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        return AgglomerativeClustering(n_clusters=n_clusters, metric="cosine", linkage="average").fit_predict(x)
    raise ValueError(f"cluster method must be 'kmeans' or 'agglomerative', got {method!r}")


def plan_shards(records: list[EditRecord], labels: np.ndarray, heterogeneous: bool = False,
                max_size: int | None = None) -> list[list[EditRecord]]:
    """Group records into shards: one per cluster (homogeneous), or, for the ablation, the same
    shard sizes filled round-robin across clusters so that every shard mixes clusters. With
    ``max_size``, a cluster larger than it is cut into the fewest shards of at most ``max_size``
    records, of sizes that differ by one at most (k-means clusters are uneven)."""
    groups = [[r for r, lab in zip(records, labels) if lab == c] for c in sorted(set(labels.tolist()))]
    if max_size is not None:
        groups = [g[i * len(g) // n: (i + 1) * len(g) // n] for g in groups
                  for n in [math.ceil(len(g) / max_size)] for i in range(n)]
    if not heterogeneous:
        return groups
    flat = [r for i in range(max(map(len, groups))) for g in groups if i < len(g) for r in [g[i]]]
    sizes, out, start = [len(g) for g in groups], [], 0
    for size in sizes:
        out.append(flat[start: start + size])
        start += size
    return out


def default_clusters(n_records: int, cluster_size: int) -> int:
    return max(1, math.ceil(n_records / cluster_size))
