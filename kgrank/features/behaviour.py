"""Behaviour and context-interaction features of (request, candidate item) pairs.

:meth:`BehaviourFeatures.fit` indexes a part's history (``Split.history(part)``: ``user_idx``,
``item_idx``, ``timestamp`` and optional ``device`` / ``location`` / ``session_id`` columns) and
the items table; :meth:`BehaviourFeatures.transform` returns one float32 ``[R, C]`` array per
feature for requests x candidate item ids (``-1`` = padding; padding cells hold 0).

Time rules (``t`` = the request timestamp):

* **user history** - the user's events with ``ts <= t`` (the split puts events at the request
  time in the history; events after it never count). The *considered* history is the user's
  last ``history_len`` distinct timestamps; an event's recency weight is
  ``w = 0.5 ** (g / half_life)`` with ``g`` the number of distinct later timestamps among the
  user's events ``<= t`` (``g = 0``: the latest group). Equal timestamps get equal weights and
  every sum is taken in a canonical order (by key, then by value), so no feature depends on the
  order of same-time events or on item id order.
* **request-time popularity and context** - events of all users with ``ts < t`` (strictly before),
  found with ``np.searchsorted`` on per-entity sorted timestamp arrays.
* **fitted item-item statistics** (:data:`GLOBAL_FEATURES`) - the transition, co-occurrence and
  cosine matrices and ``pop_all`` are fitted once on the whole history, as the baselines are; only
  *which* user items they are read from follows the request time.

* **neighbourhood taste** (``nbr_*``, :mod:`kgrank.features.neighbours`) - the requesting user's
  profile from their events ``<= t``; their ``k`` most similar users' profiles are fitted on the
  whole history (like the item-item statistics), never including the user's own.

Item attributes: the primary category is the item's first path in ``categories`` (``"A > B > C"``;
a plain name is a one-level path). ``leaf`` is the full path, ``parent`` drops the last level and
``top`` is the first level below the root shared by every categorized item (Amazon Beauty's
``"Beauty > Makeup"``, the demo shop's ``"Fashion"``); ``parent`` is never above ``top``. Prices
enter as ``log1p(price)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kgrank.features.lookup import lookup
from kgrank.features.neighbours import (
    NeighbourIndex,
    neighbour_feature_names,
)
from kgrank.features.requests import Requests, to_seconds

DAY = 86_400
"""Seconds per day."""
NO_EVENT_DAYS = 10_000.0
"""``*_days_since_*`` value when there is no such event."""
PRICE_EPS = 0.1
"""Added to the user's log-price standard deviation in ``price_z``."""
TRANSITION_GROUPS = 3
"""Timestamp groups (from the latest) read by ``trans_decay``."""
KNN_NEIGHBORS = 200
"""Cosine neighbours kept per item for ``knn_max`` (all ties with the last one are kept)."""
POP_WINDOWS = (1, 7, 30)
"""Day windows of the request-time popularity counts."""
CHUNK = 2048
"""Requests per transform chunk (bounds the temporary memory)."""
SESSION_GAP_S = 1800
"""Default session gap: a user's events more than this many seconds apart are in different
sessions (the usual 30 minutes of session-based recommendation)."""

FEATURE_DOCS: dict[str, str] = {
    # user activity (per request, broadcast over candidates)
    "user_events": "number of the user's history events with ts <= t",
    "user_groups": "number of distinct timestamps among them",
    "user_days_since_last": "(t - the user's latest event time <= t) / 1 day; NO_EVENT_DAYS if none",
    "user_days_since_first": "(t - the user's first event time) / 1 day; NO_EVENT_DAYS if none",
    # category / brand affinity over the considered history H (last history_len timestamps)
    "cat_leaf_share": "sum_{e in H, leaf(e) = leaf(c)} w_e / sum_{e in H} w_e",
    "cat_parent_share": "as cat_leaf_share for the parent category",
    "cat_top_share": "as cat_leaf_share for the top-level category",
    "brand_share": "as cat_leaf_share for the brand",
    "cat_leaf_count": "#{e in H : leaf(e) = leaf(c)}",
    "cat_parent_count": "#{e in H : parent(e) = parent(c)}",
    "cat_top_count": "#{e in H : top(e) = top(c)}",
    "brand_count": "#{e in H : brand(e) = brand(c)}",
    # price
    "price_z": "(lp(c) - m_u) / (s_u + PRICE_EPS), lp = log1p(price), m_u / s_u the w-weighted mean "
               "/ std of lp over priced events in H; 0 if either side has no price",
    "price_abs_z": "|price_z|",
    "price_vs_leaf": "lp(c) - log1p(median price of c's leaf category, else of the catalog); "
                     "0 without price",
    "has_price": "1 if the candidate has a price",
    "rel_price_gap": "price_vs_leaf(c) - the w-weighted mean of price_vs_leaf over priced events "
                     "in H (how much dearer than usual for its category); 0 if either side has "
                     "no price",
    "rel_price_abs_gap": "|rel_price_gap|",
    # item-to-item
    "trans_last": "mean_{a in latest group} P(c | a), P the row-normalised counts of a -> b over "
                  "consecutive distinct timestamps of every user",
    "trans_decay": "sum_{g < TRANSITION_GROUPS} 0.5 ** (g / half_life) mean_{a in group g} P(c | a)",
    "cooc_score": "sum_{e in H} w_e Q(c | a_e) / sum w_e, Q the row-normalised number of users "
                  "with a and b at one timestamp or in one session",
    "knn_max": "max_{a in H} cos(a, c), binary user co-interaction cosine (top KNN_NEIGHBORS)",
    # sessions: the request's session is the run of the user's events <= t whose gaps (and the
    # gap to t) are <= session_gap_s; P = the latest timestamp group before that session (the
    # latest group when the request starts a new session)
    "sess_events": "number of the user's events in the request's session (0: a new session)",
    "sess_prev_leaf_trans": "mean_{a in P} S(leaf(c) | leaf(a)), S the row-normalised counts of "
                            "leaf(a) -> leaf(b), a in the last group of a session and b in the "
                            "user's next session",
    "sess_prev_leaf_lift": "sess_prev_leaf_trans / the share of leaf(c) among all next-session "
                           "items",
    "item_in_history": "1 if c itself is in H",
    # request-time popularity (all users, events strictly before t)
    "pop_1d": "events of c in [t - 1 day, t)",
    "pop_7d": "events of c in [t - 7 days, t)",
    "pop_30d": "events of c in [t - 30 days, t)",
    "pop_before": "events of c before t",
    "item_days_since_last": "(t - c's latest event time < t) / 1 day; NO_EVENT_DAYS if none",
    "pop_all": "events of c in the whole fitted history",
    # repeat signals
    "leaf_in_last": "1 if leaf(c) occurs in the user's latest timestamp group",
    "brand_in_last": "1 if brand(c) occurs in the user's latest timestamp group",
    # context x item
    "ctx_item_location_share": "share of c's events before t made at the request's location",
    "ctx_item_device_share": "share of c's events before t made on the request's device",
    "ctx_user_device_share": "share of the user's events <= t made on the request's device",
    "ctx_user_location_share": "share of the user's events <= t made at the request's location",
}
"""One line per feature: its formula (``c`` = candidate, ``t`` = request time, ``w`` = recency
weight, ``H`` = considered history)."""

