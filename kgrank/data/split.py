"""Train / validation / test splits of a dataset's positive events.

Positive events (``SplitConfig.positive_events``) are de-duplicated per (user, item), keeping the
first occurrence: a repeat of something already in the history can never be a new target, and the
number of repeats removed is reported in :attr:`Split.stats` (nothing is dropped silently).

Events are ordered by timestamp with a *stable* sort, so events that share a timestamp keep the
source's order. The split uses that order only to stay comparable with published splits (the
S3-Rec / P5 leave-last-out protocol on Amazon 5-core); models must treat equal timestamps as
unordered, and the evaluator reports "same-time" targets (timestamp equal to the user's latest
history event) apart from the rest.

Every target row carries ``same_time``; the history of a part is ``train`` for validation and
``train + valid`` for test (the test history includes the validation item).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from kgrank.config import SplitConfig
from kgrank.data.dataset import Dataset

Part = Literal["valid", "test"]


@dataclass
class Split:
    """Positive events in three parts, each a DataFrame with ``user_idx``, ``item_idx``,
    ``timestamp``, ``event``, ``weight``, the dataset's context columns and ``event_row`` (the
    row of the event in ``dataset.interactions``)."""

    dataset: Dataset
    method: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.dataset.n_users

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    def history(self, part: Part) -> pd.DataFrame:
        """Events a model may learn from when it is evaluated on ``part``."""
        if part == "valid":
            return self.train
        return pd.concat([self.train, self.valid], ignore_index=True)

    def targets(self, part: Part) -> pd.DataFrame:
        return self.valid if part == "valid" else self.test


def positive_events(dataset: Dataset, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Positive events in stable time order, de-duplicated per (user, item)."""
    inter = dataset.interactions.assign(event_row=np.arange(len(dataset.interactions)))
    keep = inter["event"].isin(cfg.positive_events)
    if cfg.min_rating is not None:
        keep &= (inter["event"] != "rating") | (inter["weight"] >= cfg.min_rating)
    pos = inter[keep].sort_values("timestamp", kind="stable")
    dedup = pos.drop_duplicates(["user_idx", "item_idx"], keep="first")
    stats = {
        "events": len(inter),
        "positive_events": len(pos),
        "repeats_removed": len(pos) - len(dedup),
    }
    return dedup.reset_index(drop=True), stats


def _mark_same_time(history: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    last = history.groupby("user_idx")["timestamp"].max()
    prev = targets["user_idx"].map(last)
    targets = targets.copy()
    targets["same_time"] = (prev == targets["timestamp"]).fillna(False).astype(bool).to_numpy()
    return targets


def _leave_last_out(pos: pd.DataFrame) -> np.ndarray:
    from_end = pos.groupby("user_idx").cumcount(ascending=False).to_numpy()
    count = pos.groupby("user_idx")["user_idx"].transform("size").to_numpy()
    part = np.full(len(pos), "train", dtype=object)
    part[from_end == 0] = "test"
    part[(from_end == 1) & (count >= 3)] = "valid"
    part[(from_end == 0) & (count == 1)] = "train"
    return part


def _time_cut(pos: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    if cfg.valid_start is None or cfg.test_start is None:
        raise ValueError("split.method=time_cut needs split.valid_start and split.test_start")
    valid_start = pd.Timestamp(cfg.valid_start, tz="UTC")
    test_start = pd.Timestamp(cfg.test_start, tz="UTC")
    if valid_start > test_start:
        raise ValueError("split.valid_start must not be after split.test_start")
    ts = pos["timestamp"]
    part = np.full(len(pos), "train", dtype=object)
    part[(ts >= valid_start).to_numpy()] = "valid"
    part[(ts >= test_start).to_numpy()] = "test"
    return part


def _random(pos: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    u = np.random.default_rng(cfg.seed).random(len(pos))
    part = np.full(len(pos), "train", dtype=object)
    part[u < cfg.valid_ratio + cfg.test_ratio] = "valid"
    part[u < cfg.test_ratio] = "test"
    return part


def _predefined(pos: pd.DataFrame, cfg: SplitConfig, dataset: Dataset) -> np.ndarray:
    if "split" not in pos:
        raise ValueError(f"{dataset.root}: split.method=predefined needs a `split` column")
    part = pos["split"].to_numpy(dtype=object).copy()
    if not (part == "valid").any() and cfg.valid_ratio > 0:
        # Hold out a seeded share of each user's training events (users with >= 2 of them).
        train = np.flatnonzero(part == "train")
        rng = np.random.default_rng(cfg.seed)
        order = train[rng.permutation(len(train))]
        users = pos["user_idx"].to_numpy()[order]
        rank = pd.Series(users).groupby(users).cumcount().to_numpy()
        size = pd.Series(users).groupby(users).transform("size").to_numpy()
        n_hold = np.where(size >= 2, np.maximum(1, np.round(size * cfg.valid_ratio)), 0)
        part[order[rank < n_hold]] = "valid"
    return part


def make_split(dataset: Dataset, cfg: SplitConfig) -> Split:
    """Split a dataset's positive events according to ``cfg`` (deterministic given the seed)."""
    pos, stats = positive_events(dataset, cfg)
    if len(pos) == 0:
        raise ValueError(f"{dataset.root}: no positive events ({cfg.positive_events}) to split")
    if cfg.method == "leave_last_out":
        part = _leave_last_out(pos)
    elif cfg.method == "time_cut":
        part = _time_cut(pos, cfg)
    elif cfg.method == "random":
        part = _random(pos, cfg)
    else:
        part = _predefined(pos, cfg, dataset)
    train = pos[part == "train"].reset_index(drop=True)
    valid = _mark_same_time(train, pos[part == "valid"].reset_index(drop=True))
    test = _mark_same_time(
        pd.concat([train, valid], ignore_index=True), pos[part == "test"].reset_index(drop=True)
    )
    stats.update(train=len(train), valid=len(valid), test=len(test))
    stats["test_same_time"] = int(test["same_time"].sum())
    return Split(dataset, cfg.method, train, valid, test, stats)
