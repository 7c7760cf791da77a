"""A long edit stream over several processes (DDP): records sharded, metrics synced.

The lifelong protocol resets the side memory between chunks of T edits (and reseeds it), so the
chunks are independent: process ``r`` of ``W`` edits and evaluates chunks ``r, r+W, r+2W, ...``
on its own copy of the model. Every score is a mean over scored rows, so the means of the whole
stream are torchmetrics ``MeanMetric`` states (sum, count) all-reduced over the processes; they
equal the single-process means up to float summation order. Processes are started and the process
group is set up by Lightning Fabric (``ddp``: NCCL on GPUs, gloo on CPUs).

Within a process each edit is still a single-device short ``fit``: the edit steps of one record
depend on the previous edit, so they are not data-parallel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torchmetrics.aggregation import MeanMetric

from repair_pl.checkpoint import write_file_atomic, write_json_atomic
from repair_pl.data.records import EditRecord
from repair_pl.evaluate import evaluate_records
from repair_pl.generation import GenerationCheck, generation_scores, generation_summary
from repair_pl.lifelong import _markdown, _report, chunk_spread, run_lifelong


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def chunk_indices(n_records: int, T: int, rank: int, world_size: int) -> list[int]:
    """Indices of the records in this rank's chunks: chunk ``c`` (records ``cT .. cT+T-1``)
    goes to rank ``c % world_size``. Only the stream's last chunk may be shorter than T, and it
    is the last of its rank's, so the rank's records chunk by T exactly as in one process."""
    n_chunks = math.ceil(n_records / T)
    return [i for c in range(rank, n_chunks, world_size) for i in range(c * T, min(n_records, (c + 1) * T))]


def case_scores(cases: Sequence[dict]) -> dict[str, list[float]]:
    """Every scored row of per-case results (EasyEdit shape), pooled by metric name; the
    generated-answer rows (a case's ``"gen"``) under their summary names (``rewrite_gen_em``, ...)."""
    pools: dict[str, list[float]] = {}
    for case in cases:
        for key, values in case.items():
            if key == "locality":
                key, values = "locality", values["neighborhood_acc"]
            if isinstance(values, list):
                pools.setdefault(key, []).extend(v for v in values if not math.isnan(v))
        for key, values in generation_scores(case.get("gen")).items():
            pools.setdefault(key, []).extend(values)
    return pools


def synced_means(scores: dict[str, list[float]], device: str | torch.device = "cpu") -> dict[str, float]:
    """Means over the rows of all processes: one float64 ``MeanMetric`` per metric, states
    reduced by torchmetrics' distributed sync (a plain mean without a process group)."""
    names = set(scores)
    if rank_and_world()[1] > 1:  # every rank must sync the same metrics in the same order
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(names))
        names = set().union(*map(set, gathered))
    means = {}
    for name in sorted(names):
        metric = MeanMetric(nan_strategy="ignore").to(device)
        metric.set_dtype(torch.float64)
        values = scores.get(name, [])
        # An empty update keeps the count at 0 but marks the metric as updated (no warning).
        metric.update(torch.tensor(values, dtype=torch.float64, device=device))
        value = float(metric.compute())
        if not math.isnan(value):  # NaN: no process scored a row of this metric
            means[name] = value
    return means


def evaluate_sharded(module, records: Sequence[EditRecord], reference=None, edited: bool = True) -> dict[str, float]:
    """Evaluate this rank's share (``records[rank::world]``) of ``records`` through ``module``
    (a :class:`~repair_pl.module.RepairModule`) and return the means over all ranks' rows.
    ``reference``: the unedited model's locality predictions for all ``records``. Call it on
    every rank of an initialised process group (or without one: a plain evaluation). Teacher-forced
    scores only; the generated-answer scores come with :func:`run_lifelong_sharded`."""
    rank, world = rank_and_world()
    mine = list(records[rank::world])
    if not mine:
        return synced_means({}, _sync_device(module))
    evaluation = evaluate_records(module.logits_fn(edited=edited), module.tokenizer, mine,
                                  reference=None if reference is None else list(reference[rank::world]),
                                  batch_size=module.hparams.eval_batch_size, max_length=module.hparams.max_length,
                                  device=module.device)
    return synced_means(case_scores(evaluation.cases), _sync_device(module))


