import numpy as np
import pandas as pd
import pytest

from kgrank.features.context import ContextVocab, Demographics, time_features
from kgrank.features.requests import Requests, requests_for_targets, to_seconds


def _targets() -> pd.DataFrame:
    return pd.DataFrame({
        "user_idx": [2, 0, 2],
        "item_idx": [5, 6, 7],
        "timestamp": pd.to_datetime(["2024-01-02 10:00", "2024-01-01 23:30", "2024-01-01 08:00"],
                                    utc=True),
        "device": ["app", None, "desktop"],
        "location": ["Paris", "Rome", ""],
        "query": [None, "red shoe", "  "],
    })


def test_one_request_per_user_at_first_target() -> None:
    req = requests_for_targets(_targets())
    assert req.user_idx.tolist() == [0, 2]
    assert req.target is not None and req.target.tolist() == [6, 7]
    assert req.query.tolist() == ["red shoe", None]  # blank query is no query
    assert req.location.tolist() == ["Rome", None]
    assert req.has_query.tolist() == [True, False]
    assert req.timestamp[0] == pd.Timestamp("2024-01-01 23:30", tz="UTC").timestamp()


def test_take_and_length_checks() -> None:
    req = requests_for_targets(_targets())
    sub = req.take(np.array([1]))
    assert len(sub) == 1 and sub.user_idx.tolist() == [2]
    with pytest.raises(ValueError, match="timestamp"):
        Requests(np.array([1, 2]), np.array([0]), np.array([None, None]),
                 np.array([None, None]), np.array([None, None]))


def test_to_seconds_handles_naive_and_aware() -> None:
    aware = pd.Series(pd.to_datetime(["1970-01-01 00:01"], utc=True))
    naive = pd.Series(pd.to_datetime(["1970-01-01 00:01"]))
    assert to_seconds(aware).tolist() == [60] == to_seconds(naive).tolist()


def test_context_vocab_unknown_is_zero() -> None:
    vocab = ContextVocab.fit(_targets())
    assert vocab.devices == ["app", "desktop"] and vocab.sizes == (3, 3)
    req = Requests(np.array([0, 1]), np.array([0, 0]), np.array(["desktop", "watch"], object),
                   np.array([None, "Paris"], object), np.array([None, None], object))
    assert vocab.ids(req).tolist() == [[2, 0], [0, 1]]
    assert ContextVocab.from_json(vocab.to_json()) == vocab


def test_time_features_are_cyclic() -> None:
    midnight = 4 * 86400  # 1970-01-05, a Monday
    tf = time_features(np.array([midnight, midnight + 6 * 3600, midnight + 7 * 86400]))
    assert np.allclose(tf[0], [0.0, 1.0, 0.0, 1.0], atol=1e-6)  # hour 0, Monday
    assert np.allclose(tf[1, :2], [1.0, 0.0], atol=1e-6)  # 06:00
    assert np.allclose(tf[0], tf[2], atol=1e-6)  # one week later


def test_demographics_numeric_and_categorical() -> None:
    users = pd.DataFrame({"user_id": ["a", "b", "c"], "age": [20.0, 40.0, np.nan],
                          "region": ["north", None, "south"]})
    d = Demographics.from_users(users)
    assert d.numeric_names == ["age"] and d.categorical_names == ["region"]
    assert d.numeric[2, 0] == 0.0 and d.numeric[0, 0] < 0 < d.numeric[1, 0]
    assert d.categorical[:, 0].tolist() == [1, 0, 2] and d.cardinalities == [3]
