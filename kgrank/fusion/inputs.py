"""The user tower's request inputs: history windows, context ids, cached query vectors.

Shared by training (:mod:`kgrank.fusion.train`) and serving, which must not import training code.
See :mod:`kgrank.fusion.train` for the history-window conventions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kgrank.features.context import ContextVocab, time_features
from kgrank.features.requests import Requests, to_seconds
from kgrank.fusion.model import UserBatch, gap_bucket

QueryEncoder = Callable[[Sequence[str | None]], np.ndarray]
"""Texts -> float32 [n, query_dim] embeddings in the item-text encoder's space."""


# ---------------------------------------------------------------------------------- histories


class EventIndex:
    """A history's events sorted by ``(user, timestamp, item)``, one row per (user, item) (the
    earliest), for vectorised window look-ups."""

    def __init__(self, history: pd.DataFrame) -> None:
        users = history["user_idx"].to_numpy(dtype=np.int64)
        items = history["item_idx"].to_numpy(dtype=np.int64)
        times = to_seconds(history["timestamp"]) if len(history) else np.zeros(0, np.int64)
        order = np.lexsort((items, times, users))
        users, items, times = users[order], items[order], times[order]
        # the earliest event of each (user, item): after a stable sort by (user, item)
        pair = np.lexsort((times, items, users))
        first = np.ones(len(pair), dtype=bool)
        first[1:] = (users[pair][1:] != users[pair][:-1]) | (items[pair][1:] != items[pair][:-1])
        keep = np.sort(pair[first])
        self.users, self.items, self.times = users[keep], items[keep], times[keep]
        self.t0 = int(self.times.min()) if len(self.times) else 0
        self.span = (int(self.times.max()) - self.t0 + 3) if len(self.times) else 3
        self.keys = self._key(self.users, self.times)

    def _key(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        rel = np.clip(np.asarray(times, np.int64) - self.t0, -1, self.span - 2) + 1
        return np.asarray(users, np.int64) * self.span + rel

    def position(self, users: np.ndarray, times: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Position of each event ``(user, time, item)`` in the sorted arrays (-1: absent)."""
        if not len(self.keys):
            return np.full(len(users), -1, np.int64)
        lo = np.searchsorted(self.keys, self._key(users, times), side="left")
        hi = np.searchsorted(self.keys, self._key(users, times), side="right")
        # within the (user, time) group [lo, hi) the items are sorted: search each group
        out = np.full(len(users), -1, np.int64)
        items = np.asarray(items, np.int64)
        for width in np.unique(hi - lo):
            rows = np.flatnonzero(hi - lo == width)
            if width == 0:
                continue
            group = lo[rows, None] + np.arange(width)[None, :]
            hit = self.items[group] == items[rows, None]
            found = hit.any(1)
            out[rows[found]] = group[found, hit[found].argmax(1)]
        return out

    def bounds(
        self, users: np.ndarray, times: np.ndarray, strict: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(first, end) positions of each request's history: the user's events before ``t``
        (``strict``) or at or before ``t``. Unknown users (-1) get an empty range."""
        users = np.asarray(users, np.int64)
        lo = np.searchsorted(self.keys, users * self.span, side="left")
        hi = np.searchsorted(self.keys, self._key(users, times), side="left" if strict else "right")
        hi = np.where(users < 0, lo, hi)
        return lo, hi


@dataclass
class RequestFeatures:
    """Everything the user tower needs of some requests, as arrays; :meth:`batch` makes
    tensors of a subset."""

    users: np.ndarray
    times: np.ndarray
    context: np.ndarray  # int64 [R, 2]
    time: np.ndarray  # float32 [R, 4]
    query_row: np.ndarray  # int64 [R] into query_table; 0 = no query
    query_table: torch.Tensor  # float32 [Q + 1, query_dim], row 0 zeros
    first: np.ndarray
    end: np.ndarray
    index: EventIndex
    history_len: int
    exclude: np.ndarray | None = None
    """Per request, a position of ``index`` to leave out of its window (its own event)."""

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray, device: torch.device) -> UserBatch:
        n_hist = self.history_len
        end = self.end[rows]
        slots = n_hist if self.exclude is None else n_hist + 1
        pos = end[:, None] - slots + np.arange(slots)[None, :]
        mask = pos >= self.first[rows][:, None]
        if self.exclude is not None:  # one extra slot: the request's own event is left out
            mask &= pos != self.exclude[rows][:, None]
            mask[mask.sum(1) > n_hist, 0] = False
        pos = np.where(mask, pos, 0)
        if len(self.index.items):
            items = self.index.items[pos]
            gaps = self.times[rows][:, None] - self.index.times[pos]
        else:
            items = np.zeros_like(pos)
            gaps = np.zeros_like(pos)
        qrow = torch.from_numpy(self.query_row[rows])

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return UserBatch(
            users=t(self.users[rows]), hist_items=t(items), hist_mask=t(mask),
            hist_gap=gap_bucket(np.where(mask, gaps, 0)).to(device), context=t(self.context[rows]),
            time=t(self.time[rows]), query=self.query_table[qrow].to(device),
            has_query=(qrow > 0).to(device),
        )


class QueryCache:
    """Query text -> embedding, encoding each distinct string once."""

    def __init__(self, encode: QueryEncoder | None, dim: int) -> None:
        self.encode = encode
        self.dim = dim
        self.texts: list[str] = []
        self.rows: dict[str, int] = {}
        self.vectors = np.zeros((0, dim), np.float32)

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32).reshape(len(texts), self.dim)
        for text in texts:
            self.rows[text] = len(self.texts)
            self.texts.append(text)
        self.vectors = np.concatenate([self.vectors, vectors])

    def lookup(self, queries: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(rows [R] with 0 = no query, table [Q + 1, dim]) for an object array of str / None:
        row 0 of the table is zeros, the others the vectors of the distinct queries asked for
        (only those: copying the whole cache per serving batch cost ~0.5 ms on the demo)."""
        if self.dim == 0:
            return np.zeros(len(queries), np.int64), torch.zeros(1, 0)
        new = sorted({q for q in queries if q is not None and q not in self.rows})
        if new:
            if self.encode is None:
                raise ValueError(f"{len(new)} queries are not cached and no encode_query is set")
            vectors = np.asarray(self.encode(new), dtype=np.float32)
            if vectors.shape != (len(new), self.dim) or not np.isfinite(vectors).all():
                raise ValueError(f"encode_query returned {vectors.shape} (or non-finite values) "
                                 f"for {len(new)} queries; expected dim {self.dim}")
            self.add(new, vectors)
        cached = np.array([-1 if q is None else self.rows[q] for q in queries], np.int64)
        used, rows = np.unique(cached, return_inverse=True)  # -1 (no query) sorts first
        rows = rows.reshape(-1).astype(np.int64) + (0 if len(used) and used[0] == -1 else 1)
        table = np.zeros((1 + int((used >= 0).sum()), self.dim), np.float32)
        table[1:] = self.vectors[used[used >= 0]]
        return rows, torch.from_numpy(table)


def request_features(
    requests: Requests,
    index: EventIndex,
    vocab: ContextVocab,
    queries: QueryCache,
    history_len: int,
    strict: bool,
    exclude_own: bool = False,
) -> RequestFeatures:
    """The user-tower inputs of ``requests`` over the history in ``index``: events before the
    request time (``strict``) or at or before it; with ``exclude_own`` (training requests, not
    ``strict``) the request's own event ``(user, time, target)`` is left out."""
    first, end = index.bounds(requests.user_idx, requests.timestamp, strict)
    exclude = None
    if exclude_own:
        if strict or requests.target is None:
            raise ValueError("exclude_own needs targets and a non-strict history")
        exclude = index.position(requests.user_idx, requests.timestamp, requests.target)
    first = np.maximum(first, end - history_len - (exclude is not None))
    rows, table = queries.lookup(requests.query)
    return RequestFeatures(
        users=np.asarray(requests.user_idx, np.int64), times=np.asarray(requests.timestamp,
                                                                         np.int64),
        context=vocab.ids(requests), time=time_features(requests.timestamp), query_row=rows,
        query_table=table, first=first, end=end, index=index, history_len=history_len,
        exclude=exclude,
    )
