#!/usr/bin/env python
"""Time one optimisation step of an edit (forward and backward) for several numbers of context
prefixes, and the output projection's share of it: where an edit's seconds go on this machine.

    python tools/probe_step.py                          # SmolLM2, ZsRE dev record 500, 10 and 4 prefixes
    python tools/probe_step.py --prefixes 10 6 4 2 --threads 2

Prints, per setting, the edit batch's shape, answer positions and the median seconds of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def step_seconds(module, batch, repeats: int) -> float:
    """Median wall seconds of the edit losses, their backward and nothing else."""
    lower = module.lower_states(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module.edit_losses(batch, lower)["loss"].backward()
        module.memory.side.grad = None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def head_seconds(module, positions: int, repeats: int) -> float:
    """Median wall seconds of the output projection, forward and backward, at ``positions`` rows."""
    hidden = torch.randn(positions, module.model.lm_head.in_features, requires_grad=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module.model.lm_head(hidden).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="data/zsre/zsre_edit_1000.json")
    parser.add_argument("--record", type=int, default=500, help="record index (default: the first ZsRE dev record)")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[10, 4])
    parser.add_argument("--layer", type=int, default=26)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from repair_pl import RepairModule
    from repair_pl.data import EditDataModule

    module = RepairModule(model=args.model, method="repair", layer=args.layer)
    data = EditDataModule(path=args.data, ds_size=1, start=args.record)
    data.setup()
    record = data.records[0]
    for n in args.prefixes:
        module.memory.n_prefixes, module.memory.prefixes = n, None
        batch = module.prepare_edit(record)
        module.memory.begin_edit(record, batch, module)
        module.memory.mode = "edit"
        positions = batch["positions"].numel()
        step, head = step_seconds(module, batch, args.repeats), head_seconds(module, positions, args.repeats)
        print(f"prefixes {n}: batch {tuple(batch['input_ids'].shape)}, {positions} answer positions: "
              f"step {step:.3f} s, output projection {head:.3f} s ({head / step:.0%})", flush=True)
        module.memory.undo_edit()


if __name__ == "__main__":
    main()
