"""LightGCN: the normalized propagation checked by hand, determinism, scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kgrank.config import EvalConfig, GraphTrainConfig, SplitConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import make_split
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.lightgcn import LightGCN, normalized_adjacency, spmm
from kgrank.graph.train import train_graph_model

# 3 users x 4 items; item 3 has no interaction.
UI = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def tiny_graph(weights: list[float] | None = None) -> KnowledgeGraph:
    u = np.array([p[0] for p in UI])
    i = np.array([p[1] for p in UI])
    w = np.ones(len(UI), np.float32) if weights is None else np.array(weights, np.float32)
    return KnowledgeGraph(3, 4, u, i, w)


def hand_normalized(weights: list[float] | None = None) -> np.ndarray:
    """D^-1/2 A D^-1/2 over the 7 nodes (users 0-2, items 3-6), computed by hand."""
    a = np.zeros((7, 7))
    for k, (u, i) in enumerate(UI):
        w = 1.0 if weights is None else weights[k]
        a[u, 3 + i] = a[3 + i, u] = w
    deg = a.sum(1)
    dinv = np.array([1 / np.sqrt(d) if d > 0 else 0.0 for d in deg])
    return dinv[:, None] * a * dinv[None, :]


def test_normalized_adjacency_matches_hand_computation() -> None:
    adj = normalized_adjacency(tiny_graph()).to_dense().numpy()
    np.testing.assert_allclose(adj, hand_normalized(), atol=1e-6)
    # e.g. user 0 (degree 2) - item 1 (degree 3): 1 / sqrt(2 * 3)
    assert adj[0, 3 + 1] == pytest.approx(1 / np.sqrt(6))
    assert not adj[:, 3 + 3].any() and not adj[3 + 3].any()  # isolated item: zero row


def test_weighted_adjacency_and_duplicates() -> None:
    w = [2.0, 1.0, 0.5, 1.0, 3.0, 1.0, 1.0]
    adj = normalized_adjacency(tiny_graph(w), weighted=True).to_dense().numpy()
    np.testing.assert_allclose(adj, hand_normalized(w), atol=1e-6)
    # a repeated pair is one edge unweighted, and its weights add up when weighted
    kg = tiny_graph()
    dup = kg.with_interactions(np.array([0]), np.array([0]), np.array([2.0]))
    np.testing.assert_allclose(normalized_adjacency(dup).to_dense().numpy(), hand_normalized(),
                               atol=1e-6)
    summed = [3.0] + [1.0] * (len(UI) - 1)
    np.testing.assert_allclose(normalized_adjacency(dup, weighted=True).to_dense().numpy(),
                               hand_normalized(summed), atol=1e-6)


def test_one_layer_and_layer_mean_by_hand() -> None:
    torch.manual_seed(0)
    model = LightGCN(3, 4, dim=5, layers=2)
    g = model.graph(tiny_graph())
    ahat = hand_normalized()
    e0 = torch.cat([model.user_emb, model.item_emb]).detach().double().numpy()
    layers = [x.detach().double().numpy() for x in model.layer_embeddings(g)]
    np.testing.assert_allclose(layers[0], e0, atol=1e-6)
    np.testing.assert_allclose(layers[1], ahat @ e0, atol=1e-5)
    np.testing.assert_allclose(layers[2], ahat @ ahat @ e0, atol=1e-5)
    user, item = model.propagate(g)
    assert user.shape == (3, 5) and item.shape == (4, 5)
    mean = (e0 + ahat @ e0 + ahat @ ahat @ e0) / 3
    np.testing.assert_allclose(user.detach().numpy(), mean[:3], atol=1e-5)
    np.testing.assert_allclose(item.detach().numpy(), mean[3:], atol=1e-5)
    # the isolated item keeps only its ego embedding / (K + 1)
    np.testing.assert_allclose(item[3].detach().numpy(), e0[6] / 3, atol=1e-6)
    assert float(model.user_emb.std()) == pytest.approx(0.1, abs=0.06)  # N(0, 0.1^2) init


def test_sparse_product_gradient_matches_dense() -> None:
    adj = normalized_adjacency(tiny_graph())
    x = torch.randn(7, 3, requires_grad=True)
    w = torch.randn(7, 3)
    (spmm(adj, x) * w).sum().backward()
    assert x.grad is not None
    expected = adj.to_dense().T @ w
    torch.testing.assert_close(x.grad, expected)


def test_scores_are_dot_products() -> None:
    torch.manual_seed(1)
    model = LightGCN(3, 4, dim=6, layers=3)
    g = model.graph(tiny_graph())
    user, item = model.propagate(g)
    users = torch.tensor([2, 0])
    torch.testing.assert_close(model.score(g, users), (user[users] @ item.T).detach())
    assert model.score(g, users)[0, 1] == pytest.approx(float(user[2] @ item[1]), abs=1e-6)


def _train(ds: Dataset, tmp: Path, seed: int) -> torch.Tensor:
    split = make_split(ds, SplitConfig())
    tr = split.train
    kg = KnowledgeGraph(ds.n_users, ds.n_items, tr.user_idx.to_numpy(), tr.item_idx.to_numpy(),
                        np.ones(len(tr), np.float32))
    cfg = GraphTrainConfig(dim=8, layers=2, epochs=3, batch_size=32, lr=0.01, seed=seed,
                           eval_metric="ndcg@5")
    res = train_graph_model("lightgcn", kg, split, cfg, EvalConfig(ks=[5], bootstrap=0), tmp,
                            progress=False)
    return torch.cat([res.user_emb, res.item_emb])


def test_same_seed_same_embeddings(seq_dataset: Dataset, tmp_path: Path) -> None:
    a = _train(seq_dataset, tmp_path / "a", seed=3)
    b = _train(seq_dataset, tmp_path / "b", seed=3)
    c = _train(seq_dataset, tmp_path / "c", seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
