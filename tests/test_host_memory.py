"""Host memory over a stream: freed heap pages go back to the system, kernel caches stay bounded."""

import os
import subprocess
import sys

import pytest
import torch

from repair_pl.host_memory import KERNEL_CACHES, bound_kernel_caches, rss_mb, trim_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_heap_returns_freed_heap_memory_to_the_system():
    # buffers below glibc's mmap threshold live in its heap; freeing every other one leaves
    # holes between live buffers, which free() cannot hand back by itself
    buffers = [torch.ones(16384) for _ in range(6000)]  # 64 KB each, touched
    del buffers[::2]  # 188 MB of holes
    before = rss_mb()
    assert trim_heap()
    assert before - rss_mb() > 100


GROWTH = """
import ctypes, sys, torch
from repair_pl.host_memory import bound_kernel_caches
if sys.argv[1] == "bounded":
    bound_kernel_caches(16)
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo.restype = MallInfo
torch.set_num_threads(1)
weight = torch.randn(256, 128, dtype=torch.bfloat16)
start = mallinfo().uordblks
for rows in range(1, 11):
    for tokens in range(5, 45):  # 400 input shapes
        torch.nn.functional.linear(torch.randn(rows, tokens, 128, dtype=torch.bfloat16), weight)
print((mallinfo().uordblks - start) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_bounded_kernel_caches_stop_bf16_products_from_growing_with_new_shapes():
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
    grown = {arm: float(subprocess.run([sys.executable, "-c", GROWTH, arm], env=env, capture_output=True, text=True,
                                       check=True).stdout) for arm in ("default", "bounded")}
    assert grown["default"] > 20  # MB held for 400 shapes by the default caches
    assert grown["bounded"] < grown["default"] / 4


def test_bound_kernel_caches_keeps_the_users_sizes_and_refuses_zero(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_kernel_caches(32)
    assert os.environ["LRU_CACHE_CAPACITY"] == "512" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    with pytest.raises(ValueError, match="integer >= 1"):
        bound_kernel_caches(0)
