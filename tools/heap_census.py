#!/usr/bin/env python
"""What a long edit stream's process holds, block by block: runs ``scripts/edit.py fit`` with
the given arguments and, at the end of each block of 100 edits (after its batch), prints the
RSS, glibc's bytes in use and free in its heap (``mallinfo2``, after ``malloc_trim``), the
bytes of the live CPU tensors (each storage once) and the side memory's stored shards and
memories with their bytes.

    python tools/heap_census.py --config configs/zsre.yaml --config configs/methods/repair_stream.yaml \\
        --data.start 500 --T 300 --data.ds_size 300 --model.dtype bfloat16 --generation false \\
        --trainer.default_root_dir runs/heap_census

Prints one markdown table row per block as it ends (glibc only: elsewhere the heap columns are 0).
Garbage collection before each census adds a second or two per block.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import repair_pl.cli as cli  # noqa: E402
import repair_pl.lifelong as lifelong  # noqa: E402
from repair_pl.host_memory import rss_mb, side_memory_mb, trim_heap  # noqa: E402

MB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mb() -> tuple[float, float]:
    """glibc's heap: (bytes in use, free bytes kept), in MB; (0, 0) without glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0.0, 0.0
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / MB, info.fordblks / MB


def live_tensor_mb() -> float:
    """Bytes of the CPU tensor storages that Python objects reach, each storage counted once."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / MB


def stored(module) -> tuple[int, float]:
    """(stored shards and memories, their MB) of ``module``'s side memory (none for a baseline)."""
    memory = module.memory
    return len(getattr(memory, "shards", [])) + len(getattr(memory, "memories", [])), side_memory_mb(module)["shards"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    held: dict = {}
    run_lifelong, note_block = cli.run_lifelong, lifelong._note_block

    def run(module, *args, **kwargs):
        held["module"] = module
        return run_lifelong(module, *args, **kwargs)

    def note(state: dict) -> None:
        closed = len(state["blocks"])
        note_block(state)
        if len(state["blocks"]) == closed:
            return
        trim_heap()
        in_use, free = heap_mb()
        n, kept_mb = stored(held["module"])
        print(f"| {state['blocks'][-1]['edits']} | {rss_mb():.0f} | {in_use:.0f} | {free:.0f} | "
              f"{live_tensor_mb():.0f} | {n} | {kept_mb:.0f} |", flush=True)

    cli.run_lifelong, lifelong._note_block = run, note
    try:
        print("| edits | RSS MB | heap in use MB | heap free MB | live CPU tensors MB | stored memories | their MB |\n"
              "|---|---|---|---|---|---|---|", flush=True)
        cli.main(["fit", *argv])
    finally:
        cli.run_lifelong, lifelong._note_block = run_lifelong, note_block


if __name__ == "__main__":
    main()