def run_lifelong_sharded(module, records: list[EditRecord], out_dir: str | Path, T: int | None = None,
                         dataset: str = "custom", checkpoint_every: int | None = None,
                         progress: bool = False, generation: GenerationCheck | None = None) -> dict:
    """The lifelong protocol of :func:`~repair_pl.lifelong.run_lifelong` with its chunks spread
    over the processes of an initialised process group. Each rank writes its own
    ``out_dir/rank{r}/``; rank 0 writes ``out_dir/results.json`` (all cases, in stream order),
    ``summary.json`` and ``summary.md`` as one process would. Returns the summary on every rank.
    ``checkpoint_every``: each rank checkpoints (and resumes) its own share in its folder.
    ``generation``: as in ``run_lifelong``; each rank generates for its own chunks (its pre-edit
    answers are the reference for them) and the means are synced like the others."""
    rank, world = rank_and_world()
    T = T or len(records)
    if T > len(records):
        raise ValueError(f"T={T} is larger than the {len(records)} records of the data (lower T or raise data.ds_size)")
    mine = chunk_indices(len(records), T, rank, world)
    local: dict = {"results": [], "n_failed": 0, "steps": 0.0, "seconds": 0.0, "interventions": {}}
    if mine:
        rank_dir = Path(out_dir) / f"rank{rank}"
        resume = {"checkpoint_every": checkpoint_every} if checkpoint_every else {}
        summary = run_lifelong(module, [records[i] for i in mine], rank_dir, T=T, dataset=dataset,
                               progress=progress and rank == 0, generation=generation, **resume)
        local = {"results": json.loads((rank_dir / "results.json").read_text()), "n_failed": summary["n_failed"],
                 "steps": summary["steps_per_edit"] * len(mine), "seconds": summary["seconds_per_edit"] * len(mine),
                 "interventions": summary["interventions"]}
    device = _sync_device(module)
    pre = synced_means(case_scores([r["pre"] for r in local["results"]]), device)
    post = synced_means(case_scores([r["post"] for r in local["results"]]), device)
    parts: list = [{**local, "indices": mine}]
    if world > 1:  # the per-case results and counters travel as objects, to be written by rank 0
        parts = [None] * world
        dist.all_gather_object(parts, {**local, "indices": mine})
    order = sorted((i, r) for part in parts for i, r in zip(part["indices"], part["results"]))
    interventions: dict[str, int] = {}
    for part in parts:
        for key, value in part["interventions"].items():
            interventions[key] = interventions.get(key, 0) + value
    n = len(records)
    summary = {"method": module.method, "dataset": dataset, "T": T, "n_edits": n, "pre": pre, "post": post,
               "seconds_per_edit": sum(p["seconds"] for p in parts) / n, "steps_per_edit": sum(p["steps"] for p in parts) / n,
               "n_failed": sum(p["n_failed"] for p in parts), "interventions": interventions, "world_size": world,
               **chunk_spread([r for _, r in order], T)}  # rank 0's, as one process reports it
    if generation is not None:
        summary["generation"] = generation_summary(module.tokenizer, generation)
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _report("post-edit (all ranks)", post)
        write_json_atomic(out / "results.json", [r for _, r in order], indent=1)
        write_file_atomic(out / "summary.md", _markdown(summary))
        write_json_atomic(out / "summary.json", summary, indent=1)  # last: the run is done
    if world > 1:  # every rank returns with rank 0's files on disk
        dist.barrier()
    return summary


RANK_WAIT = timedelta(days=2)
"""How long a process waits at a collective for the others: a rank that has edited its chunks waits
at the final gather while the others edit theirs (ranks with one chunk fewer wait a whole chunk,
longer than the process group's default 30 minutes)."""


def launch(accelerator: str = "auto", devices: int | str = "auto", num_nodes: int = 1):
    """Start the processes and the process group with Lightning Fabric's ``ddp`` strategy (the
    script is re-run once per extra device, as ``Trainer(strategy="ddp")`` does) and return the
    Fabric; ``fabric.device`` is this process's device."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=DDPStrategy(timeout=RANK_WAIT))
    fabric.launch()
    return fabric


def shutdown() -> None:
    """Leave the process group cleanly at the end of a run: all ranks meet, then each destroys
    it. A rank that exits with the group still open can take a peer down with it (a gloo peer
    was seen to end with SIGABRT after the run had finished)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sync_device(module) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return module.device
    return torch.device("cpu")
