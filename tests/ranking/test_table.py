from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kgrank.ranking.table import TokenIndex, item_tokens_text


def test_attribute_values_join_the_query_tokens() -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "colour": ["red", None, "blue"],
                          "material": ["linen", "wool", 3]})
    texts = item_tokens_text(["Soft Shirt", "Warm Scarf", "Mug"], items, ["colour", "material"])
    assert texts == ["Soft Shirt red linen", "Warm Scarf wool", "Mug blue"]
    assert item_tokens_text(["x", "y", "z"], items, []) == ["x", "y", "z"]
    with pytest.raises(ValueError, match="2 item texts for 3 items"):
        item_tokens_text(["x", "y"], items, ["colour"])
    index = TokenIndex.build(texts)
    share = index.overlap(np.array(["red linen shirt", None, "blue striped"], dtype=object))
    np.testing.assert_allclose(share.toarray(), [[1, 0, 0], [0, 0, 0], [0, 0, 0.5]], rtol=1e-6)


def test_query_scores_are_minus_inf_without_a_query() -> None:
    import torch

    from kgrank.features.history import request_history
    from kgrank.features.requests import Requests
    from kgrank.ranking.table import PartFeatures
    from tests.features.test_history import HISTORY, _history

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    none = np.full(3, None, dtype=object)
    req = Requests(np.array([0, 1, 0]), np.array([20, 20, 20]), none, none.copy(),
                   np.array([None, "a query", None], dtype=object))
    qemb = np.zeros((3, 4), np.float32)
    qemb[1] = rng.normal(size=4)
    feats = PartFeatures(req, request_history(req, _history(HISTORY)), 10,
                         {"text": (emb, "text")}, {"text": qemb})
    all_none = feats.query_scores(np.array([0, 2]))
    assert all_none.shape == (2, 10) and torch.isneginf(all_none).all()
    mixed = feats.query_scores(np.array([0, 1, 2]))
    assert torch.isneginf(mixed[[0, 2]]).all()
    assert torch.allclose(mixed[1], torch.from_numpy(emb @ qemb[1]))


def test_similarities_are_each_requests_own_in_any_batch() -> None:
    from kgrank.ranking.table import SIM_ROWS, _similarities

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    items = rng.integers(0, 50, (5, SIM_ROWS + 7))  # more than one chunk per request
    vecs = rng.normal(size=(5, 16, 3)).astype(np.float32)
    batch = _similarities(emb, items, vecs)
    assert batch.shape == (5, SIM_ROWS + 7, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, np.einsum("bcd,bdm->bcm", emb[items], vecs), rtol=1e-5,
                               atol=1e-5)
    for r in range(5):  # alone: the same bits
        assert np.array_equal(_similarities(emb, items[r : r + 1], vecs[r : r + 1])[0], batch[r])
