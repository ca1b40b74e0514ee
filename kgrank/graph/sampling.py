"""Vectorized BPR triple sampling, as in the LightGCN authors' code (``UniformSample_original``).

One epoch draws as many ``(u, i, j)`` triples as there are training interactions. Each triple:
``u`` uniform among the users with at least one training item, ``i`` uniform among ``u``'s
training items, ``j`` uniform among the items that are NOT ``u``'s training items. Negatives are
drawn by vectorized rejection: candidates are tested against the sorted int64 keys
``user * n_items + item`` with :func:`numpy.searchsorted`, and only the rejected ones are drawn
again until none remain. Users who own the whole catalog cannot have a negative and are left out
of the draw. Deterministic given the :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import numpy as np


class BPRSampler:
    """Draws BPR triples from the (user, item) positive pairs of a training set."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> None:
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if len(users) != len(items):
            raise ValueError("users and items differ in length")
        if len(users) and (users.min() < 0 or users.max() >= n_users
                           or items.min() < 0 or items.max() >= n_items):
            raise ValueError("user or item index out of range")
        self.n_users, self.n_items = n_users, n_items
        self.keys = np.unique(users * n_items + items)  # sorted, de-duplicated positives
        user_of_key = self.keys // n_items
        self.items = self.keys % n_items  # grouped by user, ascending
        counts = np.bincount(user_of_key, minlength=n_users)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.counts = counts
        self.active = np.flatnonzero((counts > 0) & (counts < n_items))
        if len(self.active) == 0:
            raise ValueError("no user has both a positive and a negative item")
        self.n_interactions = int(counts[self.active].sum())

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) is a training positive (vectorized)."""
        cand = np.asarray(users, dtype=np.int64) * self.n_items + np.asarray(items, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, cand), len(self.keys) - 1)
        return np.asarray(self.keys[pos] == cand)

    def sample(
        self, rng: np.random.Generator, n: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` triples (default: one epoch, ``n_interactions``) as int64 arrays (u, i, j)."""
        n = self.n_interactions if n is None else n
        users = self.active[rng.integers(0, len(self.active), size=n)]
        offset = np.floor(rng.random(n) * self.counts[users]).astype(np.int64)
        pos = self.items[self.offsets[users] + offset]
        neg = rng.integers(0, self.n_items, size=n)
        bad = np.flatnonzero(self.is_positive(users, neg))
        while len(bad):
            neg[bad] = rng.integers(0, self.n_items, size=len(bad))
            bad = bad[self.is_positive(users[bad], neg[bad])]
        return users, pos, neg
