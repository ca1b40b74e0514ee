"""History helpers shared by the baselines: recency weights that ignore within-timestamp order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def time_groups_from_end(history: pd.DataFrame) -> np.ndarray:
    """Per event, how many distinct later timestamps the user has (0 = the user's latest time).

    Events that share a timestamp get the same value, so nothing downstream can depend on their
    order in the file (on Amazon 5-core that order is an ASIN sort).
    """
    return (
        history.groupby("user_idx")["timestamp"]
        .rank(method="dense", ascending=False)
        .to_numpy(dtype=np.int64)
        - 1
    )


def weighted_history(
    history: pd.DataFrame, n_users: int, n_items: int, half_life: float
) -> sp.csr_matrix:
    """Users x items matrix of recency weights 0.5 ** (time group from the end / half_life)."""
    groups = time_groups_from_end(history)
    weights = np.power(0.5, groups / max(half_life, 1e-9)).astype(np.float32)
    mat = sp.csr_matrix(
        (weights, (history["user_idx"].to_numpy(), history["item_idx"].to_numpy())),
        shape=(n_users, n_items),
    )
    mat.sum_duplicates()
    return mat


def binary_history(history: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    ones = np.ones(len(history), dtype=np.float32)
    mat = sp.csr_matrix(
        (ones, (history["user_idx"].to_numpy(), history["item_idx"].to_numpy())),
        shape=(n_users, n_items),
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def keep_top_per_row(mat: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row (k <= 0 keeps all)."""
    mat = mat.tocsr()
    if k <= 0:
        return mat
    indptr, data = mat.indptr, mat.data
    keep = np.ones(len(data), dtype=bool)
    for row in np.flatnonzero(np.diff(indptr) > k):
        lo, hi = indptr[row], indptr[row + 1]
        drop = np.argpartition(data[lo:hi], hi - lo - k)[: hi - lo - k]
        keep[lo + drop] = False
    out = sp.csr_matrix((data * keep, mat.indices, indptr), shape=mat.shape)
    out.eliminate_zeros()
    return out