FEATURE_FAMILIES: dict[str, str] = {
    name: "context" if name.startswith("ctx_") else "behaviour" for name in FEATURE_DOCS
}
"""Feature name -> family (``behaviour`` or ``context``), in output order."""

FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_FAMILIES)

GLOBAL_FEATURES: frozenset[str] = frozenset(
    {"trans_last", "trans_decay", "cooc_score", "knn_max", "pop_all", "sess_prev_leaf_trans",
     "sess_prev_leaf_lift"}
)
"""Features that read item-item statistics (or counts) fitted on the whole history; all other
features use only events before the request (``<= t`` for the user, ``< t`` for other users).
The neighbourhood features (:func:`is_global`) read other users' whole-history profiles too."""


def is_global(name: str) -> bool:
    """Whether feature ``name`` reads statistics fitted on the whole history: the
    :data:`GLOBAL_FEATURES` and the neighbourhood features ``nbr_*`` (whose requesting user's own
    profile still uses only events ``<= t``)."""
    return name in GLOBAL_FEATURES or name.startswith("nbr_")


def attribute_feature_names(attributes: Sequence[str]) -> tuple[str, ...]:
    """Names of the attribute-affinity features of item columns ``attributes``: per column
    ``attr_<col>_share`` (as ``cat_leaf_share`` for the column's value) and ``attr_<col>_count``."""
    return tuple(f"attr_{col}_{kind}" for col in attributes for kind in ("share", "count"))

_Side = Literal["left", "right"]


# --------------------------------------------------------------------------- array helpers


def _ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, position)`` for every position of the half-open ranges ``[starts, stops)``."""
    lengths = np.maximum(stops - starts, 0).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    offsets = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
    return owner, pos


def _segment_sums(
    keys: np.ndarray, values: Sequence[np.ndarray], sort_by: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted unique keys and, per value array, the sum of its entries per key.

    Entries are summed in the order (key, ``sort_by`` columns, first value), which is canonical:
    the floating-point sums do not depend on the input order.
    """
    if len(keys) == 0:
        return keys[:0], [np.zeros(0, dtype=np.float64) for _ in values]
    order = np.lexsort((values[0], *reversed(list(sort_by)), keys))
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sums = [np.add.reduceat(np.asarray(v, dtype=np.float64)[order], starts) for v in values]
    return k[starts], sums


