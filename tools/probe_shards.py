#!/usr/bin/env python
"""Which edits of a REPAIR run were re-edited, by the size of their shard and their place in it:
re-plans each batch's shards as the run did (the frozen model's prompt embeddings at the
edited layer, k-means with the run's cluster size and seed) and reads each record's re-edits
from the run's ``results.json``.

    python tools/probe_shards.py runs/stream/zsre/repair_stream_T1000/results.json
    python tools/probe_shards.py runs/dev/t200/results.json --start 500 --cluster_size 10 --replay 9

Prints the shard sizes and the share of re-edited records in shards of at most ``--replay`` + 1
edits, in larger shards, and there among the records that come more than ``--replay`` + 1
before the shard's end (no longer replayed when the shard takes its last edits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def shard_places(module, records, batch: int, planner) -> list[tuple]:
    """``(shard size, place in the shard, record)`` for every record, batch by batch, as
    ``planner`` (a :class:`~repair_pl.components.DistributionAwareMemory`) plans them."""
    out = []
    for start in range(0, len(records), batch):
        for shard in planner.shards(module, records[start: start + batch]):
            out += [(len(shard), place, record) for place, record in enumerate(shard)]
    return out


def share(rows, reedited) -> str:
    return f"{sum(reedited[r.case_id] for *_, r in rows)} of {len(rows)}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the run's results.json")
    parser.add_argument("--data", default="data/zsre/zsre_edit_1000.json")
    parser.add_argument("--start", type=int, default=0, help="the run's data.start")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layer", type=int, default=26)
    parser.add_argument("--batch", type=int, default=100, help="the run's components.edit_batch_size")
    parser.add_argument("--cluster_size", type=int, default=10)
    parser.add_argument("--max_shard_size", type=int, default=None)
    parser.add_argument("--replay", type=int, default=9, help="the memory's n_replay")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from repair_pl import RepairModule
    from repair_pl.components import DistributionAwareMemory
    from repair_pl.data import EditDataModule

    with open(args.results) as f:
        results = json.load(f)
    reedited = {case["case_id"]: case["edit"].get("retries", 0) > 0 for case in results}
    data = EditDataModule(path=args.data, ds_size=len(results), start=args.start)
    data.setup()
    if [r.case_id for r in data.records] != [case["case_id"] for case in results]:
        parser.error(f"{args.results} does not hold records {args.start}-{args.start + len(results) - 1} of {args.data}: "
                     f"give the run's --start and --data")
    module = RepairModule(model=args.model, method="repair", layer=args.layer)
    planner = DistributionAwareMemory(cluster_size=args.cluster_size, max_shard_size=args.max_shard_size)
    rows = shard_places(module, data.records, args.batch, planner)
    window = args.replay + 1
    small = [x for x in rows if x[0] <= window]
    large = [x for x in rows if x[0] > window]
    print("shard sizes:", " ".join(map(str, sorted({size for size, *_ in rows}))))
    print(f"re-edited in shards of at most {window}: {share(small, reedited)}")
    print(f"re-edited in larger shards: {share(large, reedited)}; of those, more than {window} before the shard's "
          f"end: {share([x for x in large if x[1] < x[0] - window], reedited)}, "
          f"in its last {window}: {share([x for x in large if x[1] >= x[0] - window], reedited)}")


if __name__ == "__main__":
    main()
