"""First-order item-to-item transitions backed off to ItemKNN.

From each training sequence, grouped by timestamp: every item of one timestamp group leads to
every item of the next group (directed, ``a -> b``), and items that share a timestamp are linked
both ways (``a <-> b``), because their order within the timestamp is unknown. Counts are
row-normalized into ``P(b | a)``. A user's score is
``sum_g 0.5 ** (g / half_life) * mean_{a in group g} P(. | a) + backoff * ItemKNN``
over the user's last ``max_groups`` timestamp groups (``g = 0`` the latest). This is the Markov
chain part of FPMC (Rendle et al., WWW 2010), made blind to within-timestamp order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from kgrank.baselines.history import time_groups_from_end
from kgrank.baselines.itemknn import ItemKNN


def transition_counts(history: pd.DataFrame, n_items: int) -> sp.csr_matrix:
    """Counts of ``a -> b`` (next timestamp group) plus ``a <-> b`` (same timestamp)."""
    frame = pd.DataFrame({
        "u": history["user_idx"].to_numpy(),
        "i": history["item_idx"].to_numpy(),
        "g": time_groups_from_end(history),
    })
    # Directed: group g+1 (earlier) -> group g (later) of the same user.
    nxt = frame.assign(g=frame["g"] - 1)
    directed = frame.merge(nxt, on=["u", "g"], suffixes=("_b", "_a"))
    same = frame.merge(frame, on=["u", "g"], suffixes=("_a", "_b"))
    same = same[same["i_a"] != same["i_b"]]
    rows = np.concatenate([directed["i_a"].to_numpy(), same["i_a"].to_numpy()])
    cols = np.concatenate([directed["i_b"].to_numpy(), same["i_b"].to_numpy()])
    data = np.ones(len(rows), dtype=np.float32)
    mat = sp.csr_matrix((data, (rows, cols)), shape=(n_items, n_items))
    mat.sum_duplicates()
    return mat


class Transition:
    """P(next item | last items), blind to within-timestamp order, backed off to ItemKNN."""

    def __init__(
        self,
        backoff: float = 0.1,
        half_life: float = 1.0,
        max_groups: int = 3,
        knn_neighbors: int = 200,
        knn_shrink: float = 0.0,
        knn_half_life: float = 5.0,
    ) -> None:
        self.backoff = backoff
        self.half_life = half_life
        self.max_groups = max_groups
        self.knn = ItemKNN(knn_neighbors, knn_shrink, knn_half_life)
        self.prob = sp.csr_matrix((0, 0))
        self.last = sp.csr_matrix((0, 0))

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> Transition:
        counts = transition_counts(history, n_items)
        rowsum = np.asarray(counts.sum(axis=1)).ravel()
        self.prob = sp.diags(1.0 / np.maximum(rowsum, 1.0)).astype(np.float32) @ counts
        groups = time_groups_from_end(history)
        recent = groups < self.max_groups
        frame = history[recent]
        g = groups[recent]
        size = pd.Series(g).groupby([frame["user_idx"].to_numpy(), g]).transform("size")
        weights = np.power(0.5, g / max(self.half_life, 1e-9)) / size.to_numpy()
        self.last = sp.csr_matrix(
            (weights.astype(np.float32), (frame["user_idx"].to_numpy(), frame["item_idx"].to_numpy())),
            shape=(n_users, n_items),
        )
        self.last.sum_duplicates()
        if self.backoff > 0:
            self.knn.fit(history, n_users, n_items)
        return self

    def share_knn(self, knn: ItemKNN) -> bool:
        """Back off to ``knn`` (fitted on the same history) when it has this model's back-off
        parameters: the same model, so a batch that scores both computes it once (Amazon
        Beauty: ~0.45 ms of a ~25 ms serving batch of 4). Returns whether it was shared."""
        if self.backoff <= 0 or knn.params() != self.knn.params():
            return False
        self.knn = knn
        return True

    def score(self, users: np.ndarray) -> torch.Tensor:
        scores = np.asarray((self.last[users] @ self.prob).todense())
        if self.backoff > 0:
            scores = scores + self.backoff * self.knn.score(users).numpy()
        return torch.from_numpy(scores)


def share_backoff(models: Sequence[object]) -> None:
    """Point each transition model's ItemKNN back-off at an ItemKNN among ``models`` with the
    same parameters (all fitted on one history), so that a batch computes it once."""
    knns = [m for m in models if isinstance(m, ItemKNN)]
    for model in models:
        if isinstance(model, Transition):
            for knn in knns:
                if model.share_knn(knn):
                    break
