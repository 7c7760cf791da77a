"""Handing freed host memory back to the operating system."""

from __future__ import annotations

import ctypes
import functools


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
