from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kgrank.baselines import ItemKNN, Popularity, RandomScores, Transition
from kgrank.baselines.history import keep_top_per_row, time_groups_from_end
from kgrank.baselines.itemknn import MEMO_ROWS, cosine_item_similarity
from kgrank.baselines.transition import share_backoff, transition_counts
from kgrank.config import EvalConfig, SplitConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import make_split
from kgrank.eval.protocol import evaluate


def _hist(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_idx", "item_idx", "day"])
    frame["timestamp"] = pd.to_datetime(frame.pop("day"), unit="D", utc=True)
    return frame


def test_time_groups_ignore_order_within_a_timestamp() -> None:
    h = _hist([(0, 0, 1), (0, 1, 2), (0, 2, 2), (0, 3, 3), (1, 4, 7)])
    assert time_groups_from_end(h).tolist() == [2, 1, 1, 0, 0]


def test_popularity_counts_and_decay() -> None:
    h = _hist([(0, 0, 0), (1, 0, 0), (0, 1, 10)])
    plain = Popularity().fit(h, 2, 3).score(np.array([0, 1]))
    assert plain.tolist() == [[2.0, 1.0, 0.0]] * 2
    decayed = Popularity(half_life_days=10.0).fit(h, 2, 3).score(np.array([0]))
    assert np.allclose(decayed.numpy(), [[1.0, 1.0, 0.0]])  # two events 10 days old = 2 * 0.5


def test_random_scores_are_reproducible() -> None:
    a = RandomScores(seed=1).fit(_hist([(0, 0, 0)]), 3, 5).score(np.array([0, 2]))
    b = RandomScores(seed=1).fit(_hist([(0, 0, 0)]), 3, 5).score(np.array([0, 2]))
    assert a.shape == (2, 5) and bool((a == b).all())


def test_itemknn_cosine_matches_dense_formula() -> None:
    x = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=np.float32)
    sim = cosine_item_similarity(sp.csr_matrix(x), shrink=1.0, neighbors=0).toarray()
    co = x.T @ x
    n = np.sqrt(x.sum(0))
    expected = co / (np.outer(n, n) + 1.0)
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(sim, expected, atol=1e-6)
    top1 = keep_top_per_row(sp.csr_matrix(expected), 1).toarray()
    assert ((top1 > 0).sum(axis=1) == 1).all()
    assert np.allclose(top1.max(axis=1), expected.max(axis=1))


def test_itemknn_scores_are_recency_weighted_sums() -> None:
    h = _hist([(0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 2, 0), (2, 1, 0), (2, 2, 0)])
    model = ItemKNN(neighbors=0, shrink=0.0, half_life=1.0).fit(h, 3, 3)
    sim = model.sim.toarray()
    scores = model.score(np.array([0])).numpy()[0]
    assert np.allclose(scores, 0.5 * sim[0] + 1.0 * sim[1], atol=1e-6)


def test_transition_counts_directed_between_times_symmetric_within() -> None:
    # user 0: a (day 1) -> {b, c} (day 2) -> d (day 3)
    h = _hist([(0, 0, 1), (0, 1, 2), (0, 2, 2), (0, 3, 3)])
    c = transition_counts(h, 4).toarray()
    expected = np.zeros((4, 4))
    for a, b in [(0, 1), (0, 2), (1, 3), (2, 3), (1, 2), (2, 1)]:
        expected[a, b] = 1
    assert np.array_equal(c, expected)


def test_scores_do_not_depend_on_order_within_a_timestamp(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    hist = split.history("test")
    shuffled = hist.sample(frac=1.0, random_state=3).sort_values("timestamp", kind="stable")
    users = np.arange(split.n_users)
    for model in (ItemKNN(50, 1.0, 2.0), Transition(0.1, 1.0), Popularity(30.0)):
        a = model.fit(hist, split.n_users, split.n_items).score(users).numpy()
        b = model.fit(shuffled, split.n_users, split.n_items).score(users).numpy()
        assert np.allclose(a, b, atol=1e-6), type(model).__name__


def test_sequence_models_beat_popularity_on_sequential_data(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    cfg = EvalConfig(ks=[5, 10], bootstrap=0)
    hist = split.history("test")
    ndcg = {}
    for name, model in (("pop", Popularity()), ("knn", ItemKNN(0, 0.0, 1.0)),
                        ("trans", Transition(0.01, 1.0))):
        model.fit(hist, split.n_users, split.n_items)
        ndcg[name] = evaluate(model.score, split, "test", cfg, progress=False).metrics["ndcg@10"]
    assert ndcg["trans"] >= ndcg["knn"] > ndcg["pop"] + 0.3
    assert ndcg["trans"] > 0.5


def test_itemknn_scores_repeated_rows_once_and_hands_out_copies() -> None:
    h = _hist([(0, 0, 0), (0, 1, 1), (1, 1, 0), (1, 2, 2), (2, 0, 1), (2, 2, 3)])
    model = ItemKNN(neighbors=0, shrink=0.0, half_life=1.0).fit(h, 3, 3)
    users = np.array([0, 2])
    first = model.score(users)
    expected = first.clone()
    first.fill_(-1.0)  # a caller writing to its scores does not change the next caller's
    again = model.score(users.copy())
    assert np.array_equal(again.numpy(), expected.numpy())
    other = model.score(np.array([1]))  # other rows: computed afresh
    assert np.array_equal(other.numpy(), np.asarray((model.user_weights[[1]] @ model.sim)
                                                     .todense()))
    big = np.zeros(MEMO_ROWS + 1, dtype=np.int64)  # a training-size batch is not kept
    assert np.array_equal(model.score(big).numpy()[0], expected.numpy()[0])
    assert model._last is not None and model._last[0] == np.array([1]).tobytes()


def test_transition_shares_an_itemknn_backoff_with_the_same_parameters() -> None:
    h = _hist([(0, 0, 0), (0, 1, 1), (1, 1, 0), (1, 2, 2), (2, 0, 1), (2, 2, 3), (2, 1, 5)])
    users = np.array([0, 1, 2])
    alone = Transition(backoff=0.3, knn_neighbors=0, knn_half_life=2.0).fit(h, 3, 3)
    expected = alone.score(users).numpy()
    same = ItemKNN(neighbors=0, half_life=2.0).fit(h, 3, 3)
    other = ItemKNN(neighbors=0, half_life=5.0).fit(h, 3, 3)
    share_backoff([other, alone, same])
    assert alone.knn is same  # the one with its parameters, not the other
    assert np.array_equal(alone.score(users).numpy(), expected)
    lone = Transition(backoff=0.3, knn_neighbors=0, knn_half_life=7.0).fit(h, 3, 3)
    share_backoff([lone, same, other])
    assert lone.knn is not same and lone.knn is not other
