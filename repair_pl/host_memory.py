"""Host memory over a long edit stream: freed heap pages back to the system, bounded kernel caches,
what the edits occupy."""

from __future__ import annotations

import ctypes
import functools
import os

KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""The environment variables that size oneDNN's and PyTorch's (ideep) caches of CPU kernels."""


def rss_mb() -> float:
    """The process's resident memory now, in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the free pages of glibc's heap to the system (``malloc_trim(0)``).

    An edit stream frees caches of varying size after each batch (the lower layers' outputs
    kept for re-edits, an undoable round's copy of the side memory); glibc keeps such freed
    memory for later and the process's RSS would grow with the stream. A few milliseconds.
    Returns False where there is no glibc (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def bound_kernel_caches(capacity: int = 64) -> None:
    """Keep at most ``capacity`` compiled CPU kernels in each of oneDNN's caches, unless the
    environment already sizes them (:data:`KERNEL_CACHES`).

    On a CPU, PyTorch runs bf16 and fp16 matrix products through oneDNN, which keeps a kernel
    per input shape (about 0.3 MB each, 1024 per cache by default). Edit batches come in
    hundreds of shapes (rows x tokens), so with the defaults a bf16 stream grows by several
    hundred MB over its first few hundred edits; one edit's fit reuses a few dozen kernels, so
    64 lose no speed. fp32 products and GPUs do not use these caches. The sizes are read when
    the first such kernel is built: call this before the model runs (``repair-pl`` does)."""
    if not isinstance(capacity, int) or capacity < 1:  # a capacity of 0 crashes PyTorch's cache
        raise ValueError(f"kernel cache capacity must be an integer >= 1, got {capacity!r}")
    for name in KERNEL_CACHES:
        os.environ.setdefault(name, str(capacity))


def side_memory_mb(module) -> dict:
    """Sizes of what the edits occupy: ``side`` (W'; for the baselines FT-L's weight copy or
    GRACE's codebook), ``shards`` (stored shards and retrieve memories), ``total`` (also the
    merged copy and the mask)."""
    from repair_pl.memory import SideMemory

    m = module.memory

    def mb(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    if not isinstance(m, SideMemory):  # a baseline: everything it holds beside the frozen layer
        side = mb(t for name, t in [*m.named_parameters(), *m.named_buffers()] if not name.startswith("main."))
        return {"side": side, "shards": 0.0, "total": side}
    side, shards = mb([m.side]), mb(list(m.shards) + list(m.memories))
    return {"side": side, "shards": shards, "total": side + shards + mb([m.merged, m.mask])}
