"""Freed memory handed back to the system after each step.

A step frees what it built (numpy arrays of logits and weights, llama.cpp's buffers), but glibc's
allocator keeps freed chunks below the heap's top for reuse, and the kernel goes on counting them
as this process's resident memory for the rest of the run. After a long step that is hundreds of
MiB to GiB (measured on the scaling benchmark's Gemma 3 270M run: 130-310 MiB after each step
beyond what was still referenced), which every later step then carries, and which the memory
estimate, summing what each step holds, does not see. Collecting cycles and asking glibc to
return its free pages (malloc_trim) between steps makes a step's resident memory what it and
the run's caches really hold. Elsewhere (no glibc) it only collects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Collect unreachable objects and give free heap pages back; whether glibc returned any."""
    gc.collect()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
