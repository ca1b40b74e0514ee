"""Content recommender over any item embedding matrix (text, image, ...)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kgrank.baselines.history import weighted_history


class EmbeddingProfile:
    """Scores items by cosine-like similarity to a recency-weighted profile of the user's history.

    With ``e_i`` the embedding of item ``i`` and ``g_ui`` the number of distinct later timestamps
    user ``u`` has after the event on ``i`` (0 = the user's latest time; see
    :func:`~kgrank.baselines.history.time_groups_from_end`), the weight of that event is
    ``w_ui = 0.5 ** (g_ui / half_life)`` and

        p_u = sum_i w_ui e_i / || sum_i w_ui e_i ||,        score(u, j) = p_u . e_j

    Events that share a timestamp get the same weight, so the profile does not depend on their
    order in the source. A user with no history (or a zero profile) gets all-zero scores.
    """

    def __init__(self, item_emb: np.ndarray, half_life: float = 1.0) -> None:
        emb = np.asarray(item_emb, dtype=np.float32)
        if emb.ndim != 2:
            raise ValueError(f"item_emb must be 2-D [n_items, dim], got shape {emb.shape}")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.item_emb = torch.from_numpy(np.ascontiguousarray(emb))
        self.half_life = half_life
        self.user_vec = torch.zeros(0, emb.shape[1])

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> EmbeddingProfile:
        if n_items != self.item_emb.shape[0]:
            raise ValueError(f"n_items={n_items} but item_emb has {self.item_emb.shape[0]} rows")
        weights = weighted_history(history, n_users, n_items, self.half_life)
        # weighted sum of embeddings: sparse [U, I] @ dense [I, d]; normalising makes it a mean
        profile = np.asarray(weights @ self.item_emb.numpy(), dtype=np.float32)
        norms = np.linalg.norm(profile, axis=1, keepdims=True)
        profile = np.divide(profile, norms, out=np.zeros_like(profile), where=norms > 0)
        self.user_vec = torch.from_numpy(profile)
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(users, dtype=np.int64))
        return self.user_vec[idx] @ self.item_emb.T
