"""Freed host memory goes back to the system between edit batches."""

import sys

import psutil
import pytest
import torch

from repair_pl.host_memory import trim_heap


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_heap_returns_freed_heap_memory_to_the_system():
    # buffers below glibc's mmap threshold live in its heap; freeing every other one leaves
    # holes between live buffers, which free() cannot hand back by itself
    buffers = [torch.ones(16384) for _ in range(6000)]  # 64 KB each, touched
    del buffers[::2]  # 188 MB of holes
    before = rss_mb()
    assert trim_heap()
    assert before - rss_mb() > 100