def _segment_max(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the max value per key."""
    if len(keys) == 0:
        return keys[:0], np.zeros(0, dtype=np.float64)
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.maximum.reduceat(values[order], starts)


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[idx]`` with out-of-range positions (and an empty ``values``) giving 0."""
    if len(values) == 0:
        return np.zeros(len(idx), dtype=values.dtype)
    ok = (idx >= 0) & (idx < len(values))
    return np.where(ok, values[np.clip(idx, 0, len(values) - 1)], 0)


def _scatter(n: int, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    out[keys] = values
    return out


def _expand_rows(
    mat: sp.csr_matrix, owner: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each ``(owner[k], rows[k])``: the stored entries of ``mat[rows[k]]`` as
    ``(k, column, value)`` triples."""
    k, pos = _ranges(mat.indptr[rows].astype(np.int64), mat.indptr[rows + 1].astype(np.int64))
    return k, mat.indices[pos].astype(np.int64), mat.data[pos].astype(np.float64)


def _row_normalise(counts: sp.csr_matrix) -> sp.csr_matrix:
    rowsum = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    out = sp.csr_matrix(sp.diags(1.0 / np.maximum(rowsum, 1.0)) @ counts)
    out.sort_indices()
    return out


def _keep_top(mat: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep each row's entries >= its k-th largest value (ties at the cut are all kept)."""
    mat = mat.tocsr()
    lengths = np.diff(mat.indptr)
    if k <= 0 or not (lengths > k).any():
        return mat
    row = np.repeat(np.arange(mat.shape[0]), lengths)
    order = np.lexsort((-mat.data, row))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - mat.indptr[row[order]]
    kth = np.full(mat.shape[0], -np.inf)
    at_k = rank == k - 1
    kth[row[at_k]] = mat.data[at_k]
    keep = mat.data >= kth[row]
    out = sp.csr_matrix((mat.data[keep], (row[keep], mat.indices[keep])), shape=mat.shape)
    out.sort_indices()
    return out


def _codes(values: pd.Series | np.ndarray | None, vocab: list[str]) -> np.ndarray:
    """int64 ids of (stripped) strings in ``vocab``; -1 for missing, blank or unknown values."""
    if values is None:
        return np.zeros(0, dtype=np.int64)
    index = {v: i for i, v in enumerate(vocab)}
    return np.array([index.get(v.strip(), -1) if isinstance(v, str) else -1 for v in list(values)],
                    dtype=np.int64)


def _attribute_codes(column: pd.Series) -> np.ndarray:
    """int64 value ids of a categorical item column (strings, bools, integers; anything else,
    e.g. None / NaN / lists, is missing = -1), numbered in sorted value order."""
    values = pd.Series([str(v) if isinstance(v, str | bool | int | np.integer) else None
                        for v in column.tolist()], dtype=object)
    return _codes(values, _vocab(values))


def _vocab(values: pd.Series | None) -> list[str]:
    if values is None:
        return []
    return sorted({v.strip() for v in values.tolist() if isinstance(v, str) and v.strip()})


# --------------------------------------------------------------------------- time index


@dataclass
class _TimeIndex:
    """Events grouped by an int64 entity code and sorted by time, for counting with searchsorted.

    ``keys = rank(entity) * span + (ts - t0)`` is sorted; ``order`` maps key positions back to the
    input rows and ``starts[r]`` is the first position of entity rank ``r``.
    """

    codes: np.ndarray
    keys: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    t0: int
    span: int
    dense: np.ndarray
    """code -> rank table (-1 = no event) when the codes are small non-negative ints, else empty."""

    @classmethod
    def build(cls, entity: np.ndarray, ts: np.ndarray, t0: int, span: int) -> _TimeIndex:
        codes, rank = np.unique(entity, return_inverse=True)
        rank = rank.astype(np.int64).ravel()
        if len(codes) and len(codes) > np.iinfo(np.int64).max // span - 1:
            raise OverflowError("too many entities x time span for an int64 time index")
        order = np.lexsort((ts, rank))
        keys = rank[order] * span + (ts[order] - t0)
        starts = np.searchsorted(keys, np.arange(len(codes) + 1, dtype=np.int64) * span)
        dense = np.zeros(0, dtype=np.int64)
        if len(codes) and codes[0] >= 0 and codes[-1] < max(4 * len(codes), 1 << 20):
            dense = np.full(int(codes[-1]) + 1, -1, dtype=np.int64)
            dense[codes] = np.arange(len(codes))
        return cls(codes, keys, order, starts, t0, span, dense)

    def rank(self, entity: np.ndarray) -> np.ndarray:
        """Rank of each entity code; -1 where it has no event."""
        if len(self.codes) == 0:
            return np.full(len(entity), -1, dtype=np.int64)
        if len(self.dense):
            ok = (entity >= 0) & (entity < len(self.dense))
            return np.where(ok, self.dense[np.clip(entity, 0, len(self.dense) - 1)], -1)
        pos = np.minimum(np.searchsorted(self.codes, entity), len(self.codes) - 1)
        return np.where(self.codes[pos] == entity, pos, -1).astype(np.int64)

    def bounds(
        self, rank: np.ndarray, t: np.ndarray, side: _Side
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(start, stop)`` key positions of the entity's events with ``ts < t`` (``left``) or
        ``ts <= t`` (``right``); empty (0, 0) for rank -1."""
        known = rank >= 0
        r = np.where(known, rank, 0)
        off = np.clip(t - self.t0, -1, self.span - 1)
        stop = np.searchsorted(self.keys, r * self.span + off, side=side)
        start = self.starts[r]
        return np.where(known, start, 0), np.where(known, stop, 0)

    def ts_at(self, pos: np.ndarray) -> np.ndarray:
        """Timestamps (seconds) of the events at key positions ``pos`` (0 outside the keys)."""
        return _take(self.keys, pos) % self.span + self.t0


# --------------------------------------------------------------------------- items


def _primary_levels(value: object) -> list[str]:
    """Levels of an item's first non-empty category path (a plain name is one level)."""
    paths: list[object]
    if isinstance(value, str):
        paths = [value]
    elif isinstance(value, list | tuple | np.ndarray):
        paths = list(value)
    else:
        return []
    for path in paths:
        if isinstance(path, str):
            levels = [p.strip() for p in path.split(">") if p.strip()]
            if levels:
                return levels
    return []


def _category_ids(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 (leaf, parent, top) category ids per item, -1 where the item has no category."""
    n = len(items)
    levels = ([_primary_levels(v) for v in items["categories"].tolist()]
              if "categories" in items else [[] for _ in range(n)])
    known = [lv for lv in levels if lv]
    root = 0
    while known and all(len(lv) > root for lv in known) and \
            len({lv[root] for lv in known}) == 1:
        root += 1
    out = []
    for depth_of in (
        len,
        lambda lv: max(len(lv) - 1, min(root + 1, len(lv))),
        lambda lv: min(root + 1, len(lv)),
    ):
        names = [" > ".join(lv[: depth_of(lv)]) if lv else None for lv in levels]
        vocab = sorted({p for p in names if p is not None})
        index = {p: i for i, p in enumerate(vocab)}
        out.append(np.array([index[p] if p is not None else -1 for p in names], dtype=np.int64))
    return out[0], out[1], out[2]


def _price_features(items: pd.DataFrame, leaf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log1p(price)`` per item (NaN where missing) and ``lp - log1p(median of its leaf)``
    (catalog median for items without a leaf; 0 where the item has no price)."""
    n = len(items)
    if "price" not in items:
        return np.full(n, np.nan), np.zeros(n)
    price = pd.to_numeric(items["price"], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(price) & (price >= 0)
    price = np.where(ok, price, np.nan)
    lp = np.log1p(price)
    if not ok.any():
        return lp, np.zeros(n)
    median = np.full(n, np.nanmedian(price))
    priced = pd.Series(price[ok & (leaf >= 0)], index=leaf[ok & (leaf >= 0)])
    leaf_median = priced.groupby(level=0).median()
    has_leaf_median = np.isin(leaf, leaf_median.index.to_numpy()) & (leaf >= 0)
    median[has_leaf_median] = leaf_median.reindex(leaf[has_leaf_median]).to_numpy()
    rel = np.where(ok, lp - np.log1p(median), 0.0)
    return lp, rel


# --------------------------------------------------------------------------- fitted statistics


def _transition_counts(user: np.ndarray, gid: np.ndarray, item: np.ndarray,
                       n_items: int) -> sp.csr_matrix:
    """Counts of ``a -> b``: ``a`` in one of a user's timestamp groups, ``b`` in the next."""
    frame = pd.DataFrame({"u": user, "g": gid, "i": item})
    nxt = frame.assign(g=frame["g"] - 1)
    pairs = frame.merge(nxt, on=["u", "g"], suffixes=("_a", "_b"))
    data = np.ones(len(pairs), dtype=np.float64)
    mat = sp.csr_matrix((data, (pairs["i_a"].to_numpy(), pairs["i_b"].to_numpy())),
                        shape=(n_items, n_items))
    mat.sum_duplicates()
    return mat


def _cooccurrence_counts(user: np.ndarray, gid: np.ndarray, item: np.ndarray,
                         session: np.ndarray | None, n_items: int) -> sp.csr_matrix:
    """Number of users who have ``a != b`` at one timestamp or in one session."""
    frame = pd.DataFrame({"u": user, "c": gid, "i": item})
    blocks = [frame]
    if session is not None:
        has = session >= 0
        sess = pd.DataFrame({"u": user[has], "s": session[has], "i": item[has]})
        sess["c"] = sess.groupby(["u", "s"], sort=False).ngroup().to_numpy() + len(gid)
        blocks.append(sess[["u", "c", "i"]])
    pairs = []
    for block in blocks:
        p = block.merge(block[["c", "i"]], on="c", suffixes=("_a", "_b"))
        pairs.append(p.loc[p["i_a"] != p["i_b"], ["u", "i_a", "i_b"]])
    both = pd.concat(pairs, ignore_index=True).drop_duplicates()
    data = np.ones(len(both), dtype=np.float64)
    mat = sp.csr_matrix((data, (both["i_a"].to_numpy(), both["i_b"].to_numpy())),
                        shape=(n_items, n_items))
    mat.sum_duplicates()
    return mat


def _cosine(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int,
            neighbors: int) -> sp.csr_matrix:
    """``cos(a, b) = |U_a & U_b| / sqrt(|U_a| |U_b|)`` over binary user-item interactions (zero
    diagonal), pruned to each row's ``neighbors`` largest values."""
    binary = sp.csr_matrix((np.ones(len(user)), (user, item)), shape=(n_users, n_items))
    binary.sum_duplicates()
    binary.data[:] = 1.0
    co = sp.csr_matrix(binary.T @ binary)
    co.setdiag(0.0)
    co.eliminate_zeros()
    norms = np.sqrt(np.asarray(binary.sum(axis=0), dtype=np.float64).ravel())
    coo = co.tocoo()
    sim = sp.csr_matrix((coo.data / (norms[coo.row] * norms[coo.col]), (coo.row, coo.col)),
                        shape=co.shape)
    sim.sort_indices()
    return _keep_top(sim, neighbors)


def _session_leaf_transitions(
    user: np.ndarray, ts: np.ndarray, gid: np.ndarray, group_start: np.ndarray,
    item: np.ndarray, leaf: np.ndarray, gap: int,
) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """Sessions of the (user, ts)-sorted events and the leaf transitions between sessions.

    Returns the position of each event's session's first event, ``S`` (row-normalised counts of
    ``leaf(a) -> leaf(b)``, ``a`` in the last timestamp group of a session with weight
    ``1 / |group|`` and ``b`` in the same user's next session) and the share of each leaf among
    all such ``b``. Built from timestamps only: blind to the order of same-time events.
    """
    n_leaf = int(leaf.max()) + 1 if len(leaf) and leaf.max() >= 0 else 1
    n = len(user)
    if n == 0:
        return np.zeros(0, np.int64), sp.csr_matrix((n_leaf, n_leaf)), np.zeros(n_leaf)
    new_sess = np.ones(n, dtype=bool)
    new_sess[1:] = (user[1:] != user[:-1]) | (ts[1:] - ts[:-1] > gap)
    first = np.flatnonzero(new_sess)
    sess_first = first[np.cumsum(new_sess) - 1]
    end = np.r_[first[1:], n]
    follows = (first > 0) & (user[np.maximum(first - 1, 0)] == user[first])
    prev_last = first[follows] - 1
    ka, ev_a = _ranges(group_start[gid[prev_last]], prev_last + 1)
    kb, ev_b = _ranges(first[follows], end[follows])
    la, lb = leaf[item[ev_a]], leaf[item[ev_b]]
    a = pd.DataFrame({"k": ka[la >= 0], "la": la[la >= 0]})
    a["w"] = 1.0 / a.groupby("k")["la"].transform("size").to_numpy(dtype=np.float64)
    b = pd.DataFrame({"k": kb[lb >= 0], "lb": lb[lb >= 0]})
    pairs = a.merge(b, on="k")
    counts = sp.csr_matrix((pairs["w"].to_numpy(), (pairs["la"].to_numpy(),
                                                    pairs["lb"].to_numpy())),
                           shape=(n_leaf, n_leaf))
    counts.sum_duplicates()
    rowsum = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    inv = np.divide(1.0, rowsum, out=np.zeros(n_leaf), where=rowsum > 0)
    trans = sp.csr_matrix(sp.diags(inv) @ counts)
    trans.sort_indices()
    share = np.bincount(b["lb"].to_numpy(), minlength=n_leaf).astype(np.float64)
    return sess_first, trans, share / max(share.sum(), 1.0)


# --------------------------------------------------------------------------- the features


@dataclass
class BehaviourFeatures:
    """Fitted indexes of one history (see the module docstring for the time rules)."""

    n_users: int
    n_items: int
    history_len: int
    half_life: float
    users: _TimeIndex = field(repr=False)
    """User events sorted by (user, ts); ``users.order`` maps them to history rows."""
    ev_item: np.ndarray = field(repr=False)
    ev_gid: np.ndarray = field(repr=False)
    """Global id of the (user, timestamp) group of each sorted user event (ascending)."""
    group_start: np.ndarray = field(repr=False)
    ev_device: np.ndarray = field(repr=False)
    ev_location: np.ndarray = field(repr=False)
    item_times: _TimeIndex = field(repr=False)
    item_device: _TimeIndex = field(repr=False)
    item_location: _TimeIndex = field(repr=False)
    user_device: _TimeIndex = field(repr=False)
    user_location: _TimeIndex = field(repr=False)
    devices: list[str] = field(repr=False)
    locations: list[str] = field(repr=False)
    leaf: np.ndarray = field(repr=False)
    parent: np.ndarray = field(repr=False)
    top: np.ndarray = field(repr=False)
    brand: np.ndarray = field(repr=False)
    log_price: np.ndarray = field(repr=False)
    price_vs_leaf: np.ndarray = field(repr=False)
    trans: sp.csr_matrix = field(repr=False)
    cooc: sp.csr_matrix = field(repr=False)
    sim: sp.csr_matrix = field(repr=False)
    pop_all: np.ndarray = field(repr=False)
    session_gap_s: int = SESSION_GAP_S
    ev_sess_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    """Position (in the sorted user events) of the first event of each event's session."""
    leaf_trans: sp.csr_matrix = field(default_factory=lambda: sp.csr_matrix((1, 1)), repr=False)
    leaf_next_share: np.ndarray = field(default_factory=lambda: np.zeros(1), repr=False)
    attributes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """item column -> int64 value code per item (-1 = missing)."""
    nbr: NeighbourIndex | None = field(default=None, repr=False)
    """Neighbourhood profiles (None: no ``nbr_*`` features)."""

    @property
    def feature_names(self) -> tuple[str, ...]:
        """:data:`FEATURE_NAMES` plus the attribute-affinity features of the fitted columns and,
        with neighbours, the neighbourhood features
        (:data:`kgrank.features.neighbours.NEIGHBOUR_DOCS`)."""
        attrs = list(self.attributes)
        nbr = neighbour_feature_names(attrs) if self.nbr is not None else ()
        return FEATURE_NAMES + attribute_feature_names(attrs) + nbr

    @classmethod
    def fit(
        cls,
        history: pd.DataFrame,
        items: pd.DataFrame,
        n_users: int,
        n_items: int,
        history_len: int = 20,
        half_life: float = 2.0,
        attributes: Sequence[str] = (),
        session_gap_s: int = SESSION_GAP_S,
        neighbours: int = 0,
    ) -> BehaviourFeatures:
        """Index ``history`` (``user_idx``, ``item_idx``, ``timestamp`` [, ``device``,
        ``location``, ``session_id``]) and the items table (row ``i`` = item ``i``).

        ``attributes`` names categorical item columns (e.g. ``colour``) that get
        attribute-affinity features; ``session_gap_s`` splits a user's events into sessions;
        ``neighbours`` is the neighbourhood size of the ``nbr_*`` features (0: none; the demo
        uses :data:`kgrank.features.neighbours.NEIGHBOURS`)."""
        if len(items) != n_items:
            raise ValueError(f"items has {len(items)} rows, not n_items={n_items}")
        if history_len < 1 or half_life <= 0 or session_gap_s < 0 or neighbours < 0:
            raise ValueError("history_len must be >= 1, half_life > 0, session_gap_s >= 0 and "
                             "neighbours >= 0")
        missing = [c for c in attributes if c not in items.columns]
        if missing:
            raise ValueError(f"attribute columns {missing} are not in the items table "
                             f"(columns: {sorted(items.columns)})")
        user = history["user_idx"].to_numpy(dtype=np.int64)
        item = history["item_idx"].to_numpy(dtype=np.int64)
        if len(user) and (user.min() < 0 or user.max() >= n_users or item.min() < 0
                          or item.max() >= n_items):
            raise ValueError("history has user_idx / item_idx outside [0, n_users / n_items)")
        ts = to_seconds(history["timestamp"]) if len(history) else np.zeros(0, np.int64)
        t0 = int(ts.min()) if len(ts) else 0
        span = int(ts.max()) - t0 + 2 if len(ts) else 2

        users = _TimeIndex.build(user, ts, t0, span)
        o = users.order
        s_user, s_ts, s_item = user[o], ts[o], item[o]
        new_group = np.ones(len(s_user), dtype=bool)
        new_group[1:] = (s_user[1:] != s_user[:-1]) | (s_ts[1:] != s_ts[:-1])
        gid = np.cumsum(new_group) - 1
        group_start = np.flatnonzero(new_group)

        devices, locations = _vocab(history.get("device")), _vocab(history.get("location"))
        device = _codes(history.get("device"), devices) if devices else np.full(len(ts), -1)
        location = (_codes(history.get("location"), locations) if locations
                    else np.full(len(ts), -1))

        def pair_index(entity: np.ndarray, ctx: np.ndarray, n_ctx: int) -> _TimeIndex:
            has = ctx >= 0
            return _TimeIndex.build(entity[has] * max(n_ctx, 1) + ctx[has], ts[has], t0, span)

        session = None
        if "session_id" in history:
            session = _codes(history["session_id"], _vocab(history["session_id"]))[o]

        leaf, parent, top = _category_ids(items)
        brand = (_codes(items["brand"], _vocab(items["brand"])) if "brand" in items
                 else np.full(n_items, -1, dtype=np.int64))
        log_price, price_vs_leaf = _price_features(items, leaf)
        sess_first, leaf_trans, leaf_next = _session_leaf_transitions(
            s_user, s_ts, gid, group_start, s_item, leaf, session_gap_s)
        attr_codes = {str(c): _attribute_codes(items[c]) for c in attributes}
        nbr = None
        if neighbours > 0:
            codes = {"leaf": leaf, "parent": parent, "brand": brand,
                     **{f"attr_{c}": v for c, v in attr_codes.items()}}
            nbr = NeighbourIndex.fit(
                user, item, n_users, n_items, codes,
                ("leaf", "brand", *(f"attr_{c}" for c in attr_codes), "item"),
                np.where(np.isfinite(log_price), price_vs_leaf, np.nan), neighbours)
        return cls(
            n_users=n_users,
            n_items=n_items,
            history_len=int(history_len),
            half_life=float(half_life),
            users=users,
            ev_item=s_item,
            ev_gid=gid,
            group_start=group_start,
            ev_device=device[o],
            ev_location=location[o],
            item_times=_TimeIndex.build(item, ts, t0, span),
            item_device=pair_index(item, device, len(devices)),
            item_location=pair_index(item, location, len(locations)),
            user_device=pair_index(user, device, len(devices)),
            user_location=pair_index(user, location, len(locations)),
            devices=devices,
            locations=locations,
            leaf=leaf,
            parent=parent,
            top=top,
            brand=brand,
            log_price=log_price,
            price_vs_leaf=price_vs_leaf,
            trans=_row_normalise(_transition_counts(s_user, gid, s_item, n_items)),
            cooc=_row_normalise(_cooccurrence_counts(s_user, gid, s_item, session, n_items)),
            sim=_cosine(user, item, n_users, n_items, KNN_NEIGHBORS),
            pop_all=np.bincount(item, minlength=n_items).astype(np.float64),
            session_gap_s=int(session_gap_s),
            ev_sess_first=sess_first,
            leaf_trans=leaf_trans,
            leaf_next_share=leaf_next,
            attributes=attr_codes,
            nbr=nbr,
        )

    def cache_neighbours(self) -> None:
        """Find every user's neighbours from their whole fitted history once (serving: a
        request made after all of its user's events then reads them instead of scoring the
        user against everyone; the features are the same bits)."""
        if self.nbr is None:
            return
        idx = self.users
        owner, ev = _ranges(idx.starts[:-1], idx.starts[1:])
        self.nbr.cache_users(idx.codes, owner, self.ev_item[ev])

    def transform(self, requests: Requests, candidates: np.ndarray) -> dict[str, np.ndarray]:
        """Features of every (request, candidate): ``{name: float32 [R, C]}`` in
        :data:`FEATURE_NAMES` order (``candidates`` int64 ``[R, C]``, -1 = padding -> 0)."""
        cand = np.asarray(candidates, dtype=np.int64)
        if cand.ndim != 2 or cand.shape[0] != len(requests):
            raise ValueError(f"candidates must be [R={len(requests)}, C], got {cand.shape}")
        if cand.size and (cand.max() >= self.n_items or cand.min() < -1):
            raise ValueError(f"candidate ids must be in [-1, {self.n_items})")
        names = self.feature_names
        # one [F, R, C] block; each feature is a contiguous view of it (no per-feature copies)
        block = np.empty((len(names), *cand.shape), dtype=np.float32)
        width = cand.shape[1]
        for lo in range(0, len(requests), CHUNK):
            hi = min(lo + CHUNK, len(requests))
            # Candidates sorted within each request make the sorted-key lookups local.
            perm = np.argsort(cand[lo:hi], axis=1, kind="stable")
            sorted_cand = np.take_along_axis(cand[lo:hi], perm, axis=1)
            part = self._chunk(requests.take(np.arange(lo, hi)), sorted_cand)
            # every feature at once: [F, r, C] float64, padding / non-finite set to 0, then
            # gathered back into the caller's candidate order as float32
            values = np.stack([part[name].reshape(hi - lo, width) for name in names])
            np.copyto(values, 0.0, where=(sorted_cand < 0) | ~np.isfinite(values))
            back = np.empty_like(perm)  # position of each caller column in the sorted order
            np.put_along_axis(back, perm, np.arange(width)[None, :], axis=1)
            block[:, lo:hi] = np.take_along_axis(values, back[None], axis=2)
        return {name: block[j] for j, name in enumerate(names)}

    def _session_features(self, t: np.ndarray, start: np.ndarray, stop: np.ndarray,
                          has: np.ndarray, rf: np.ndarray, cand: np.ndarray
                          ) -> dict[str, np.ndarray]:
        """``sess_*`` features of the flattened pairs (``start`` / ``stop``: each request's
        slice of the sorted user events ``<= t``)."""
        nr = len(t)
        last = np.maximum(stop - 1, 0)
        in_sess = has & (t - self.users.ts_at(last) <= self.session_gap_s)
        first = np.where(in_sess, _take(self.ev_sess_first, last), 0)
        out = {"sess_events": np.where(in_sess, stop - first, 0).astype(np.float64)[rf]}
        # P: the latest group before the session (its last event is p_ev)
        p_ev = np.where(in_sess, first - 1, last)
        valid = has & (p_ev >= start)
        a_lo = _take(self.group_start, _take(self.ev_gid, np.maximum(p_ev, 0)))
        owner, ev = _ranges(np.where(valid, a_lo, 0), np.where(valid, p_ev + 1, 0))
        a_leaf = self.leaf[self.ev_item[ev]]
        owner, a_leaf = owner[a_leaf >= 0], a_leaf[a_leaf >= 0]
        n_a = np.bincount(owner, minlength=nr)
        k, col, prob = _expand_rows(self.leaf_trans, owner, a_leaf)
        n_leaf = self.leaf_trans.shape[1]
        keys, (sums,) = _segment_sums(owner[k] * n_leaf + col, [prob / n_a[owner[k]]])
        c_leaf = self.leaf[cand]
        trans = np.where(c_leaf >= 0, lookup(keys, sums, rf * n_leaf + np.maximum(c_leaf, 0),
                                               nr * n_leaf),
                         0.0)
        base = self.leaf_next_share[np.maximum(c_leaf, 0)]
        out["sess_prev_leaf_trans"] = trans
        out["sess_prev_leaf_lift"] = np.divide(trans, base, out=np.zeros(len(trans)),
                                               where=(base > 0) & (c_leaf >= 0))
        return out

    # ------------------------------------------------------------------- one chunk

    def _chunk(self, req: Requests, cand_2d: np.ndarray) -> dict[str, np.ndarray]:
        """Every feature as a float64 array over the flattened ``[R, C]`` pairs of one chunk
        (padding cells computed for item 0, masked by :meth:`transform`)."""
        nr, nc = cand_2d.shape
        f: dict[str, np.ndarray] = {}
        t = req.timestamp.astype(np.int64)
        user = req.user_idx.astype(np.int64)
        cand = np.maximum(cand_2d.ravel(), 0)
        rf = np.repeat(np.arange(nr, dtype=np.int64), nc)  # request of each flat pair
        tf = t[rf]

        def per_request(values: np.ndarray) -> np.ndarray:
            return np.asarray(values, dtype=np.float64)[rf]

        # ---- the user's events <= t, their groups and the considered history
        known = (user >= 0) & (user < self.n_users)
        urank = self.users.rank(np.where(known, user, -1))
        start, stop = self.users.bounds(urank, t, "right")
        n_ev = stop - start
        has = n_ev > 0
        last = np.maximum(stop - 1, 0)
        g_last = np.where(has, _take(self.ev_gid, last), 0)
        g_first = np.where(has, _take(self.ev_gid, start), 0)
        f["user_events"] = per_request(n_ev)
        f["user_groups"] = per_request(np.where(has, g_last - g_first + 1, 0))
        t_last, t_first = self.users.ts_at(last), self.users.ts_at(start)
        f["user_days_since_last"] = per_request(np.where(has, (t - t_last) / DAY, NO_EVENT_DAYS))
        f["user_days_since_first"] = per_request(np.where(has, (t - t_first) / DAY, NO_EVENT_DAYS))

        hist_lo = _take(self.group_start, np.maximum(g_last - self.history_len + 1, g_first))
        owner, ev = _ranges(np.where(has, hist_lo, 0), np.where(has, stop, 0))
        g = g_last[owner] - self.ev_gid[ev]
        w = np.power(0.5, g / self.half_life)
        hist_item = self.ev_item[ev]
        w_total = np.bincount(owner, weights=w, minlength=nr)
        latest = g == 0

        # ---- category / brand affinity and repeat signals
        for name, attr in (("cat_leaf", self.leaf), ("cat_parent", self.parent),
                           ("cat_top", self.top), ("brand", self.brand),
                           *((f"attr_{c}", codes) for c, codes in self.attributes.items())):
            a = attr[hist_item]
            ok = a >= 0
            size = int(attr.max()) + 1 if len(attr) and attr.max() >= 0 else 1
            keys, (w_sum, count) = _segment_sums(owner[ok] * size + a[ok],
                                                 [w[ok], np.ones(int(ok.sum()))])
            ca = attr[cand]
            q = rf * size + np.maximum(ca, 0)
            cok = ca >= 0
            f[f"{name}_share"] = np.where(
                cok, lookup(keys, w_sum, q, nr * size) / np.maximum(w_total[rf], 1e-12), 0.0)
            f[f"{name}_count"] = np.where(cok, lookup(keys, count, q, nr * size), 0.0)
            if name in ("cat_leaf", "brand"):
                in_last = np.unique(owner[ok & latest] * size + a[ok & latest])
                f[f"{name.removeprefix('cat_')}_in_last"] = np.where(
                    cok, lookup(in_last, np.ones(len(in_last)), q, nr * size), 0.0)
        qk, n_qk = rf * self.n_items + cand, nr * self.n_items  # (request, item) keys
        seen = np.unique(owner * self.n_items + hist_item)
        f["item_in_history"] = lookup(seen, np.ones(len(seen)), qk, n_qk)

        # ---- price
        lp = self.log_price[hist_item]
        ok = np.isfinite(lp)
        keys, (sw, swl, swl2) = _segment_sums(
            owner[ok], [w[ok], w[ok] * lp[ok], w[ok] * lp[ok] ** 2], sort_by=[lp[ok]])
        sw_r = _scatter(nr, keys, sw)
        mean = np.divide(_scatter(nr, keys, swl), sw_r, out=np.zeros(nr), where=sw_r > 0)
        sq = np.divide(_scatter(nr, keys, swl2), sw_r, out=np.zeros(nr), where=sw_r > 0)
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
        lpc = self.log_price[cand]
        cok = np.isfinite(lpc) & (sw_r[rf] > 0)
        f["price_z"] = np.where(cok, (np.nan_to_num(lpc) - mean[rf]) / (std[rf] + PRICE_EPS), 0.0)
        f["price_abs_z"] = np.abs(f["price_z"])
        f["price_vs_leaf"] = self.price_vs_leaf[cand]
        f["has_price"] = np.isfinite(lpc).astype(np.float64)
        rel = self.price_vs_leaf[hist_item]
        keys, (rw, rwv) = _segment_sums(owner[ok], [w[ok], w[ok] * rel[ok]], sort_by=[rel[ok]])
        rw_r = _scatter(nr, keys, rw)
        rel_mean = np.divide(_scatter(nr, keys, rwv), rw_r, out=np.zeros(nr), where=rw_r > 0)
        rok = np.isfinite(lpc) & (rw_r[rf] > 0)
        f["rel_price_gap"] = np.where(rok, self.price_vs_leaf[cand] - rel_mean[rf], 0.0)
        f["rel_price_abs_gap"] = np.abs(f["rel_price_gap"])

        # ---- item-to-item
        recent = g < TRANSITION_GROUPS
        o_r, g_r = owner[recent], g[recent]
        group_size = np.bincount(o_r * TRANSITION_GROUPS + g_r,
                                 minlength=nr * TRANSITION_GROUPS)[o_r * TRANSITION_GROUPS + g_r]
        k, col, p = _expand_rows(self.trans, o_r, hist_item[recent])
        contrib = p / group_size[k]
        at_latest = g_r[k] == 0
        keys, (s_last,) = _segment_sums(o_r[k][at_latest] * self.n_items + col[at_latest],
                                        [contrib[at_latest]])
        f["trans_last"] = lookup(keys, s_last, qk, n_qk)
        keys, (s_decay,) = _segment_sums(o_r[k] * self.n_items + col,
                                         [contrib * w[recent][k]], sort_by=[g_r[k]])
        f["trans_decay"] = lookup(keys, s_decay, qk, n_qk)

        k, col, p = _expand_rows(self.cooc, owner, hist_item)
        keys, (s_cooc,) = _segment_sums(owner[k] * self.n_items + col,
                                        [p * w[k] / w_total[owner[k]]])
        f["cooc_score"] = lookup(keys, s_cooc, qk, n_qk)

        k, col, p = _expand_rows(self.sim, owner, hist_item)
        keys, s_max = _segment_max(owner[k] * self.n_items + col, p)
        f["knn_max"] = lookup(keys, s_max, qk, n_qk)
        f.update(self._session_features(t, start, stop, has, rf, cand))
        if self.nbr is not None:  # the user's events <= t (not only the considered history)
            q_owner, q_ev = _ranges(np.where(has, start, 0), np.where(has, stop, 0))
            whole = has & (stop == _take(self.users.starts, np.maximum(urank, 0) + 1))
            f.update(self.nbr.features(np.where(known, user, -1), q_owner, self.ev_item[q_ev],
                                       rf, cand, list(self.attributes), cached=whole))

        # ---- request-time popularity (events strictly before t)
        irank = self.item_times.rank(cand)
        i_start, i_stop = self.item_times.bounds(irank, tf, "left")
        before = (i_stop - i_start).astype(np.float64)
        for days in POP_WINDOWS:
            _, w_start = self.item_times.bounds(irank, tf - days * DAY, "left")
            f[f"pop_{days}d"] = (i_stop - np.maximum(w_start, i_start)).astype(np.float64)
        f["pop_before"] = before
        t_item = self.item_times.ts_at(i_stop - 1)
        f["item_days_since_last"] = np.where(before > 0, (tf - t_item) / DAY, NO_EVENT_DAYS)
        f["pop_all"] = self.pop_all[cand]

        # ---- context x item / user
        dev, loc = _codes(req.device, self.devices), _codes(req.location, self.locations)
        for name, index, ctx, n_ctx in (
            ("ctx_item_device_share", self.item_device, dev, len(self.devices)),
            ("ctx_item_location_share", self.item_location, loc, len(self.locations)),
        ):
            code = cand * max(n_ctx, 1) + ctx[rf]
            rank = np.where(ctx[rf] >= 0, index.rank(code), -1)
            c_start, c_stop = index.bounds(rank, tf, "left")
            f[name] = np.divide((c_stop - c_start).astype(np.float64), before,
                                out=np.zeros(len(cand)), where=before > 0)
        for name, index, ctx, n_ctx in (
            ("ctx_user_device_share", self.user_device, dev, len(self.devices)),
            ("ctx_user_location_share", self.user_location, loc, len(self.locations)),
        ):
            code = np.where(known, user, 0) * max(n_ctx, 1) + ctx
            rank = np.where(known & (ctx >= 0), index.rank(code), -1)
            c_start, c_stop = index.bounds(rank, t, "right")
            share = np.divide((c_stop - c_start).astype(np.float64), n_ev.astype(np.float64),
                              out=np.zeros(nr), where=n_ev > 0)
            f[name] = per_request(share)
        return f
