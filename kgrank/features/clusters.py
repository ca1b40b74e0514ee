"""Embedding-cluster taste: which region of a modality's item space a user keeps coming back to.

Cosine similarity between a user's history profile and an item (``<m>_profile_sim``) averages
the history into one point, which blurs a taste for one *kind* of item (a print pattern seen in
the photos, a co-clicked community in the graph) among everything else the user bought. Here the
catalogue's items are clustered per modality with k-means (scikit-learn, on the L2-normalised
item embeddings; items without that modality get no cluster), and the feature of a (request,
candidate) pair is the recency-weighted share of the request's history in the candidate's
cluster:

    share(r, i) = sum_j w_rj [c(j) = c(i)],   w_r = the profile weights (rows sum to 1)

Only the catalogue (no interactions) is clustered, so nothing here can see a target. k-means
runs on one thread so that the labels do not depend on the machine's thread count (serving
reproduces the run's features exactly).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits


def item_clusters(emb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """int64 [n_items] k-means cluster of each item (``-1``: zero row, i.e. no embedding)."""
    emb = np.asarray(emb, np.float64)
    norms = np.linalg.norm(emb, axis=1)
    has = norms > 0
    labels = np.full(len(emb), -1, np.int64)
    k = min(k, int(has.sum()))
    if k < 2:
        labels[has] = 0
        return labels
    with threadpool_limits(1):
        km = KMeans(n_clusters=k, n_init=3, max_iter=100, random_state=seed)
        labels[has] = km.fit_predict(emb[has] / norms[has, None])
    return labels


def cluster_shares(weights: sp.csr_matrix, labels: np.ndarray) -> np.ndarray:
    """float32 [R, k]: each request's history weight per cluster (``weights`` [R, n_items])."""
    k = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    has = np.flatnonzero(labels >= 0)
    onehot = sp.csr_matrix((np.ones(len(has), np.float32), (has, labels[has])),
                           shape=(len(labels), max(k, 1)))
    return np.asarray((weights @ onehot).todense(), np.float32)


def share_at(shares: np.ndarray, labels: np.ndarray, rows: np.ndarray, items: np.ndarray
             ) -> np.ndarray:
    """[B, C] share of request ``rows``' history in the cluster of each candidate ``items``
    (0 for padding and for items without a cluster)."""
    lab = labels[np.maximum(items, 0)]
    out = np.take_along_axis(shares[rows], np.maximum(lab, 0), axis=1)
    return np.where((items >= 0) & (lab >= 0), out, 0.0).astype(np.float32)
