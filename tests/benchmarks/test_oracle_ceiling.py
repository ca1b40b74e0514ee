"""The helpers of ``benchmarks/oracle_ceiling.py``: the latent-class model and the per-request
NDCG that must agree with the run's evaluator."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from oracle_ceiling import LatentClassModel, _bag, ndcg_per_request  # noqa: E402


def test_latent_classes_recover_two_segments() -> None:
    """Two segments that click different colours: EM finds them from 6 clicks per user, and a
    user's mixture probability is higher for items of their segment's colour."""
    rng = np.random.default_rng(0)
    n_users, n_items = 200, 40
    colour = np.arange(n_items) % 2  # two colours
    other = rng.integers(0, 3, n_items)  # an uninformative attribute
    segment = rng.integers(0, 2, n_users)
    users, items = [], []
    for u in range(n_users):
        pool = np.flatnonzero(colour == segment[u])
        users += [u] * 6
        items += rng.choice(pool, 6, replace=False).tolist()
    u_arr, i_arr = np.array(users), np.array(items)
    model = LatentClassModel(n_classes=2, iters=10, m_steps=30).fit(u_arr, i_arr, n_users,
                                                                    [colour, other])
    post = model.posterior(_bag(u_arr, i_arr, n_users, n_items))
    found = post.argmax(axis=1)
    agreement = max((found == segment).mean(), (found != segment).mean())
    assert agreement > 0.98
    feats = model.features(post[[0, 0]], np.array([np.flatnonzero(colour == segment[0])[0],
                                                   np.flatnonzero(colour != segment[0])[0]]))
    assert feats.shape == (2, 3)
    assert feats[0, 0] > feats[1, 0] + 1.0  # the mixture's log-probability
    assert feats[0, 1] > feats[1, 1]  # the expected preference for the colour


def test_ndcg_per_request() -> None:
    # request 0: target ranked 2nd of 3; request 1: target ranked 1st; request 2: no target
    req = np.array([0, 0, 0, 1, 1, 2])
    item = np.array([5, 6, 7, 1, 2, 9])
    target = np.array([6, 6, 6, 1, 1, 4])
    score = np.array([0.9, 0.5, 0.1, 2.0, 1.0, 0.0])
    out = ndcg_per_request(req, item, target, score)
    assert np.allclose(out, [1 / np.log2(3), 1.0, 0.0])
