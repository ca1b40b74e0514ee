"""Shared fixtures: small synthetic datasets written with the real writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgrank.data.dataset import Dataset, write_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_sequences(tmp: Path, n_users: int = 40, n_items: int = 30, seed: int = 0) -> Dataset:
    """Users walk a ring of items (item j -> j+1 is likely next) on distinct days; a few users
    also buy two items on the same day. Deterministic."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(n_items))
        length = int(rng.integers(5, 9))
        day = 0
        for step in range(length):
            item = (start + step) % n_items
            rows.append((f"u{u}", f"i{item}", pd.Timestamp("2024-01-01", tz="UTC")
                         + pd.Timedelta(days=day)))
            if not (u % 5 == 0 and step == length - 2):  # same-day pair near the end
                day += 1
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(n_items)],
                          "title": [f"item {j}" for j in range(n_items)]})
    return write_dataset(tmp / "seq", items, inter)


@pytest.fixture
def seq_dataset(tmp_path: Path) -> Dataset:
    return make_sequences(tmp_path)
