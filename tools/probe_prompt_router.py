#!/usr/bin/env python
"""Where a long stream's prompt routing breaks, without editing anything: key the first k edit
prompts of a dataset in a :class:`~repair_pl.memory.PromptRouter` (as a REPAIR run with the
prompt router keys them, one key per edit) and route those k records' rephrasings and locality
prompts, for several k.

    python tools/probe_prompt_router.py data/counterfact/counterfact_edit_2000.json --at 10 100 1000 2000
    python tools/probe_prompt_router.py data/zsre/zsre_edit_1000.json --at 10 100 1000 --threshold 0.7

Prints per k the share of rephrasings routed to their own edit's key (a routed rephrasing can
still be answered right when its nearest key is another edit of the same memory, so this is a
floor on what routing allows for Gen), routed to another key, and not routed; and the share of
locality prompts routed at all (a routed locality prompt runs through an edited memory, so one
minus this is about the most Loc can be where an edit changes what it routes). ``--examples N``
shows N routed locality prompts of the largest k beside the edit prompt that took them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def routing_by_size(records, router, at) -> list[dict]:
    """For each k in ``at``: ``router`` keyed with the first k records' prompts, and how it routes
    their rephrasings (``own``/``other``/``none``) and locality prompts (``loc_routed``, and
    ``routed_locality``: each routed one as ``(prompt, edit prompt it reached, similarity)``)."""
    rows, keyed = [], 0
    for k in sorted(set(min(k, len(records)) for k in at)):
        for i in range(keyed, k):
            router.add(records[i].prompt, i)
        keyed = k
        rephrase = [(i, p) for i, r in enumerate(records[:k]) for p in r.rephrases]
        locality = [(i, p) for i, r in enumerate(records[:k]) for p, _ in r.locality]
        row = {"k": k, "rephrases": len(rephrase), "locality": len(locality)}
        if rephrase:
            choice, _ = router.route([p for _, p in rephrase])
            own = sum(int(c) == i for (i, _), c in zip(rephrase, choice))
            none = int((choice < 0).sum())
            row.update(own=own / len(rephrase), other=(len(rephrase) - own - none) / len(rephrase),
                       none=none / len(rephrase))
        if locality:
            choice, similarity = router.route([p for _, p in locality])
            row["loc_routed"] = float((choice >= 0).float().mean())
            row["routed_locality"] = [(p, records[int(c)].prompt, float(s))
                                      for (_, p), c, s in zip(locality, choice, similarity) if c >= 0]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    from repair_pl.data import load_records
    from repair_pl.memory import PromptRouter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an edit file (any format load_records reads)")
    parser.add_argument("--at", nargs="+", type=int, default=[10, 100, 1000], help="numbers of edits keyed")
    parser.add_argument("--start", type=int, default=0, help="first record of the stream")
    parser.add_argument("--threshold", type=float, default=0.7, help="PromptRouter.threshold")
    parser.add_argument("--encoder", default=None, help="PromptRouter.encoder (default: the bundled MiniLM)")
    parser.add_argument("--examples", type=int, default=0, help="routed locality prompts to show")
    args = parser.parse_args(argv)
    records = load_records(args.path)[0][args.start:]
    router = PromptRouter(args.threshold, args.encoder)
    router.bind()
    rows = routing_by_size(records, router, args.at)
    print(f"{'edits':>6} | rephrase: own / other / none | locality routed")
    for row in rows:
        reph = (f"{row['own']:.3f} / {row['other']:.3f} / {row['none']:.3f}" if row["rephrases"]
                else "no rephrasings".ljust(27))
        loc = f"{row['loc_routed']:.3f}" if row["locality"] else "no locality prompts"
        print(f"{row['k']:>6} | {reph:<27} | {loc}")
    for prompt, edit, similarity in rows[-1].get("routed_locality", [])[: args.examples]:
        print(f"  {similarity:.2f}  {prompt!r} -> edit {edit!r}")


if __name__ == "__main__":
    main()
