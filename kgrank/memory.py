"""Hand freed memory back to the operating system between pipeline stages.

glibc's ``free`` keeps released heap chunks for reuse, and it raises its mmap threshold after
large frees, so later large arrays come from the heap too: a long run's resident memory (RSS)
then stays at the high-water mark of earlier stages although the data is gone. ``malloc_trim(0)``
returns every whole free page of the heap to the kernel (``MADV_DONTNEED``); calling it after a
stage drops what that stage no longer holds. A no-op (returns False) outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return lib


def release_free_memory() -> bool:
    """Collect garbage, then ``malloc_trim(0)``; True when glibc released some memory."""
    gc.collect()
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
