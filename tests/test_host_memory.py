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
    # many small buffers (glibc's heap, not mmap), then one that pins the heap's top so that
    # freeing the rest leaves a hole glibc does not give back by itself
    buffers = [torch.ones(16384) for _ in range(3000)]  # 64 KB each, 188 MB in all, touched
    pin = torch.ones(16)
    del buffers
    before = rss_mb()
    assert trim_heap()
    assert before - rss_mb() > 100
    del pin
