"""ItemKNN: item-item cosine similarity over the recency-weighted history.

``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrink)`` over binary user-item
co-occurrence, pruned to the ``neighbors`` most similar items of each item; a user's score for
item ``j`` is ``sum_i w_ui sim(i, j)`` with recency weights ``w_ui = 0.5 ** (g / half_life)``,
``g`` the number of distinct later timestamps in the user's history (Sarwar et al., WWW 2001;
Deshpande & Karypis, TOIS 2004).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from kgrank.baselines.history import binary_history, keep_top_per_row, weighted_history


def cosine_item_similarity(binary: sp.csr_matrix, shrink: float, neighbors: int) -> sp.csr_matrix:
    """Pruned item-item cosine similarity with a zero diagonal."""
    co = (binary.T @ binary).tocsr().astype(np.float32)
    co.setdiag(0.0)
    co.eliminate_zeros()
    norms = np.sqrt(np.asarray(binary.sum(axis=0)).ravel()).astype(np.float32)
    coo = co.tocoo()
    coo.data = coo.data / (norms[coo.row] * norms[coo.col] + shrink)
    return keep_top_per_row(coo.tocsr(), neighbors)


MEMO_ROWS = 64
"""Largest request batch whose scores are kept for the next call (a serving batch; a training
batch of 1,024 rows would hold ~50 MB on Amazon Beauty)."""


class ItemKNN:
    """Item-based collaborative filtering with recency-weighted histories."""

    def __init__(self, neighbors: int = 200, shrink: float = 0.0, half_life: float = 5.0) -> None:
        self.neighbors = neighbors
        self.shrink = shrink
        self.half_life = half_life
        self.sim = sp.csr_matrix((0, 0))
        self.user_weights = sp.csr_matrix((0, 0))
        self._last: tuple[bytes, np.ndarray] | None = None
        """The last call's users and scores: a transition model backed off to this model
        scores the same rows right after it (:meth:`Transition.share_knn`)."""

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> ItemKNN:
        self._last = None
        binary = binary_history(history, n_users, n_items)
        self.sim = cosine_item_similarity(binary, self.shrink, self.neighbors)
        self.user_weights = weighted_history(history, n_users, n_items, self.half_life)
        return self

    def params(self) -> tuple[int, float, float]:
        """What the fitted model depends on besides the history."""
        return self.neighbors, self.shrink, self.half_life

    def score(self, users: np.ndarray) -> torch.Tensor:
        if len(users) > MEMO_ROWS:
            return torch.from_numpy(self._product(users))
        key = np.asarray(users, np.int64).tobytes()
        last = self._last
        if last is None or last[0] != key:
            last = self._last = (key, self._product(users))
        return torch.from_numpy(last[1].copy())  # callers may write to theirs

    def _product(self, users: np.ndarray) -> np.ndarray:
        return np.asarray((self.user_weights[users] @ self.sim).todense())
