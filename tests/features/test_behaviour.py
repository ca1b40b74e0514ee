from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kgrank.features.behaviour import (
    FEATURE_FAMILIES,
    FEATURE_NAMES,
    GLOBAL_FEATURES,
    NO_EVENT_DAYS,
    BehaviourFeatures,
    is_global,
)
from kgrank.features.neighbours import NEIGHBOUR_DOCS, neighbour_feature_names
from kgrank.features.requests import Requests

DAY = 86_400

ITEMS = pd.DataFrame({
    "item_id": [f"i{j}" for j in range(6)],
    "categories": [
        ["Shop > Beauty > Hair > Shampoo"],
        ["Shop > Beauty > Hair > Conditioner"],
        ["Shop > Beauty > Skin > Cream"],
        ["Shop > Home > Kitchen > Pan"],
        ["Shop > Home > Kitchen > Pot"],
        [],
    ],
    "brand": ["A", "A", "B", "C", None, None],
    "price": [10.0, 20.0, 30.0, 40.0, np.nan, np.nan],
})

# (user, item, time in seconds, device, location, session)
TOY = [
    (0, 0, 0, "mobile", "Berlin", "s1"),
    (0, 2, DAY, "mobile", "Berlin", "s2"),
    (0, 1, 2 * DAY, "desktop", "Berlin", "s3"),
    (0, 3, 2 * DAY, "desktop", "Berlin", "s3"),
    (1, 0, 0, "desktop", "Paris", "s4"),
    (1, 1, 3 * DAY, "desktop", "Paris", "s5"),
    (2, 2, 0, "mobile", "Paris", "s6"),
    (2, 3, 0, "mobile", "Paris", "s6"),
]


def _history(rows: list[tuple[int, int, int, str, str, str]]) -> pd.DataFrame:
    u, i, t, dev, loc, sess = zip(*rows, strict=True)
    return pd.DataFrame({
        "user_idx": np.array(u, dtype=np.int64),
        "item_idx": np.array(i, dtype=np.int64),
        "timestamp": pd.to_datetime(np.array(t, dtype=np.int64), unit="s", utc=True),
        "device": list(dev),
        "location": list(loc),
        "session_id": list(sess),
    })


def _requests(users: list[int], times: list[int], device: list[str | None] | None = None,
              location: list[str | None] | None = None) -> Requests:
    n = len(users)
    none = [None] * n
    return Requests(np.array(users, dtype=np.int64), np.array(times, dtype=np.int64),
                    np.array(device or none, dtype=object), np.array(location or none, dtype=object),
                    np.array(none, dtype=object))


def _fit(history: pd.DataFrame, items: pd.DataFrame = ITEMS, n_users: int = 4,
         half_life: float = 1.0, attributes: tuple[str, ...] = (),
         neighbours: int = 50) -> BehaviourFeatures:
    return BehaviourFeatures.fit(history, items, n_users, len(items), history_len=20,
                                 half_life=half_life, attributes=attributes,
                                 neighbours=neighbours)


# a categorical attribute column with a missing value and a non-string value
COLOURED = ITEMS.assign(colour=["red", "red", "blue", None, "blue", 3])


ALL = np.arange(6, dtype=np.int64)


