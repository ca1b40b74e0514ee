"""Lookups of per-(request, value) sums by their int64 keys, shared by the behaviour and the
neighbourhood features.

The features aggregate a request's history into sorted unique keys ``request * size + value``
and then read them at every (request, candidate) pair. A serving batch has a few requests, so
its key space is small: a dense table (one scatter, one gather) replaces a binary search per
pair. Large key spaces (training chunks of thousands of requests) keep the binary search. Both
return the stored values themselves, so the choice never changes a bit.
"""

from __future__ import annotations

import numpy as np

DENSE_KEYS = 1 << 20
"""Key spaces up to this size (8 MiB of float64) are looked up through a dense table."""


def lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, n_keys: int) -> np.ndarray:
    """float64 ``values[i]`` where ``keys[i] == query``, else 0 (``keys`` sorted and unique; keys
    and queries in ``[0, n_keys)``)."""
    if n_keys <= DENSE_KEYS:
        table = np.zeros(n_keys, dtype=np.float64)
        table[keys] = values
        return table[query]
    out = np.zeros(len(query), dtype=np.float64)
    if len(keys) == 0:
        return out
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    hit = keys[pos] == query
    out[hit] = values[pos[hit]]
    return out
