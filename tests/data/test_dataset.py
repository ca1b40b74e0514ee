"""Tests for kgrank.data.dataset: round trip, id mapping, a corpus of bad inputs, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kgrank.cli import main
from kgrank.data.dataset import load_dataset, write_dataset
from kgrank.data.schema import DatasetError

UTC = "UTC"


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def _tables() -> dict[str, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "item_id": ["i-a", "i-b", "i-c"],
            "title": ["Alpha", "Beta", "Gamma"],
            "categories": [["Beauty > Skin Care > Face", "Sale"], [], ["Beauty > Hair"]],
            "brand": ["Acme", None, "Zeta"],
            "price": [9.5, None, 0.0],
            "image": ["img/a.jpg", None, "img/c.jpg"],
        }
    )
    users = pd.DataFrame({"user_id": ["u-x", "u-y"], "age": [31.0, None], "region": ["N", "S"]})
    interactions = pd.DataFrame(
        {
            "user_id": ["u-y", "u-x", "u-y", "u-x", "u-y"],
            "item_id": ["i-c", "i-a", "i-b", "i-c", "i-c"],
            # Berlin is UTC+1 in January: 10:00 local is 09:00 UTC.
            "timestamp": pd.to_datetime(
                [
                    "2024-01-01 10:00",
                    "2024-01-02 10:00",
                    "2024-01-03 10:00",
                    "2024-01-04 10:00",
                    "2024-01-05 10:00",
                ]
            ).tz_localize("Europe/Berlin"),
            "event": ["view", "click", "cart", "purchase", "rating"],
            "weight": [1.0, 1.0, 2.0, 1.0, 4.5],
            "query": ["red lipstick", None, "shampoo", None, None],
            "device": ["mobile", "desktop", "app", "mobile", None],
            "location": ["Berlin", None, "Paris", "Berlin", "Rome"],
        }
    )
    triples = pd.DataFrame(
        {
            "head": ["i-a", "i-b", "i-c", "i-a"],
            "relation": ["brand", "also_bought", "brand", "category"],
            "tail": ["Acme", "i-a", "Zeta", "Face"],
        }
    )
    return {"items": items, "users": users, "interactions": interactions, "triples": triples}


def test_round_trip(tmp_path: Path) -> None:
    t = _tables()
    written = write_dataset(
        tmp_path / "shop", t["items"], t["interactions"], users=t["users"], triples=t["triples"],
        files={"img/a.jpg": b"\x89PNG-a", "img/c.jpg": b"\x89PNG-c"},
    )
    ds = load_dataset(tmp_path / "shop")
    assert ds.fingerprint == written.fingerprint
    assert (tmp_path / "shop" / "img" / "a.jpg").read_bytes() == b"\x89PNG-a"

    # Contiguous ids: item i is row i of items, user u is row u of users.
    assert ds.n_items == 3 and ds.n_users == 2
    assert ds.items["item_id"].tolist() == ["i-a", "i-b", "i-c"]
    assert ds.items.index.tolist() == [0, 1, 2]
    assert ds.users["user_id"].tolist() == ["u-x", "u-y"]
    assert ds.users.index.tolist() == [0, 1]
    assert ds.item_index(["i-c", "i-a"]).tolist() == [2, 0]
    assert ds.user_index(["u-y"]).tolist() == [1]
    with pytest.raises(ValueError, match="i-zzz"):
        ds.item_index(["i-a", "i-zzz"])

    inter = ds.interactions
    assert inter["user_id"].tolist() == t["interactions"]["user_id"].tolist()  # file order kept
    assert inter["user_idx"].tolist() == [1, 0, 1, 0, 1]
    assert inter["item_idx"].tolist() == [2, 0, 1, 2, 2]
    assert inter["user_idx"].dtype == np.int64 and inter["item_idx"].dtype == np.int64
    assert (ds.users["user_id"].to_numpy()[inter["user_idx"]] == inter["user_id"].to_numpy()).all()
    assert (ds.items["item_id"].to_numpy()[inter["item_idx"]] == inter["item_id"].to_numpy()).all()

    # Timestamps come back tz-aware UTC, the same instants.
    assert str(inter["timestamp"].dt.tz) == UTC
    assert inter["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 09:00", tz=UTC)
    assert list(inter["timestamp"]) == list(t["interactions"]["timestamp"])

    # Values: lists, nulls, weights, context columns.
    assert list(ds.items["categories"].iloc[0]) == ["Beauty > Skin Care > Face", "Sale"]
    assert list(ds.items["categories"].iloc[1]) == []
    assert ds.items["price"].iloc[0] == 9.5 and np.isnan(ds.items["price"].iloc[1])
    assert pd.isna(ds.items["brand"].iloc[1])
    assert inter["event"].tolist() == ["view", "click", "cart", "purchase", "rating"]
    assert inter["weight"].tolist() == [1.0, 1.0, 2.0, 1.0, 4.5]
    assert inter["query"].iloc[0] == "red lipstick" and pd.isna(inter["query"].iloc[1])
    assert inter["device"].iloc[2] == "app"
    assert inter["location"].iloc[4] == "Rome"
    assert ds.users["age"].iloc[0] == 31.0
    assert ds.triples is not None and len(ds.triples) == 4
    assert ds.triples["tail"].tolist() == ["Acme", "i-a", "Zeta", "Face"]

    # Fingerprint: stable across loads and copies, changed by a one-title edit.
    assert load_dataset(tmp_path / "shop").fingerprint == ds.fingerprint
    copy = write_dataset(tmp_path / "copy", t["items"], t["interactions"], users=t["users"],
                         triples=t["triples"])
    assert copy.fingerprint == ds.fingerprint
    edited = t["items"].copy()
    edited.loc[1, "title"] = "Beta 2"
    other = write_dataset(tmp_path / "edited", edited, t["interactions"], users=t["users"],
                          triples=t["triples"])
    assert other.fingerprint != ds.fingerprint
    assert load_dataset(tmp_path / "edited").fingerprint == other.fingerprint

    s = ds.summary()
    assert s["name"] == "shop"
    assert s["users"] == 2 and s["items"] == 3 and s["interactions"] == 5 and s["triples"] == 4
    assert s["events"] == {"view": 1, "click": 1, "cart": 1, "purchase": 1, "rating": 1}
    assert s["density"] == pytest.approx(5 / 6)
    assert s["items_with_image"] == 2
    assert pd.Timestamp(s["first"]) == pd.Timestamp("2024-01-01 09:00", tz=UTC)
    assert pd.Timestamp(s["last"]) == pd.Timestamp("2024-01-05 09:00", tz=UTC)
    assert s["fingerprint"] == ds.fingerprint
    json.dumps(s)  # the CLI prints it as JSON


def test_defaults_and_naive_timestamps(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": ["a", "b"]})
    inter = pd.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["b", "a"],
         "timestamp": pd.to_datetime(["2020-05-01 12:00", "2020-05-02 12:00"])}
    )
    ds = write_dataset(tmp_path / "d", items, inter)
    assert ds.interactions["event"].tolist() == ["purchase", "purchase"]
    assert ds.interactions["weight"].tolist() == [1.0, 1.0]
    assert ds.interactions["timestamp"].iloc[0] == pd.Timestamp("2020-05-01 12:00", tz=UTC)
    assert ds.triples is None and ds.summary()["triples"] == 0


def test_users_from_interactions_in_order_of_first_appearance(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "c"]})
    inter = pd.DataFrame(
        {
            "user_id": ["u3", "u1", "u3", "u2", "u1", "u9"],
            "item_id": ["a", "b", "c", "a", "c", "b"],
            "timestamp": pd.date_range("2023-03-01", periods=6, freq="D", tz=UTC),
        }
    )
    write_dataset(tmp_path / "d", items, inter)
    assert not (tmp_path / "d" / "users.parquet").exists()
    ds = load_dataset(tmp_path / "d")
    assert ds.users["user_id"].tolist() == ["u3", "u1", "u2", "u9"]
    assert ds.n_users == 4
    assert ds.interactions["user_idx"].tolist() == [0, 1, 0, 2, 1, 3]
    assert ds.interactions["item_idx"].tolist() == [0, 1, 2, 0, 2, 1]


# --------------------------------------------------------------------------------------------
# Bad-input corpus: directories written by hand, never through write_dataset
# --------------------------------------------------------------------------------------------


def _good_frames() -> dict[str, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(6)],
            "title": [f"Item {k}" for k in range(6)],
            "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "image": [f"img/{k}.jpg" for k in range(6)],
        }
    )
    users = pd.DataFrame({"user_id": ["u0", "u1", "u2", "u3"]})
    interactions = pd.DataFrame(
        {
            "user_id": ["u0", "u1", "u2", "u3", "u0", "u1", "u2"],
            "item_id": ["i0", "i1", "i2", "i3", "i4", "i5", "i0"],
            "timestamp": pd.date_range("2022-06-01", periods=7, freq="D", tz=UTC),
            "event": ["view", "click", "cart", "purchase", "click", "purchase", "view"],
            "weight": [1.0] * 7,
        }
    )
    return {"items": items, "users": users, "interactions": interactions}


Content = pd.DataFrame | pa.Table | bytes
Mutation = Callable[[dict[str, pd.DataFrame]], dict[str, Content]]


def _write_raw(root: Path, tables: dict[str, Content]) -> None:
    root.mkdir()
    for name, content in tables.items():
        path = root / f"{name}.parquet"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            table = content if isinstance(content, pa.Table) else pa.Table.from_pandas(
                content, preserve_index=False
            )
            pq.write_table(table, path)


def _set(table: str, column: str, row: int, value: object) -> Mutation:
    def mutate(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
        df = f[table].astype({column: object})
        df.loc[row, column] = value
        return {**f, table: df}

    return mutate


def _missing_item_id(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
    return {**f, "interactions": f["interactions"].drop(columns=["item_id"])}


def _price_as_string(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
    return {**f, "items": f["items"].assign(price=[str(p) for p in f["items"]["price"]])}


def _timestamp(row: int, value: str | None) -> Mutation:
    def mutate(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
        inter = f["interactions"].copy()
        stamps = list(inter["timestamp"])
        stamps[row] = pd.NaT if value is None else pd.Timestamp(value, tz=UTC)
        inter["timestamp"] = pd.Series(stamps, dtype="datetime64[ns, UTC]")
        return {**f, "interactions": inter}

    return mutate


def _weight(row: int, value: float) -> Mutation:
    def mutate(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
        inter = f["interactions"].copy()
        w = inter["weight"].to_numpy(copy=True)
        w[row] = value
        # Built as an Arrow array so that NaN stays a float NaN and does not become a null.
        table = pa.Table.from_pandas(inter.drop(columns=["weight"]), preserve_index=False)
        table = table.append_column("weight", pa.array(w, type=pa.float64(), from_pandas=False))
        return {**f, "interactions": table}

    return mutate


def _file_bytes(name: str, content: bytes) -> Mutation:
    def mutate(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
        return {**f, name: content}

    return mutate


def _title_not_utf8(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
    titles = [t.encode() for t in f["items"]["title"]]
    titles[3] = b"\xff\xfe"
    table = pa.Table.from_pandas(f["items"].drop(columns=["title"]), preserve_index=False)
    table = table.append_column("title", pa.array(titles, type=pa.binary()))
    return {**f, "items": table}


def _without_users(mutation: Mutation) -> Mutation:
    def mutate(f: dict[str, pd.DataFrame]) -> dict[str, Content]:
        out = mutation(f)
        out.pop("users")
        return out

    return mutate


# (id, mutation, file, row, column)
BAD_CASES: list[tuple[str, Mutation, str, int | None, str | None]] = [
    ("missing-required-column", _missing_item_id, "interactions.parquet", None, "item_id"),
    ("price-as-string", _price_as_string, "items.parquet", None, "price"),
    ("duplicate-item-id", _set("items", "item_id", 4, "i1"), "items.parquet", 4, "item_id"),
    ("unknown-item", _set("interactions", "item_id", 5, "i-nope"), "interactions.parquet", 5,
     "item_id"),
    ("unknown-item-no-users", _without_users(_set("interactions", "item_id", 2, "x")),
     "interactions.parquet", 2, "item_id"),
    ("nat-timestamp", _timestamp(3, None), "interactions.parquet", 3, "timestamp"),
    ("timestamp-2200", _timestamp(4, "2200-01-01"), "interactions.parquet", 4, "timestamp"),
    ("timestamp-1900", _timestamp(2, "1900-06-01"), "interactions.parquet", 2, "timestamp"),
    ("unknown-event", _set("interactions", "event", 6, "buy"), "interactions.parquet", 6, "event"),
    ("infinite-weight", _weight(2, np.inf), "interactions.parquet", 2, "weight"),
    ("nan-weight", _weight(5, np.nan), "interactions.parquet", 5, "weight"),
    ("negative-price", _set("items", "price", 3, -0.5), "items.parquet", 3, "price"),
    ("empty-items-file", _file_bytes("items", b""), "items.parquet", None, None),
    ("garbage-interactions-file",
     _file_bytes("interactions", b"user_id,item_id\nu0,i0\n" * 20), "interactions.parquet",
     None, None),
    ("title-not-utf8", _title_not_utf8, "items.parquet", 3, "title"),
    ("absolute-image-path", _set("items", "image", 2, "/etc/passwd"), "items.parquet", 2, "image"),
    ("image-path-escapes", _set("items", "image", 5, "img/../../secret.jpg"), "items.parquet", 5,
     "image"),
    ("duplicate-user-id", _set("users", "user_id", 3, "u0"), "users.parquet", 3, "user_id"),
    ("unknown-user", _set("interactions", "user_id", 4, "u-ghost"), "interactions.parquet", 4,
     "user_id"),
]


def _bad_dataset(root: Path, mutation: Mutation) -> Path:
    _write_raw(root, mutation(_good_frames()))
    return root


def test_corpus_base_is_valid(tmp_path: Path) -> None:
    """The unmutated corpus dataset loads, so each case fails only for its own defect."""
    ds = load_dataset(_bad_dataset(tmp_path / "good", lambda f: dict(f)))
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (4, 6, 7)
    ds = load_dataset(_bad_dataset(tmp_path / "good2", _without_users(lambda f: dict(f))))
    assert ds.n_users == 4


def _check_error_line(stderr: str, file: str, row: int | None, column: str | None) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("error:")
    assert file in line
    if row is not None:
        assert f"row {row}" in line
    else:
        assert ", row " not in line
    if column is not None:
        assert f"column '{column}'" in line
    return line


@pytest.mark.parametrize(
    ("mutation", "file", "row", "column"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutation: Mutation,
    file: str,
    row: int | None,
    column: str | None,
) -> None:
    root = _bad_dataset(tmp_path / "bad", mutation)
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    err = info.value
    assert Path(err.file).name == file
    assert (err.row, err.column) == (row, column), str(err)
    assert str(err).startswith(err.file)

    capsys.readouterr()
    assert main(["data", "stats", str(root)]) == 2
    out, stderr = capsys.readouterr()
    assert out == ""
    _check_error_line(stderr, file, row, column)


@pytest.mark.parametrize("case", ["title-not-utf8", "garbage-interactions-file"])
def test_bad_input_console_script(tmp_path: Path, case: str) -> None:
    _, mutation, file, row, column = next(c for c in BAD_CASES if c[0] == case)
    root = _bad_dataset(tmp_path / "bad", mutation)
    script = Path(sys.executable).with_name("kgrank")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    proc = subprocess.run(
        [str(script), "data", "stats", str(root)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    _check_error_line(proc.stderr, file, row, column)


def test_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "nowhere")
    assert info.value.row is None and info.value.column is None
    assert main(["data", "stats", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error:")


# --------------------------------------------------------------------------------------------
# write_dataset atomicity
# --------------------------------------------------------------------------------------------


def _small() -> tuple[pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
    inter = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1"],
            "item_id": ["a", "b", "c"],
            "timestamp": pd.date_range("2021-01-01", periods=3, freq="D", tz=UTC),
        }
    )
    return items, inter


def test_write_invalid_leaves_nothing(tmp_path: Path) -> None:
    items, inter = _small()
    inter.loc[2, "item_id"] = "zzz"
    parent = tmp_path / "parent"
    with pytest.raises(DatasetError) as info:
        write_dataset(parent / "ds", items, inter)
    assert Path(info.value.file).name == "interactions.parquet"
    assert (info.value.row, info.value.column) == (2, "item_id")
    assert not (parent / "ds").exists()
    assert sorted(p.name for p in parent.iterdir()) == []  # no temp dirs (".ds.tmp-...") left


def test_write_invalid_extra_file_leaves_nothing(tmp_path: Path) -> None:
    items, inter = _small()
    items["image"] = ["../outside.jpg", None, None]
    with pytest.raises(DatasetError, match="image"):
        write_dataset(tmp_path / "ds", items, inter, files={"img/a.jpg": b"x"})
    assert list(tmp_path.iterdir()) == []


def test_write_existing_without_overwrite(tmp_path: Path) -> None:
    items, inter = _small()
    first = write_dataset(tmp_path / "ds", items, inter)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    items2 = items.assign(title=["X", "Y", "Z"])
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "ds", items2, inter)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert load_dataset(tmp_path / "ds").fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_write_overwrite_replaces(tmp_path: Path) -> None:
    items, inter = _small()
    first = write_dataset(tmp_path / "ds", items, inter, files={"old.txt": b"old"})
    items2 = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"]})
    second = write_dataset(tmp_path / "ds", items2, inter, overwrite=True)
    assert second.fingerprint != first.fingerprint
    ds = load_dataset(tmp_path / "ds")
    assert ds.n_items == 4 and ds.fingerprint == second.fingerprint
    assert not (tmp_path / "ds" / "old.txt").exists()  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no ".ds.old-*" or temp left


def test_write_overwrite_with_invalid_keeps_old(tmp_path: Path) -> None:
    items, inter = _small()
    first = write_dataset(tmp_path / "ds", items, inter)
    bad = inter.assign(event=["view", "teleport", "view"])
    with pytest.raises(DatasetError) as info:
        write_dataset(tmp_path / "ds", items, bad, overwrite=True)
    assert (info.value.row, info.value.column) == (1, "event")
    assert load_dataset(tmp_path / "ds").fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