def test_hand_checked_values() -> None:
    feats = _fit(_history(TOY))
    # user 0 at day 5: groups {1, 3}@2 (w 1), {2}@1 (w 0.5), {0}@0 (w 0.25); total 2.75
    # user 0 at day 1.5: {2}@1 latest, {0}@0 one group back
    req = _requests([0, 0], [5 * DAY, 3 * DAY // 2], location=["Berlin", "Berlin"])
    out = feats.transform(req, np.stack([ALL, ALL]))
    total = 2.75
    assert out["cat_leaf_share"][0, 0] == pytest.approx(0.25 / total)
    assert out["cat_parent_share"][0, 0] == pytest.approx(1.25 / total)  # Shop > Beauty > Hair
    assert out["cat_top_share"][0, 0] == pytest.approx(1.75 / total)  # Shop > Beauty
    assert out["cat_top_share"][0, 4] == pytest.approx(1.0 / total)  # Shop > Home
    assert out["brand_share"][0, 1] == pytest.approx(1.25 / total)
    assert out["cat_leaf_count"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert out["cat_top_count"][0].tolist() == [3, 3, 3, 1, 1, 0]
    assert out["brand_count"][0].tolist() == [2, 2, 1, 1, 0, 0]
    assert out["leaf_in_last"][0].tolist() == [0, 1, 0, 1, 0, 0]
    assert out["brand_in_last"][0].tolist() == [1, 1, 0, 1, 0, 0]
    assert out["item_in_history"][1].tolist() == [1, 0, 1, 0, 0, 0]
    # transitions over all users: 0 -> {2, 1} (user 0, user 1), 2 -> {1, 3}: P = 0.5 each
    assert out["trans_last"][1].tolist() == pytest.approx([0, 0.5, 0, 0.5, 0, 0])
    # decayed: P(.|2) + 0.5 * P(.|0)
    assert out["trans_decay"][1].tolist() == pytest.approx([0, 0.75, 0.25, 0.5, 0, 0])
    assert out["trans_last"][0].tolist() == [0] * 6  # items 1 and 3 lead nowhere
    # activity
    assert out["user_events"][:, 0].tolist() == [4, 2]
    assert out["user_groups"][:, 0].tolist() == [3, 2]
    assert out["user_days_since_last"][:, 0].tolist() == pytest.approx([3.0, 0.5])
    assert out["user_days_since_first"][:, 0].tolist() == pytest.approx([5.0, 1.5])
    # popularity strictly before day 1.5: item 0 twice at day 0, item 2 at days 0 and 1
    assert out["pop_before"][1].tolist() == [2, 0, 2, 1, 0, 0]
    assert out["pop_1d"][1].tolist() == [0, 0, 1, 0, 0, 0]
    assert out["item_days_since_last"][1, 0] == pytest.approx(1.5)
    assert out["item_days_since_last"][1, 4] == NO_EVENT_DAYS
    assert out["pop_all"][1].tolist() == [2, 2, 2, 2, 0, 0]
    # context: item 0's events before day 1.5 were in Berlin and in Paris
    assert out["ctx_item_location_share"][1, 0] == pytest.approx(0.5)
    assert out["ctx_user_location_share"][1, 0] == pytest.approx(1.0)
    # price: user 0 at day 1.5 has log1p(30) and log1p(10) with weights 1 and 0.5
    lp = np.log1p([10.0, 30.0])
    mean = (0.5 * lp[0] + lp[1]) / 1.5
    std = np.sqrt((0.5 * lp[0] ** 2 + lp[1] ** 2) / 1.5 - mean**2)
    assert out["price_z"][1, 1] == pytest.approx((np.log1p(20.0) - mean) / (std + 0.1), rel=1e-5)
    assert out["has_price"][1].tolist() == [1, 1, 1, 1, 0, 0]
    # leaf medians are the items' own prices here
    assert out["price_vs_leaf"][1].tolist() == [0] * 6


def test_events_after_the_request_change_no_request_time_feature() -> None:
    req = _requests([0, 1, 2, 0], [3 * DAY // 2, 3 * DAY, 0, 2 * DAY],
                    device=["mobile", "desktop", None, "mobile"],
                    location=["Berlin", "Paris", "Paris", None])
    cand = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 2, 3, 1, -1, -1],
                     [3, 3, 0, 1, 2, 4]])
    base = _fit(_history(TOY), COLOURED, attributes=("colour",)).transform(req, cand)
    assert "attr_colour_share" in base and "sess_prev_leaf_trans" in base
    nbr = [name for name in base if name.startswith("nbr_")]
    assert nbr == list(neighbour_feature_names(["colour"]))
    for name in ("nbr_leaf_share", "nbr_brand_share", "nbr_attr_colour_share",
                 "nbr_item_share"):
        assert (base[name] != 0).any(), name
    for r in range(len(req)):
        t, user = int(req.timestamp[r]), int(req.user_idx[r])
        future = [
            (user, 4, t + 1, "mobile", "Berlin", "s2"),  # the request's user, 1 s later
            (user, 5, t + 9 * DAY, "desktop", "Paris", "s9"),
            (user, 2, t + 9 * DAY, "desktop", "Paris", "s9"),  # an item other users have
            (3, 0, t + 1, "mobile", "Berlin", "s7"),  # other users
            (3, 1, t + 2, "mobile", "Berlin", "s7"),
            ((user + 1) % 3, 4, t + DAY, "desktop", "Paris", "s8"),
        ]
        planted = _fit(_history(TOY + future), COLOURED, attributes=("colour",)).transform(
            req.take(np.array([r])), cand[r:r + 1])
        for name in base:
            if not is_global(name):
                np.testing.assert_array_equal(base[name][r], planted[name][0], err_msg=name)
        # the user's own later events: other users' profiles are unchanged and the user's own
        # (whole-history) profile is never a neighbour, so the nbr_* features cannot move
        own = _fit(_history(TOY + future[:3]), COLOURED, attributes=("colour",)).transform(
            req.take(np.array([r])), cand[r:r + 1])
        for name in base:
            if name not in GLOBAL_FEATURES:
                np.testing.assert_array_equal(base[name][r], own[name][0], err_msg=name)


def test_popularity_ignores_events_at_the_request_time() -> None:
    t = 2 * DAY
    req = _requests([3], [t], device=["mobile"], location=["Berlin"])
    cand = ALL[None, :]
    base = _fit(_history(TOY)).transform(req, cand)
    at_t = [(3, 0, t, "mobile", "Berlin", "s7"), (2, 1, t, "mobile", "Berlin", "s6"),
            (1, 4, t, "mobile", "Berlin", "s5")]
    planted = _fit(_history(TOY + at_t)).transform(req, cand)
    for name in ("pop_before", "pop_1d", "pop_7d", "pop_30d", "item_days_since_last",
                 "ctx_item_location_share", "ctx_item_device_share"):
        np.testing.assert_array_equal(base[name], planted[name], err_msg=name)
    # the user's own event at the request time is history
    assert base["user_events"][0, 0] == 0 and planted["user_events"][0, 0] == 1
    assert planted["user_days_since_last"][0, 0] == 0


def _random_history(rng: np.random.Generator, n_users: int, n_items: int) -> pd.DataFrame:
    rows = []
    for u in range(n_users):
        days = np.sort(rng.integers(0, 6, size=int(rng.integers(1, 9))))
        items = rng.choice(n_items, size=len(days), replace=False)
        for d, i in zip(days, items, strict=True):
            rows.append((u, int(i), int(d) * DAY, str(rng.choice(["mobile", "desktop"])),
                         str(rng.choice(["Berlin", "Paris", "Rome"])), f"s{u}-{d // 2}"))
    return _history(rows)


def _random_items(rng: np.random.Generator, n_items: int) -> pd.DataFrame:
    leaves = ["Shop > A > x", "Shop > A > y", "Shop > B > z", "Shop > B > w > v"]
    return pd.DataFrame({
        "item_id": [f"i{j}" for j in range(n_items)],
        "categories": [[str(rng.choice(leaves))] if rng.random() < 0.9 else []
                       for _ in range(n_items)],
        "brand": [str(rng.choice(["A", "B", "C"])) if rng.random() < 0.8 else None
                  for _ in range(n_items)],
        "price": np.where(rng.random(n_items) < 0.8, rng.uniform(1, 100, n_items), np.nan),
        "colour": [str(rng.choice(["red", "blue"])) if rng.random() < 0.8 else None
                   for _ in range(n_items)],
    })


def test_same_time_order_and_item_ids_do_not_matter() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 25, 30
    history, items = _random_history(rng, n_users, n_items), _random_items(rng, n_items)
    req = _requests(list(range(n_users)), [int(rng.integers(0, 7 * DAY)) for _ in range(n_users)],
                    device=[str(rng.choice(["mobile", "desktop"])) for _ in range(n_users)],
                    location=[str(rng.choice(["Berlin", "Paris"])) for _ in range(n_users)])
    cand = np.stack([rng.permutation(n_items)[:12] for _ in range(n_users)])
    base = BehaviourFeatures.fit(history, items, n_users, n_items, 3, 2.0, attributes=["colour"],
                                 session_gap_s=DAY, neighbours=5).transform(req, cand)

    perm = rng.permutation(n_items)  # old item id -> new item id
    shuffled = history.iloc[rng.permutation(len(history))].reset_index(drop=True)
    shuffled["item_idx"] = perm[shuffled["item_idx"].to_numpy()]
    new_items = items.iloc[np.argsort(perm)].reset_index(drop=True)
    other = BehaviourFeatures.fit(shuffled, new_items, n_users, n_items, 3, 2.0,
                                  attributes=["colour"], session_gap_s=DAY, neighbours=5)
    moved = other.transform(req, perm[cand])
    assert list(base) == list(moved) == [*FEATURE_NAMES, "attr_colour_share", "attr_colour_count",
                                         *neighbour_feature_names(["colour"])]
    for name in base:
        np.testing.assert_array_equal(base[name], moved[name], err_msg=name)
    assert (base["sess_prev_leaf_trans"] > 0).any() and (base["attr_colour_share"] > 0).any()
    assert (base["trans_decay"] > 0).any() and (base["cooc_score"] > 0).any()
    assert (base["knn_max"] > 0).any() and (base["price_z"] != 0).any()
    for name in ("nbr_leaf_share", "nbr_parent_share", "nbr_brand_share",
                 "nbr_attr_colour_share", "nbr_item_share", "nbr_rel_price_gap"):
        assert (base[name] != 0).any(), name
    # every request has at least one neighbour
    assert (base["nbr_sim"] > 0).all()


def test_cached_neighbours_give_the_same_bits() -> None:
    """Serving caches each user's neighbours of their whole history: requests made after all of
    their user's events read them, the others (earlier requests, unknown users) compute theirs;
    every feature is the same bits as without the cache."""
    rng = np.random.default_rng(1)
    n_users, n_items = 25, 30
    history, items = _random_history(rng, n_users, n_items), _random_items(rng, n_items)
    users = [*range(n_users), -1, 3, 7]
    times = [int(rng.integers(0, 7 * DAY)) for _ in range(n_users)] + [DAY, 10 * DAY, 0]
    req = _requests(users, times)
    cand = np.stack([rng.permutation(n_items)[:12] for _ in users])
    feats = BehaviourFeatures.fit(history, items, n_users, n_items, 3, 2.0,
                                  attributes=["colour"], session_gap_s=DAY, neighbours=5)
    plain = feats.transform(req, cand)
    feats.cache_neighbours()
    last = history.groupby("user_idx")["timestamp"].max()
    after_all = np.array([u >= 0 and req.timestamp[r] >= last[u].timestamp()
                          for r, u in enumerate(users)])
    assert 0 < after_all.sum() < len(users)  # both paths are taken
    cached = feats.transform(req, cand)
    for name in plain:
        np.testing.assert_array_equal(plain[name], cached[name], err_msg=name)


def test_empty_history_and_bare_items_are_finite() -> None:
    feats = _fit(_history(TOY), n_users=6)
    req = _requests([5, -1, 0], [DAY, DAY, DAY], device=["tablet", None, "mobile"],
                    location=[None, "Rome", "Berlin"])
    cand = np.array([[5, 4, 0], [5, 0, -1], [5, 4, -1]])
    out = feats.transform(req, cand)
    for name in out:
        assert out[name].shape == (3, 3) and out[name].dtype == np.float32
        assert np.isfinite(out[name]).all(), name
        assert out[name][1, 2] == 0 and out[name][2, 2] == 0, name  # padding
    assert out["user_events"][:2, 0].tolist() == [0, 0]
    assert out["user_days_since_last"][:2, 0].tolist() == [NO_EVENT_DAYS] * 2
    assert out["has_price"][0].tolist() == [0, 0, 1]
    assert out["price_z"][2, :2].tolist() == [0, 0]

    bare_items = ITEMS[["item_id"]]
    empty = _history(TOY).iloc[:0]
    for history, items in ((empty, ITEMS), (_history(TOY), bare_items), (empty, bare_items)):
        out = _fit(history, items).transform(req, cand)
        assert all(np.isfinite(out[name]).all() for name in out)
        assert set(FEATURE_NAMES) < set(out)


def test_every_feature_has_a_family() -> None:
    out = _fit(_history(TOY)).transform(_requests([0], [DAY]), ALL[None, :])
    assert list(out) == [*FEATURE_NAMES, *NEIGHBOUR_DOCS]
    assert list(FEATURE_NAMES) == list(FEATURE_FAMILIES)
    off = _fit(_history(TOY), neighbours=0).transform(_requests([0], [DAY]), ALL[None, :])
    assert list(off) == list(FEATURE_NAMES)
    for name, value in off.items():
        np.testing.assert_array_equal(value, out[name], err_msg=name)
    assert set(FEATURE_FAMILIES.values()) == {"behaviour", "context"}
    assert {n for n, f in FEATURE_FAMILIES.items() if f == "context"} == {
        "ctx_item_location_share", "ctx_item_device_share", "ctx_user_device_share",
        "ctx_user_location_share"}
    assert set(FEATURE_NAMES) >= GLOBAL_FEATURES


def test_session_attribute_and_relative_price_values() -> None:
    feats = _fit(_history(TOY), COLOURED, attributes=("colour",))
    n = len(FEATURE_NAMES)
    assert feats.feature_names[n:n + 2] == ("attr_colour_share", "attr_colour_count")
    req = _requests([0, 0, 1], [2 * DAY, 3 * DAY // 2, 0])
    out = feats.transform(req, np.stack([ALL] * 3))
    # sessions (days apart, gap 30 min): user 0 {0} {2} {1, 3}; user 1 {0} {1}; user 2 {2, 3}.
    # S(Shampoo) = {Cream .5, Conditioner .5}, S(Cream) = {Conditioner .5, Pan .5};
    # next-session leaves: Cream, Conditioner, Pan, Conditioner -> shares .25, .5, .25
    assert out["sess_events"][:, 0].tolist() == [2, 0, 1]
    for r in (0, 1):  # in session {1, 3} at day 2, or a new session at day 1.5: P = {2} (Cream)
        assert out["sess_prev_leaf_trans"][r].tolist() == pytest.approx([0, .5, 0, .5, 0, 0])
        assert out["sess_prev_leaf_lift"][r].tolist() == pytest.approx([0, 1, 0, 2, 0, 0])
    assert out["sess_prev_leaf_trans"][2].tolist() == [0] * 6  # user 1's first session
    # user 0 at day 2: weights 1 (items 1, 3), .5 (item 2), .25 (item 0); red = items 0, 1
    total = 2.75
    assert out["attr_colour_share"][0].tolist() == pytest.approx(
        [1.25 / total, 1.25 / total, .5 / total, 0, .5 / total, 0])
    assert out["attr_colour_count"][0].tolist() == [2, 2, 1, 0, 1, 0]
    # relative price: items 0 and 1 share a leaf (median 15); user 0 at day 1.5 has item 2
    # (w 1, its own leaf: 0) and item 0 (w .5)
    items = ITEMS.assign(categories=[ITEMS["categories"][0]] * 2 + list(ITEMS["categories"][2:]))
    out = _fit(_history(TOY), items).transform(req.take(np.array([1])), ALL[None, :])
    rel0, rel1 = np.log1p(10.0) - np.log1p(15.0), np.log1p(20.0) - np.log1p(15.0)
    assert out["rel_price_gap"][0, 1] == pytest.approx(rel1 - 0.5 * rel0 / 1.5, rel=1e-5)
    assert out["rel_price_abs_gap"][0, 0] == pytest.approx(abs(rel0 - 0.5 * rel0 / 1.5), rel=1e-5)
    assert out["rel_price_gap"][0, 4] == 0  # no price


def test_neighbourhood_values() -> None:
    # user 0: Shampoo(A) day 0, Cream(B) day 1, Pan(C) day 5 (after the requests);
    # user 1: Shampoo(A), Conditioner(A); users 2 and 4: Cream(B), Pan(C); user 3: Pot (no brand)
    rows = [(0, 0, 0), (0, 2, DAY), (0, 3, 5 * DAY), (1, 0, 0), (1, 1, 0), (2, 2, 0), (2, 3, 0),
            (3, 4, 0), (4, 3, 0), (4, 2, 0)]
    history = _history([(u, i, t, "mobile", "Berlin", f"s{u}") for u, i, t in rows])
    req = _requests([0, 0, -1], [2 * DAY, 0, 2 * DAY])
    feats = _fit(history, n_users=5, neighbours=2)
    out = feats.transform(req, np.stack([ALL] * 3))
    # request 0: q = {item 0, item 2}. Mean of the leaf / brand / item cosines:
    # user 1: leaf 1/2, brand <(1, 1), (2, 0)> / (sqrt 2 * 2) = 1/sqrt 2, item 1/2;
    # users 2 and 4: 1/2 each; user 3: 0 (no shared leaf, no brand, no shared item)
    s1, s2 = (1.0 + 1 / np.sqrt(2)) / 3, 0.5
    # k = 2: user 1 and, of the tied users 2 and 4, the lower index; never user 0 itself
    w = feats.nbr.neighbours(np.array([0]), np.zeros(2, np.int64), np.array([0, 2]))
    assert w.indices.tolist() == [1, 2] and w.data == pytest.approx([s1, s2])
    total = s1 + s2
    assert out["nbr_sim"][0, 0] == pytest.approx(total / 2)
    # leaves: user 1 half Shampoo / half Conditioner, user 2 half Cream / half Pan
    assert out["nbr_leaf_share"][0].tolist() == pytest.approx(
        [s1 / 2 / total, s1 / 2 / total, s2 / 2 / total, s2 / 2 / total, 0, 0])
    # parents: Hair (user 1: 2 of 2), Skin (user 2: 1 of 2), Kitchen (user 2: 1 of 2; Pot too)
    assert out["nbr_parent_share"][0].tolist() == pytest.approx(
        [s1 / total, s1 / total, s2 / 2 / total, s2 / 2 / total, s2 / 2 / total, 0])
    assert out["nbr_brand_share"][0].tolist() == pytest.approx(
        [s1 / total, s1 / total, s2 / 2 / total, s2 / 2 / total, 0, 0])
    assert out["nbr_item_share"][0].tolist() == pytest.approx(
        [s1 / total, s1 / total, s2 / total, s2 / total, 0, 0])
    # request 1 (t = 0): q = {item 0}; only user 1 has sim > 0:
    # leaf 1/sqrt 2, brand <1, 2> / 2 = 1, item 1/sqrt 2
    assert out["nbr_sim"][1, 0] == pytest.approx((1 + np.sqrt(2)) / 3)
    assert out["nbr_item_share"][1].tolist() == pytest.approx([1, 1, 0, 0, 0, 0])
    # an unknown user has no profile and no neighbours
    assert all((out[name][2] == 0).all() for name in NEIGHBOUR_DOCS)
    # a request alone (the serving path) gets exactly its row of the batch
    for r in range(len(req)):
        alone = feats.transform(req.take(np.array([r])), ALL[None, :])
        for name in NEIGHBOUR_DOCS:
            np.testing.assert_array_equal(alone[name][0], out[name][r], err_msg=name)

    # price level: items 0 and 1 share a leaf (median price 15); every other priced item is its
    # leaf's median. user 0's leaf cosine with user 1 becomes <(1, 1), (2, 0)> / (sqrt 2 * 2)
    items = ITEMS.assign(categories=[ITEMS["categories"][0]] * 2 + list(ITEMS["categories"][2:]))
    out = _fit(history, items, n_users=5, neighbours=2).transform(req.take(np.array([0])),
                                                                  ALL[None, :])
    s1 = 2 / np.sqrt(2) / 3 + 0.5 / 3
    rel0, rel1 = np.log1p(10.0) - np.log1p(15.0), np.log1p(20.0) - np.log1p(15.0)
    mean = (s1 * (rel0 + rel1) / 2 + s2 * 0.0) / (s1 + s2)  # user 2's items are at 0
    assert out["nbr_rel_price_gap"][0].tolist() == pytest.approx(
        [rel0 - mean, rel1 - mean, -mean, -mean, 0, 0], rel=1e-5)
    assert out["nbr_rel_price_abs_gap"][0, 0] == pytest.approx(abs(rel0 - mean), rel=1e-5)
