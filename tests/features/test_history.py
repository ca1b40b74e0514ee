import numpy as np
import pandas as pd

from kgrank.features.history import request_history
from kgrank.features.requests import Requests


def _requests(users: list[int], times: list[int]) -> Requests:
    n = len(users)
    none = np.full(n, None, dtype=object)
    return Requests(np.array(users), np.array(times), none, none.copy(), none.copy())


def _history(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    u, i, t = zip(*rows, strict=True)
    return pd.DataFrame({"user_idx": u, "item_idx": i,
                         "timestamp": pd.to_datetime(list(t), unit="s", utc=True)})


HISTORY = [(0, 1, 10), (0, 2, 10), (0, 3, 20), (1, 4, 5), (1, 5, 7), (0, 9, 99)]


def test_events_up_to_the_request_with_group_weights() -> None:
    rh = request_history(_requests([0, 1, 0, 2], [20, 6, 15, 3]), _history(HISTORY))
    w = rh.matrix(10, half_life=1.0)
    # request 0: groups {1,2}@10 (one group back: weight 0.5 each) and {3}@20 (weight 1)
    assert np.allclose(w[0].toarray().ravel()[[1, 2, 3]], [0.25, 0.25, 0.5])
    assert w[0, 9] == 0  # the event after the request is never seen
    assert np.allclose(w[1].toarray().ravel()[4], 1.0) and w[1, 5] == 0
    assert np.allclose(w[2].toarray().ravel()[[1, 2]], [0.5, 0.5])
    assert w[3].nnz == 0 and rh.counts().tolist() == [3, 1, 2, 0]
    last = rh.last_group(10)
    assert last[0].toarray().ravel()[3] == 1.0 and last[0, 1] == 0


def test_order_within_a_timestamp_does_not_matter() -> None:
    req = _requests([0, 0], [20, 99])
    a = request_history(req, _history(HISTORY)).matrix(10, 2.0).toarray()
    swapped = [HISTORY[1], HISTORY[0], *HISTORY[2:]]
    b = request_history(req, _history(swapped[::-1])).matrix(10, 2.0).toarray()
    assert np.array_equal(a, b)


def test_future_events_change_nothing_and_cold_users_are_empty() -> None:
    req = _requests([0, -1], [20, 20])
    base = request_history(req, _history(HISTORY)).matrix(10, 1.0).toarray()
    planted = request_history(req, _history([*HISTORY, (0, 7, 21), (0, 8, 500)]))
    assert np.array_equal(base, planted.matrix(10, 1.0).toarray())
    assert planted.counts()[1] == 0


def test_max_groups_keeps_whole_groups() -> None:
    rh = request_history(_requests([0], [20]), _history(HISTORY))
    w = rh.matrix(10, half_life=1.0, max_groups=1, normalize=False).toarray().ravel()
    assert w[3] == 1.0 and w[1] == 0 and w[2] == 0


def test_matrix_matches_a_dense_reading_with_repeated_items() -> None:
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), int(t)) for u, i, t in zip(rng.integers(0, 4, 80),
                                                          rng.integers(0, 6, 80),  # repeats
                                                          rng.integers(0, 30, 80), strict=True)]
    rh = request_history(_requests([0, 1, 2, 3, 0, 7], [29, 15, 29, 3, 10, 29]), _history(rows))
    for half_life, groups in ((2.0, None), (1.0, 3)):
        w = rh.matrix(6, half_life, groups)
        assert w.has_canonical_format  # sorted, repeats summed into one entry
        keep = np.ones(len(rh.row), bool) if groups is None else rh.groups_from_end < groups
        want = np.zeros((6, 6))
        np.add.at(want, (rh.row[keep], rh.item[keep]),
                  0.5 ** (rh.groups_from_end[keep] / half_life))
        sums = want.sum(axis=1, keepdims=True)
        want = np.divide(want, sums, out=np.zeros_like(want), where=sums > 0)
        assert np.allclose(w.toarray(), want, atol=1e-6)
        assert w.toarray()[5].sum() == 0  # user 7 has no history
