"""Embedding-cluster shares: k-means over item embeddings, history share in a candidate's
cluster; hand-checked values, deterministic labels, no future events, in the feature table."""

import numpy as np
import scipy.sparse as sp

from kgrank.features.clusters import cluster_shares, item_clusters, share_at
from kgrank.features.history import request_history
from kgrank.ranking.table import PartFeatures
from tests.features.test_history import HISTORY, _history, _requests


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = np.eye(3, 8) * 5.0
    emb = np.concatenate([c + 0.1 * rng.normal(size=(4, 8)) for c in centers])  # items 0-11
    emb[5] = 0.0  # item 5 has no embedding
    return emb


def test_item_clusters_separate_blobs_skip_missing_and_are_deterministic() -> None:
    labels = item_clusters(_blobs(), k=3, seed=0)
    assert labels[5] == -1 and labels.dtype == np.int64
    for blob in (range(0, 4), range(4, 8), range(8, 12)):
        got = {int(labels[i]) for i in blob if i != 5}
        assert len(got) == 1  # one cluster per blob
    assert len({int(labels[0]), int(labels[4]), int(labels[8])}) == 3
    assert np.array_equal(labels, item_clusters(_blobs(), k=3, seed=0))
    assert item_clusters(np.zeros((3, 4)), k=2).tolist() == [-1, -1, -1]


def test_shares_hand_checked() -> None:
    labels = np.array([0, 0, 1, -1, 1])
    w = sp.csr_matrix(np.array([[0.5, 0.0, 0.25, 0.25, 0.0],    # cluster 0: .5, cluster 1: .25
                                [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32))  # empty history
    shares = cluster_shares(w, labels)
    assert np.allclose(shares, [[0.5, 0.25], [0.0, 0.0]])
    items = np.array([[1, 4, 3, -1], [0, 2, 3, 1]])
    got = share_at(shares, labels, np.array([0, 1]), items)
    assert np.allclose(got, [[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_table_column_ignores_future_events() -> None:
    emb = _blobs()[:10]
    labels = item_clusters(emb, k=3)
    req = _requests([0, 1], [20, 20])
    items = np.array([[1, 3, 4], [4, 5, 9]])

    def column(history: list[tuple[int, int, int]]) -> np.ndarray:
        feats = PartFeatures(req, request_history(req, _history(history)), 10,
                             {"image": (emb, "image")}, clusters={"image": labels})
        x, names, fam = feats.build(np.arange(2), items, {}, {})
        assert fam["image_cluster_share"] == "image"
        return x[:, names.index("image_cluster_share")].reshape(items.shape)

    base = column(HISTORY)
    assert np.allclose(base.sum(), base[base > 0].sum()) and base.max() <= 1.0
    # user 0 before t=20: items 1, 2 (blob 0) and 3 (blob 0): all its weight on blob 0
    assert np.isclose(base[0, 0], 1.0) and np.isclose(base[0, 2], 0.0)
    planted = [*HISTORY, (0, 4, 21), (1, 9, 500)]
    assert np.array_equal(base, column(planted))
