"""NeighbourIndex against a dense brute-force reading of its docstring's formulas."""

from __future__ import annotations

import numpy as np
import pytest

from kgrank.features.neighbours import NeighbourIndex

N_USERS, N_ITEMS = 40, 30


def _index(rng: np.random.Generator, k: int) -> tuple[NeighbourIndex, dict[str, np.ndarray],
                                                      np.ndarray, np.ndarray]:
    user = rng.integers(0, N_USERS, 400)
    item = rng.integers(0, N_ITEMS, 400)
    codes = {"leaf": rng.integers(0, 6, N_ITEMS), "parent": rng.integers(0, 3, N_ITEMS),
             "brand": np.where(rng.random(N_ITEMS) < 0.2, -1, rng.integers(0, 5, N_ITEMS))}
    rel_price = np.where(rng.random(N_ITEMS) < 0.1, np.nan, rng.normal(size=N_ITEMS))
    index = NeighbourIndex.fit(user, item, N_USERS, N_ITEMS, codes, ("leaf", "brand", "item"),
                               rel_price, k)
    return index, {**codes, "item": np.arange(N_ITEMS)}, user, item


def _profile(owner_items: np.ndarray, code: np.ndarray, size: int, binary: bool) -> np.ndarray:
    out = np.zeros(size)
    c = code[owner_items]
    np.add.at(out, c[c >= 0], 1.0)
    return np.minimum(out, 1.0) if binary else out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbours_and_shares_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 5
    index, codes, user, item = _index(rng, k)
    # three requests: two known users with a few events each, one unknown user
    req_user = np.array([3, 7, -1])
    owner = np.array([0, 0, 0, 1, 1, 2])
    ev_item = rng.integers(0, N_ITEMS, len(owner))
    w = index.neighbours(req_user, owner, ev_item).toarray()
    sizes = {b: int(c.max()) + 1 for b, c in codes.items()}
    for r, u in enumerate(req_user):
        mine = ev_item[owner == r]
        sim = np.zeros(N_USERS)
        for v in range(N_USERS):
            theirs = item[user == v]
            sim[v] = np.mean([_cos(_profile(mine, codes[b], sizes[b], b == "item"),
                                   _profile(theirs, codes[b], sizes[b], b == "item"))
                              for b in ("leaf", "brand", "item")])
        if u >= 0:
            sim[u] = 0.0  # never the user's own profile
        order = np.lexsort((np.arange(N_USERS), -sim))  # largest first, ties: lower index
        want = np.zeros(N_USERS)
        top = [v for v in order[:k] if sim[v] > 0]
        want[top] = sim[top]
        assert w[r] == pytest.approx(want, abs=1e-6), r
    # features of every (request, item): the similarity-weighted neighbour shares
    rf = np.repeat(np.arange(3), N_ITEMS)
    cand = np.tile(np.arange(N_ITEMS), 3)
    f = index.features(req_user, owner, ev_item, rf, cand, [])
    for r in range(3):
        s = w[r]
        if s.sum() == 0:
            assert all((f[name][rf == r] == 0).all() for name in f), r
            continue
        for b in ("leaf", "parent", "brand", "item"):
            want = np.zeros(N_ITEMS)
            for v in np.flatnonzero(s):
                theirs = item[user == v]
                p = _profile(theirs, codes[b], sizes[b], b == "item")
                p = p if b == "item" else p / len(theirs)
                c = codes[b]
                want += s[v] * np.where(c >= 0, p[np.maximum(c, 0)], 0.0)
            assert f[f"nbr_{b}_share"][rf == r] == pytest.approx(want / s.sum(), abs=1e-9), b
        assert f["nbr_sim"][rf == r] == pytest.approx(s.sum() / np.count_nonzero(s))


def test_requests_in_a_batch_do_not_change_each_other() -> None:
    index, _, _, _ = _index(np.random.default_rng(5), 4)
    rng = np.random.default_rng(6)
    req_user = rng.integers(-1, N_USERS, 12)
    owner = np.sort(rng.integers(0, 12, 60))
    ev_item = rng.integers(0, N_ITEMS, 60)
    rf = np.repeat(np.arange(12), N_ITEMS)
    cand = np.tile(np.arange(N_ITEMS), 12)
    together = index.features(req_user, owner, ev_item, rf, cand, [])
    for r in range(12):
        alone = index.features(req_user[r : r + 1], np.zeros(int((owner == r).sum()), np.int64),
                               ev_item[owner == r], np.zeros(N_ITEMS, np.int64),
                               np.arange(N_ITEMS), [])
        for name, values in alone.items():
            assert np.array_equal(together[name][rf == r], values), (r, name)


def test_cached_users_read_back_the_same_entries() -> None:
    """``cache_users`` keeps each user's neighbours; rows marked ``cached`` read them (mixed
    with computed rows in one batch) and every feature keeps its bits."""
    index, _, user, item = _index(np.random.default_rng(7), 4)
    order = np.argsort(user, kind="stable")
    ids = np.unique(user)
    index.cache_users(ids, np.searchsorted(ids, user[order]), item[order])
    req_user = np.array([ids[0], -1, ids[3], ids[5], ids[3]])
    # rows 0, 2 and 3 ask with their user's whole history, rows 1 and 4 with other events
    events = [item[user == ids[0]], item[:5], item[user == ids[3]], item[user == ids[5]],
              item[user == ids[3]][:2]]
    owner = np.repeat(np.arange(5), [len(e) for e in events])
    ev_item = np.concatenate(events)
    rf = np.repeat(np.arange(5), N_ITEMS)
    cand = np.tile(np.arange(N_ITEMS), 5)
    whole = np.array([True, False, True, True, False])
    computed = index.features(req_user, owner, ev_item, rf, cand, [])
    read = index.features(req_user, owner, ev_item, rf, cand, [], cached=whole)
    for name, values in computed.items():
        assert np.array_equal(read[name], values), name
    assert (computed["nbr_sim"][rf == 0] > 0).all()


@pytest.mark.parametrize("seed", [0, 3])
def test_dense_and_sparse_paths_give_the_same_bits(seed: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks' dot products are dense matrix products and small key spaces dense tables;
    both must give exactly what the sparse expansion and the binary search give."""
    import kgrank.features.lookup as lookup_mod
    import kgrank.features.neighbours as nbr_mod

    rng = np.random.default_rng(seed)
    req_user = rng.integers(-1, N_USERS, 9)
    owner = np.sort(rng.integers(0, 9, 50))
    ev_item = rng.integers(0, N_ITEMS, 50)
    rf = np.repeat(np.arange(9), N_ITEMS)
    cand = np.tile(np.arange(N_ITEMS), 9)
    out = []
    for cells, keys in ((nbr_mod.DENSE_CELLS, lookup_mod.DENSE_KEYS), (0, 0)):
        monkeypatch.setattr(nbr_mod, "DENSE_CELLS", cells)
        monkeypatch.setattr(lookup_mod, "DENSE_KEYS", keys)
        index, _, _, _ = _index(np.random.default_rng(seed), 4)  # a fresh dense-block cache
        out.append((index._neighbour_entries(req_user, owner, ev_item),
                    index.features(req_user, owner, ev_item, rf, cand, [])))
    (dense_entries, dense_f), (sparse_entries, sparse_f) = out
    assert index._dense == {}  # the second index never built a dense block
    for a, b in zip(dense_entries, sparse_entries, strict=True):
        assert np.array_equal(a, b)
    assert dense_f.keys() == sparse_f.keys()
    for name in dense_f:
        assert np.array_equal(dense_f[name], sparse_f[name]), name
