"""Context features of a request: cyclic time of day and weekday, device, location, demographics.

Categorical values get ids from a :class:`ContextVocab` fitted on training events; id 0 is
"unknown" (missing or never seen in training), so the serving path can take any value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kgrank.features.requests import Requests

TIME_FEATURES = ("hour_sin", "hour_cos", "weekday_sin", "weekday_cos")
CATEGORICAL_CONTEXT = ("device", "location")


def _vocab(values: pd.Series | None) -> list[str]:
    if values is None:
        return []
    return sorted({v for v in values.dropna().tolist() if isinstance(v, str) and v.strip()})


@dataclass
class ContextVocab:
    """Device and location names seen in training; their ids are 1.. in sorted order."""

    devices: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, events: pd.DataFrame) -> ContextVocab:
        return cls(_vocab(events.get("device")), _vocab(events.get("location")))

    @property
    def sizes(self) -> tuple[int, int]:
        """Embedding table sizes (known values + the unknown id 0)."""
        return len(self.devices) + 1, len(self.locations) + 1

    def ids(self, requests: Requests) -> np.ndarray:
        """int64 [R, 2]: (device id, location id); 0 for missing or unseen values."""
        dev = {d: i + 1 for i, d in enumerate(self.devices)}
        loc = {c: i + 1 for i, c in enumerate(self.locations)}
        out = np.zeros((len(requests), 2), dtype=np.int64)
        out[:, 0] = [dev.get(d, 0) if d is not None else 0 for d in requests.device]
        out[:, 1] = [loc.get(c, 0) if c is not None else 0 for c in requests.location]
        return out

    def to_json(self) -> dict[str, list[str]]:
        return {"devices": self.devices, "locations": self.locations}

    @classmethod
    def from_json(cls, data: dict[str, list[str]]) -> ContextVocab:
        return cls(list(data["devices"]), list(data["locations"]))


def time_features(timestamps: np.ndarray) -> np.ndarray:
    """float32 [R, 4]: sin/cos of the UTC hour of day (with minutes) and of the weekday."""
    ts = np.asarray(timestamps, dtype=np.int64)
    hour = (ts % 86400) / 3600.0
    weekday = ((ts // 86400) + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    a = 2 * np.pi * hour / 24.0
    b = 2 * np.pi * weekday / 7.0
    return np.stack([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1).astype(np.float32)


@dataclass
class Demographics:
    """Per-user static features from the users table: numeric columns standardised, string
    columns as category ids (0 = missing)."""

    numeric: np.ndarray  # float32 [n_users, n_num]
    categorical: np.ndarray  # int64 [n_users, n_cat]
    numeric_names: list[str]
    categorical_names: list[str]
    cardinalities: list[int]

    @classmethod
    def from_users(cls, users: pd.DataFrame, max_categories: int = 1000) -> Demographics:
        """Use every users column except ``user_id`` (string columns with at most
        ``max_categories`` values become categorical; others are skipped)."""
        num_cols, cat_cols, nums, cats, cards = [], [], [], [], []
        for col in users.columns:
            if col == "user_id":
                continue
            s = users[col]
            if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                v = s.to_numpy(dtype=np.float64)
                ok = np.isfinite(v)
                mean = v[ok].mean() if ok.any() else 0.0
                std = v[ok].std() if ok.sum() > 1 else 1.0
                nums.append(np.where(ok, (v - mean) / (std or 1.0), 0.0))
                num_cols.append(col)
            else:
                values = _vocab(s.astype("string"))
                if not values or len(values) > max_categories:
                    continue
                ids = {v: i + 1 for i, v in enumerate(values)}
                cats.append(np.array([ids.get(v, 0) if isinstance(v, str) else 0
                                      for v in s.astype(object).tolist()], dtype=np.int64))
                cat_cols.append(col)
                cards.append(len(values) + 1)
        n = len(users)
        numeric = np.stack(nums, 1).astype(np.float32) if nums else np.zeros((n, 0), np.float32)
        categorical = np.stack(cats, 1) if cats else np.zeros((n, 0), np.int64)
        return cls(numeric, categorical, num_cols, cat_cols, cards)
