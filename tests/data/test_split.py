from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kgrank.config import SplitConfig
from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.split import make_split


def _ds(tmp_path: Path, rows: list[tuple[str, str, int]], **extra: list[object]) -> Dataset:
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], unit="D", utc=True)
    for key, values in extra.items():
        inter[key] = values
    items = pd.DataFrame({"item_id": sorted(set(inter["item_id"]))})
    return write_dataset(tmp_path / "ds", items, inter)


def test_leave_last_out_keeps_source_order_within_a_timestamp(tmp_path: Path) -> None:
    # u1 buys a, b on day 1 then c, d on day 3 (file order c before d); u2 has only two events.
    ds = _ds(tmp_path, [("u1", "a", 1), ("u1", "b", 1), ("u1", "d", 3), ("u1", "c", 3),
                        ("u2", "a", 1), ("u2", "b", 2), ("u3", "c", 5)])
    split = make_split(ds, SplitConfig())
    item = dict(zip(ds.items["item_id"], range(ds.n_items), strict=True))
    test = split.test.set_index("user_idx")["item_idx"].to_dict()
    valid = split.valid.set_index("user_idx")["item_idx"].to_dict()
    assert test[0] == item["c"] and valid[0] == item["d"]  # last in file order among ties
    assert bool(split.test.set_index("user_idx").loc[0, "same_time"]) is True
    assert 1 not in valid and test[1] == item["b"]  # two events: train + test
    assert 2 not in test and 2 not in valid  # one event: train only
    assert bool(split.test.set_index("user_idx").loc[1, "same_time"]) is False
    assert split.stats["train"] + split.stats["valid"] + split.stats["test"] == 7


def test_history_of_test_includes_validation(tmp_path: Path) -> None:
    ds = _ds(tmp_path, [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3)])
    split = make_split(ds, SplitConfig())
    assert len(split.history("valid")) == 1
    assert set(split.history("test")["item_idx"]) == set(ds.item_index(["a", "b"]))


def test_positive_filter_and_repeats_reported(tmp_path: Path) -> None:
    ds = _ds(tmp_path, [("u1", "a", 1), ("u1", "a", 2), ("u1", "b", 3), ("u1", "c", 4),
                        ("u1", "d", 5)], event=["click", "purchase", "view", "click", "click"])
    split = make_split(ds, SplitConfig(positive_events=["click", "purchase"]))
    assert split.stats["positive_events"] == 4 and split.stats["repeats_removed"] == 1
    all_items = pd.concat([split.train, split.valid, split.test])["item_idx"]
    assert set(all_items) == set(ds.item_index(["a", "c", "d"]))


def test_time_cut_and_random_and_predefined(tmp_path: Path) -> None:
    rows = [(f"u{u}", f"i{i}", 10 * u + i) for u in range(5) for i in range(6)]
    ds = _ds(tmp_path, rows, split=["test" if i == 5 else "train" for u in range(5)
                                    for i in range(6)])
    cut = make_split(ds, SplitConfig(method="time_cut", valid_start="1970-01-21",
                                     test_start="1970-01-31"))
    assert (cut.train["timestamp"] < pd.Timestamp("1970-01-21", tz="UTC")).all()
    assert (cut.test["timestamp"] >= pd.Timestamp("1970-01-31", tz="UTC")).all()
    r1 = make_split(ds, SplitConfig(method="random", seed=3))
    r2 = make_split(ds, SplitConfig(method="random", seed=3))
    pd.testing.assert_frame_equal(r1.test, r2.test)
    pre = make_split(ds, SplitConfig(method="predefined", valid_ratio=0.2))
    assert len(pre.test) == 5 and (pre.test["item_idx"] == ds.item_index(["i5"])[0]).all()
    # 5 train events per user, 20% held out for validation -> one per user, never a test item
    assert pre.valid.groupby("user_idx").size().tolist() == [1] * 5
    assert not set(zip(pre.valid.user_idx, pre.valid.item_idx, strict=True)) & set(
        zip(pre.train.user_idx, pre.train.item_idx, strict=True))


def test_split_is_deterministic_and_disjoint(seq_dataset: Dataset) -> None:
    a = make_split(seq_dataset, SplitConfig())
    b = make_split(seq_dataset, SplitConfig())
    pd.testing.assert_frame_equal(a.test, b.test)
    keys = [set(zip(p.user_idx, p.item_idx, strict=True)) for p in (a.train, a.valid, a.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # every validation/test target is later than or equal to all of that user's training events
    last_train = a.train.groupby("user_idx")["timestamp"].max()
    assert (a.test["timestamp"].to_numpy() >= last_train.reindex(a.test.user_idx).to_numpy()).all()


def test_time_cut_requires_dates(seq_dataset: Dataset) -> None:
    with pytest.raises(ValueError, match="valid_start"):
        make_split(seq_dataset, SplitConfig(method="time_cut"))
