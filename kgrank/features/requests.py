"""Ranking requests: who asks, when, on which device, where, and with which query.

A request is what the search endpoint receives and what offline evaluation replays: for a target
event of a split part, its user, timestamp and context columns (the query, device and location
are known when the request is made; the target item is not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CONTEXT_COLUMNS = ("device", "location", "query")


def to_seconds(timestamps: pd.Series | np.ndarray) -> np.ndarray:
    """UTC timestamps (tz-aware or naive datetimes) -> int64 seconds since the epoch."""
    ts = pd.to_datetime(pd.Series(np.asarray(timestamps)), utc=True)
    return (ts.astype("datetime64[ns, UTC]").astype("int64") // 1_000_000_000).to_numpy()


def _strings(values: pd.Series | None, n: int) -> np.ndarray:
    """Object array of str or None (missing values and blanks become None)."""
    out = np.full(n, None, dtype=object)
    if values is None:
        return out
    for i, v in enumerate(values.tolist()):
        if isinstance(v, str) and v.strip():
            out[i] = v
    return out


@dataclass
class Requests:
    """One ranking request per row (all arrays have the same length)."""

    user_idx: np.ndarray
    """int64 user ids; -1 for a user the model has never seen (cold start)."""
    timestamp: np.ndarray
    """int64 seconds since the epoch (UTC) of the request."""
    device: np.ndarray
    """object array: device name or None."""
    location: np.ndarray
    """object array: location / region name or None."""
    query: np.ndarray
    """object array: search query or None (browsing, no query)."""
    target: np.ndarray | None = None
    """int64 item id of the logged positive (training / evaluation only), else None."""

    def __len__(self) -> int:
        return len(self.user_idx)

    def __post_init__(self) -> None:
        n = len(self.user_idx)
        for name in ("timestamp", "device", "location", "query"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Requests.{name} has {len(getattr(self, name))} rows, not {n}")
        if self.target is not None and len(self.target) != n:
            raise ValueError(f"Requests.target has {len(self.target)} rows, not {n}")

    def take(self, rows: np.ndarray) -> Requests:
        """The requests at the given row positions."""
        return Requests(
            self.user_idx[rows], self.timestamp[rows], self.device[rows], self.location[rows],
            self.query[rows], None if self.target is None else self.target[rows],
        )

    @property
    def has_query(self) -> np.ndarray:
        return np.array([q is not None for q in self.query], dtype=bool)

    @classmethod
    def from_events(cls, events: pd.DataFrame) -> Requests:
        """One request per event row (``user_idx``, ``timestamp``, optional context columns and
        ``item_idx`` as the target)."""
        n = len(events)
        return cls(
            user_idx=events["user_idx"].to_numpy(dtype=np.int64),
            timestamp=to_seconds(events["timestamp"]),
            device=_strings(events.get("device"), n),
            location=_strings(events.get("location"), n),
            query=_strings(events.get("query"), n),
            target=events["item_idx"].to_numpy(dtype=np.int64) if "item_idx" in events else None,
        )


def requests_for_targets(targets: pd.DataFrame) -> Requests:
    """One request per user with targets: the user's earliest target event (ties: first row).

    The evaluator ranks once per user, so a user whose part holds several targets (time-cut
    splits) is asked once, at the time and in the context of their first target.
    """
    first = targets.sort_values(["timestamp"], kind="stable").drop_duplicates("user_idx")
    return Requests.from_events(first.sort_values("user_idx", kind="stable"))
