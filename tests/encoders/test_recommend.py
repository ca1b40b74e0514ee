"""EmbeddingProfile: recency-weighted profile of history embeddings, scored by dot product."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kgrank.encoders.recommend import EmbeddingProfile

EMB = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)


def _history(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_idx": [r[0] for r in rows],
            "item_idx": [r[1] for r in rows],
            "timestamp": pd.to_datetime([r[2] for r in rows]),
        }
    )


def test_hand_checked_profile_and_scores() -> None:
    # user 0: item 0 one time-group back (weight 0.5), item 1 at the latest time (weight 1)
    hist = _history([(0, 0, "2020-01-01"), (0, 1, "2020-01-02")])
    model = EmbeddingProfile(EMB, half_life=1.0).fit(hist, n_users=2, n_items=4)
    expected = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])
    np.testing.assert_allclose(model.user_vec[0].numpy(), expected, rtol=1e-6)
    scores = model.score(np.array([0]))
    assert isinstance(scores, torch.Tensor) and scores.shape == (1, 4)
    np.testing.assert_allclose(scores[0].numpy(), EMB @ expected, rtol=1e-6, atol=1e-7)
    # a huge half-life is a plain mean of the history embeddings
    flat = EmbeddingProfile(EMB, half_life=1e9).fit(hist, 2, 4)
    np.testing.assert_allclose(flat.user_vec[0].numpy(), [2**-0.5, 2**-0.5], rtol=1e-5)


def test_same_timestamp_order_does_not_matter() -> None:
    rows = [(0, 0, "2020-01-01"), (0, 2, "2020-01-03"), (0, 1, "2020-01-03"),
            (1, 3, "2020-01-02"), (1, 1, "2020-01-02")]
    a = EmbeddingProfile(EMB, half_life=0.5).fit(_history(rows), 2, 4)
    b = EmbeddingProfile(EMB, half_life=0.5).fit(_history(rows[::-1]), 2, 4)
    users = np.array([0, 1])
    torch.testing.assert_close(a.score(users), b.score(users))
    # items 1 and 2 share the latest time, so they weigh the same (1), item 0 weighs 0.25
    raw = 0.25 * EMB[0] + EMB[1] + EMB[2]
    np.testing.assert_allclose(a.user_vec[0].numpy(), raw / np.linalg.norm(raw), rtol=1e-6)


def test_cold_user_gets_zeros() -> None:
    hist = _history([(0, 0, "2020-01-01")])
    model = EmbeddingProfile(EMB).fit(hist, n_users=3, n_items=4)
    scores = model.score(np.array([2, 1]))
    assert torch.equal(scores, torch.zeros(2, 4))
    assert not torch.isnan(scores).any()


def test_rejects_mismatched_catalog() -> None:
    with pytest.raises(ValueError):
        EmbeddingProfile(EMB).fit(_history([(0, 0, "2020-01-01")]), 1, 5)
    with pytest.raises(ValueError):
        EmbeddingProfile(EMB, half_life=0.0)
