"""Each request's own history: the user's events up to the request time, recency-weighted.

For request ``r`` of user ``u`` at time ``t_r`` the history is the user's events with timestamp
``<= t_r`` (events at the request time count, as the split puts them in the history; events after
it never do). Events are grouped by timestamp; with ``G_r`` distinct timestamps in that history
and ``o(e)`` the 0-based ordinal of event ``e``'s timestamp among them, the event is
``g = G_r - 1 - o(e)`` groups from the end and weighs

    w_re = 0.5 ** (g / half_life)        for g < max_groups, else 0.

Events sharing a timestamp share ``g`` and their weight, so nothing depends on their order in the
source (or on item ids). Repeated items add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kgrank.features.requests import Requests, to_seconds


@dataclass
class RequestHistory:
    """Per-request history events as parallel arrays (``row`` = request index)."""

    row: np.ndarray  # int64 [M] request of each history event
    item: np.ndarray  # int64 [M]
    timestamp: np.ndarray  # int64 [M] seconds
    groups_from_end: np.ndarray  # int64 [M] g above
    n_requests: int

    def matrix(self, n_items: int, half_life: float, max_groups: int | None = None,
               normalize: bool = True) -> sp.csr_matrix:
        """``W [R, n_items]`` of recency weights (rows sum to 1 when ``normalize``).

        Built as CSR arrays directly (a serving batch has a few requests, where scipy's
        COO conversion, duplicate summing and diagonal product cost more than the work)."""
        keep = np.ones(len(self.row), dtype=bool) if max_groups is None else (
            self.groups_from_end < max_groups)
        w = np.power(0.5, self.groups_from_end[keep] / half_life).astype(np.float32)
        row, item = self.row[keep], self.item[keep]
        order = np.lexsort((item, row))  # by request, then item (repeats side by side)
        row, item, w = row[order], item[order], w[order]
        first = np.ones(len(row), dtype=bool)
        first[1:] = (row[1:] != row[:-1]) | (item[1:] != item[:-1])
        starts = np.flatnonzero(first)
        data = np.add.reduceat(w, starts) if len(w) else w  # a repeated item adds up
        row, item = row[starts], item[starts]
        if normalize:
            sums = np.bincount(row, weights=data, minlength=self.n_requests).astype(np.float32)
            data = data / sums[row]  # a row with entries has a positive sum
        indptr = np.zeros(self.n_requests + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=self.n_requests), out=indptr[1:])
        return sp.csr_matrix((data.astype(np.float32), item, indptr),
                             shape=(self.n_requests, n_items))

    def last_group(self, n_items: int) -> sp.csr_matrix:
        """Uniform weights over the items of each request's latest timestamp group."""
        return self.matrix(n_items, half_life=1.0, max_groups=1)

    def counts(self) -> np.ndarray:
        """Number of history events per request."""
        return np.bincount(self.row, minlength=self.n_requests)


def request_history(requests: Requests, history: pd.DataFrame) -> RequestHistory:
    """Gather every request's history events (vectorised: no loop over requests)."""
    h_user = history["user_idx"].to_numpy(dtype=np.int64)
    h_ts = to_seconds(history["timestamp"]) if len(history) else np.zeros(0, np.int64)
    h_item = history["item_idx"].to_numpy(dtype=np.int64)
    order = np.lexsort((h_ts, h_user))
    h_user, h_ts, h_item = h_user[order], h_ts[order], h_item[order]
    # ordinal of each event's timestamp among the user's distinct timestamps
    new_user = np.ones(len(h_user), dtype=bool)
    new_user[1:] = h_user[1:] != h_user[:-1]
    new_group = new_user.copy()
    new_group[1:] |= h_ts[1:] != h_ts[:-1]
    group_id = np.cumsum(new_group) - 1  # global group counter
    user_first_group = np.maximum.accumulate(np.where(new_user, group_id, 0))
    ordinal = group_id - user_first_group
    r_user = np.asarray(requests.user_idx, dtype=np.int64)
    r_ts = np.asarray(requests.timestamp, dtype=np.int64)
    # one sorted key per event: (user, time) packed into an int64, so one searchsorted finds
    # the end of each request's slice (times relative to the earliest, < 2**32 s)
    t0 = min(h_ts.min(initial=0), r_ts.min(initial=0))
    h_key = (h_user << 32) | (h_ts - t0)
    start = np.searchsorted(h_user, r_user, side="left")
    end = np.searchsorted(h_key, (r_user << 32) | (r_ts - t0), side="right")
    lengths = end - start
    rows = np.repeat(np.arange(len(r_user)), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    idx = np.arange(int(lengths.sum())) - np.repeat(offsets, lengths) + np.repeat(start, lengths)
    n_groups = np.zeros(len(r_user), dtype=np.int64)
    has = lengths > 0
    n_groups[has] = ordinal[end[has] - 1] + 1
    g = n_groups[rows] - 1 - ordinal[idx]
    return RequestHistory(rows.astype(np.int64), h_item[idx], h_ts[idx], g.astype(np.int64),
                          len(r_user))
