"""lookup: the dense table and the binary search return the same values."""

from __future__ import annotations

import numpy as np
import pytest

import kgrank.features.lookup as lookup_mod
from kgrank.features.lookup import lookup


@pytest.mark.parametrize("n_keys", [1, 7, 1000])
def test_dense_and_search_agree(n_keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(n_keys)
    keys = np.unique(rng.integers(0, n_keys, max(n_keys // 3, 1)))
    values = rng.normal(size=len(keys))
    query = rng.integers(0, n_keys, 200)
    dense = lookup(keys, values, query, n_keys)
    monkeypatch.setattr(lookup_mod, "DENSE_KEYS", 0)
    search = lookup(keys, values, query, n_keys)
    assert np.array_equal(dense, search)
    want = {int(k): float(v) for k, v in zip(keys, values, strict=True)}
    assert dense.tolist() == [want.get(int(q), 0.0) for q in query]


def test_empty_keys_give_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = np.zeros(0, np.int64)
    query = np.array([0, 3, 4])
    assert lookup(empty, np.zeros(0), query, 5).tolist() == [0.0, 0.0, 0.0]
    monkeypatch.setattr(lookup_mod, "DENSE_KEYS", 0)
    assert lookup(empty, np.zeros(0), query, 5).tolist() == [0.0, 0.0, 0.0]
