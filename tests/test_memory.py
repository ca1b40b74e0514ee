"""kgrank.memory: freed heap memory really goes back to the OS."""

from __future__ import annotations

import sys

import pytest

from kgrank.memory import _libc, release_free_memory, rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None,
                    reason="malloc_trim and /proc/self/statm are glibc / Linux features")
def test_trim_returns_fragmented_free_heap_to_the_os() -> None:
    # 64 KiB blocks come from the heap (below the mmap threshold); keeping every 16th one
    # pins the heap top, so free() alone cannot shrink it: only malloc_trim can.
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB, touched (zeroed)
    kept = blocks[::16]
    del blocks
    before = rss_bytes()
    assert release_free_memory()
    after = rss_bytes()
    assert before - after > 100 * 2**20, (before, after)
    assert len(kept) == 188
