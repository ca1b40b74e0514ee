"""Non-personalized baselines: random scores and (recency-decayed) popularity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


class RandomScores:
    """Uniform random scores, seeded per batch so that a run is reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.n_items = 0

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> RandomScores:
        self.n_items = n_items
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(users[0]))
        return torch.rand(len(users), self.n_items, generator=gen)


class Popularity:
    """Item popularity: sum over history events of 0.5 ** (age in days / half_life_days).

    ``half_life_days = 0`` means plain counts. Age is measured from the latest history event, so
    the model never looks past the data it was fitted on.
    """

    def __init__(self, half_life_days: float = 0.0) -> None:
        self.half_life_days = half_life_days
        self.counts = torch.zeros(0)

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> Popularity:
        weights = np.ones(len(history))
        if self.half_life_days > 0 and len(history):
            age = (history["timestamp"].max() - history["timestamp"]).dt.total_seconds() / 86400
            weights = np.power(0.5, age.to_numpy() / self.half_life_days)
        counts = np.bincount(history["item_idx"].to_numpy(), weights=weights, minlength=n_items)
        self.counts = torch.from_numpy(counts.astype(np.float32))
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.counts.expand(len(users), -1).clone()
