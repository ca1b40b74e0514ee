"""Generic tabular import: interactions (plus optional items / users) from CSV or Parquet files.

Source format:

- Files ending in ``.csv`` (comma-separated) or ``.tsv`` / ``.tab`` (tab-separated) with a header
  line, UTF-8 (a BOM is allowed), standard double-quote quoting; an empty field is a missing value.
  Or Parquet files (``.parquet`` / ``.pq``), whose column types are used as they are.
- ``src`` is the interactions file; ``items`` and ``users`` are optional catalog / user files.
- ``mapping`` maps a target ``"table.column"`` (``"interactions.user_id"``, ``"items.title"``, ...)
  to the source column holding it. Target columns that are not mapped are taken from a source
  column of the same name; other source columns are kept as free attribute columns (strings when
  they come from a CSV).
- Timestamps: numbers are epoch times in ``timestamp_unit`` (``s``, ``ms``, ``us`` or ``ns``);
  strings are ISO 8601 (no offset = UTC). The first value decides which of the two a CSV column
  holds. Parquet timestamp columns are used as they are (naive = UTC).
- ``categories`` from a CSV: category paths separated by ``|``, levels by `` > ``
  (``Beauty > Makeup|Sale``); Parquet may give a list of strings instead.
- Without an items file the items table is the distinct item ids of the interactions, in order of
  first appearance.

Every problem raises :class:`DatasetError` naming the source file, the 0-based data row (the header
line is not counted, nor are blank lines) and the SOURCE column name.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import (
    EVENTS,
    INTERACTIONS,
    ITEMS,
    MAX_TIME,
    MIN_TIME,
    USERS,
    DatasetError,
    Table,
    read_parquet_file,
)

TABLES: dict[str, Table] = {"interactions": INTERACTIONS, "items": ITEMS, "users": USERS}
NS_PER_UNIT: dict[str, int] = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
TIME_UNITS = tuple(NS_PER_UNIT)
ALLOWED: dict[str, tuple[str, ...]] = {"event": EVENTS, "split": ("train", "valid", "test")}


@dataclass
class Source:
    """One source table with its columns renamed to target names.

    ``origin`` maps each target column name to the source column it came from (for errors).
    """

    path: Path
    table: Table
    df: pd.DataFrame
    origin: dict[str, str]
    from_csv: bool

    def error(self, message: str, column: str, row: int | None = None) -> DatasetError:
        return DatasetError(self.path, message, row=row, column=self.origin.get(column, column))


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_csv(path: Path, delimiter: str = ",") -> pd.DataFrame:
    """Read a UTF-8 CSV into object columns (None for empty fields), strictly.

    Invalid UTF-8 names the data row and the column whose field holds the bad bytes; a record with
    the wrong number of fields names its row.
    """
    data = path.read_bytes()
    if not data:
        raise DatasetError(path, "empty file (0 bytes), expected a header line")
    try:
        text, bad_utf8 = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad_utf8 = data.decode("utf-8", errors="surrogateescape"), True
    text = text.removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records: list[list[str]] = []
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetError(path, "no header line")
        if bad_utf8:
            for j, name in enumerate(header):
                if _has_surrogate(name):
                    raise DatasetError(path, "header is not valid UTF-8", column=f"#{j}")
        for j, name in enumerate(header):
            if name == "":
                raise DatasetError(path, f"header field {j} is empty", column=f"#{j}")
            if header.count(name) > 1:
                raise DatasetError(path, "duplicate column name", column=name)
        for rec in reader:
            if not rec:
                continue  # blank line
            row = len(records)
            if bad_utf8:
                for j, value in enumerate(rec):
                    if _has_surrogate(value):
                        column = header[j] if j < len(header) else f"#{j}"
                        raise DatasetError(path, "value is not valid UTF-8", row=row, column=column)
            if len(rec) != len(header):
                raise DatasetError(
                    path, f"expected {len(header)} fields, found {len(rec)}", row=row
                )
            records.append(rec)
    except csv.Error as exc:
        raise DatasetError(
            path, f"CSV syntax error: {exc}", row=len(records) if header is not None else None
        ) from None
    assert header is not None
    columns = list(zip(*records, strict=True)) if records else [() for _ in header]
    return pd.DataFrame({
        name: pd.Series([v if v != "" else None for v in col], dtype=object)
        for name, col in zip(header, columns, strict=True)
    })


def read_parquet(path: Path) -> pd.DataFrame:
    return read_parquet_file(path).to_pandas()


def read_source(path: Path) -> tuple[pd.DataFrame, bool]:
    """Read a CSV / TSV / Parquet file; returns (DataFrame, came from a CSV)."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, ","), True
    if suffix in (".tsv", ".tab"):
        return read_csv(path, "\t"), True
    if suffix in (".parquet", ".pq"):
        return read_parquet(path), False
    raise DatasetError(path, "unsupported file type (expected .csv, .tsv, .tab or .parquet)")


def split_mapping(
    mapping: Mapping[str, str] | None, present: set[str]
) -> dict[str, dict[str, str]]:
    """``{"items.title": "name"}`` -> ``{"items": {"title": "name"}}``; bad keys -> ValueError."""
    out: dict[str, dict[str, str]] = {name: {} for name in TABLES}
    for key, value in (mapping or {}).items():
        table, dot, column = key.partition(".")
        if not dot or table not in TABLES or not column:
            raise ValueError(
                f"mapping key {key!r} must be 'table.column' with table one of {', '.join(TABLES)}"
            )
        if table not in present:
            raise ValueError(f"mapping key {key!r} given but there is no {table} file")
        if not isinstance(value, str) or not value:
            raise ValueError(f"mapping[{key!r}] must be a source column name, got {value!r}")
        out[table][column] = value
    return out


def apply_mapping(
    raw: pd.DataFrame, path: Path, table: Table, mapping: dict[str, str], from_csv: bool
) -> Source:
    """Rename mapped source columns to their targets; keep the other columns by name."""
    for target, src_col in mapping.items():
        if src_col not in raw.columns:
            raise DatasetError(
                path, f"mapped column not found (mapping '{table.name}.{target}' -> '{src_col}'; "
                f"the file has {', '.join(map(str, raw.columns))})", column=src_col,
            )
    cols: dict[str, pd.Series] = {}
    origin: dict[str, str] = {}
    for target, src_col in mapping.items():
        cols[target] = raw[src_col]
        origin[target] = src_col
    used = set(mapping.values())
    for name in raw.columns:
        if name in used and mapping.get(name) != name:
            continue
        if name in cols and origin[name] != name:
            raise DatasetError(
                path, f"column clashes with mapping '{table.name}.{name}' -> '{origin[name]}' "
                "(map this column to another name)", column=name,
            )
        cols[name] = raw[name]
        origin[name] = name
    df = pd.DataFrame(cols, index=raw.index) if cols else pd.DataFrame(index=raw.index)
    return Source(path, table, df.reset_index(drop=True), origin, from_csv)


def parse_timestamps(values: pd.Series, unit: str, src: Source, column: str) -> pd.Series:
    """Numbers (epoch in ``unit``) or ISO 8601 strings -> UTC timestamps, checked to 1970..2100."""
    missing = _first(values.isna().to_numpy())
    if missing is not None:
        raise src.error("missing timestamp", column, missing)
    if pd.api.types.is_datetime64_any_dtype(values):
        ts = pd.to_datetime(values, utc=True)
    elif pd.api.types.is_bool_dtype(values):
        raise src.error("boolean column, expected a timestamp", column)
    else:
        first = values.iat[0] if len(values) else None
        numeric = pd.api.types.is_numeric_dtype(values)
        if not numeric and first is not None:
            numeric = _is_number(first)
        if numeric:
            num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            limit = MAX_TIME.value / NS_PER_UNIT[unit]
            bad = _first(~np.isfinite(num) | (num < 0) | (num >= limit))
            if bad is not None:
                raise src.error(
                    f"{values.iat[bad]!r} is not an epoch time in unit '{unit}' within 1970..2100",
                    column, bad,
                )
            ts = pd.to_datetime(
                pd.Series(num, index=values.index), unit=unit, utc=True  # type: ignore[call-overload]
            )
        else:
            strings = values.astype(str)
            ts = pd.to_datetime(strings, format="ISO8601", utc=True, errors="coerce")
            bad = _first(ts.isna().to_numpy())
            if bad is not None:
                raise src.error(f"{values.iat[bad]!r} is not an ISO 8601 timestamp", column, bad)
    out_of_range = _first(((ts < MIN_TIME) | (ts >= MAX_TIME)).to_numpy())
    if out_of_range is not None:
        raise src.error(f"timestamp {values.iat[out_of_range]!s} is outside 1970..2100", column,
                        out_of_range)
    return ts


def _as_strings(values: pd.Series) -> pd.Series:
    def conv(v: object) -> object:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, bytes):
            return v.decode("utf-8", errors="replace")
        return str(v)

    return values.map(conv).astype(object)


def _as_categories(values: pd.Series) -> pd.Series:
    def conv(v: object) -> list[str]:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return []
        if isinstance(v, list | tuple | np.ndarray):
            return [str(x) for x in v if x is not None]
        return [p.strip() for p in str(v).split("|") if p.strip()]

    return values.map(conv).astype(object)


def coerce(src: Source, timestamp_unit: str) -> pd.DataFrame:
    """Check and convert the schema columns of a source table; extras are kept as they are."""
    df = src.df
    for col in src.table.columns:
        if col.name not in df.columns:
            if col.required:
                raise DatasetError(
                    src.path, f"required column {src.table.name}.{col.name} is missing (map it "
                    f"with mapping['{src.table.name}.{col.name}'])", column=col.name,
                )
            continue
        values = df[col.name]
        if col.kind == "timestamp":
            df[col.name] = parse_timestamps(values, timestamp_unit, src, col.name)
            continue
        if col.kind == "string":
            values = _as_strings(values)
        elif col.kind == "string_list":
            values = _as_categories(values)
        elif col.kind in ("float", "int"):
            num = pd.to_numeric(values, errors="coerce")
            arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
            present = values.notna().to_numpy()
            bad = present & ~np.isfinite(arr)
            if col.kind == "int" or col.name == "price":
                bad |= present & np.isfinite(arr) & (arr < 0)
            if col.kind == "int":
                bad |= present & np.isfinite(arr) & (arr != np.round(arr))
            row = _first(bad)
            if row is not None:
                want = "a non-negative integer" if col.kind == "int" else (
                    "a finite number >= 0" if col.name == "price" else "a finite number")
                raise src.error(f"{values.iat[row]!r} is not {want}", col.name, row)
            if col.kind == "int":
                values = pd.Series(pd.array([None if np.isnan(a) else int(a) for a in arr],
                                            dtype="Int64"))
            else:
                values = pd.Series(arr, dtype=np.float64)
        if not col.nullable:
            row = _first(values.isna().to_numpy())
            if row is not None:
                raise src.error("missing value in a required column", col.name, row)
        if col.name in ALLOWED:
            allowed = ALLOWED[col.name]
            row = _first(values.notna().to_numpy() & ~values.isin(allowed).to_numpy())
            if row is not None:
                raise src.error(f"{values.iat[row]!r} is not one of {', '.join(allowed)}",
                                col.name, row)
        df[col.name] = values
    return df


def _check_unique(src: Source, key: str) -> None:
    row = _first(src.df[key].duplicated().to_numpy())
    if row is not None:
        raise src.error(f"duplicate id {src.df[key].iat[row]!r}", key, row)


def _check_known(src: Source, key: str, known: pd.Series, other: Path) -> None:
    row = _first(~src.df[key].isin(pd.Index(known)).to_numpy())
    if row is not None:
        raise src.error(f"id {src.df[key].iat[row]!r} is not in {other.name}", key, row)


def import_tabular(
    src: Path,
    dst: Path,
    *,
    items: Path | None = None,
    users: Path | None = None,
    mapping: dict[str, str] | None = None,
    timestamp_unit: str = "s",
    overwrite: bool = False,
) -> Dataset:
    """Import interactions (and optional items / users) from CSV / Parquet with a column mapping."""
    src, dst = Path(src), Path(dst)
    items_path = Path(items) if items is not None else None
    users_path = Path(users) if users is not None else None
    if timestamp_unit not in TIME_UNITS:
        raise ValueError(f"timestamp_unit must be one of {', '.join(TIME_UNITS)}, "
                         f"got {timestamp_unit!r}")
    present = {"interactions"} | ({"items"} if items_path else set()) | (
        {"users"} if users_path else set())
    maps = split_mapping(mapping, present)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")

    def load(path: Path, name: str) -> Source:
        raw, from_csv = read_source(path)
        source = apply_mapping(raw, path, TABLES[name], maps[name], from_csv)
        source.df = coerce(source, timestamp_unit)
        return source

    inter = load(src, "interactions")
    notes: list[str] = []
    if items_path is not None:
        item_src = load(items_path, "items")
        _check_unique(item_src, "item_id")
        _check_known(inter, "item_id", item_src.df["item_id"], items_path)
        items_df = item_src.df
        notes.append(f"items: `{items_path.name}` ({len(items_df):,} rows, file order).")
    else:
        if len(inter.df) == 0:
            raise DatasetError(src, "no data rows (and no items file to make a catalog from)")
        items_df = pd.DataFrame({"item_id": pd.unique(inter.df["item_id"])}).astype(object)
        notes.append(f"items: no items file, so the {len(items_df):,} distinct item ids of the "
                     "interactions (order of first appearance), without attributes.")
    users_df = None
    if users_path is not None:
        user_src = load(users_path, "users")
        _check_unique(user_src, "user_id")
        _check_known(inter, "user_id", user_src.df["user_id"], users_path)
        users_df = user_src.df
        notes.append(f"users: `{users_path.name}` ({len(users_df):,} rows, file order).")
    else:
        notes.append("users: no users file (users are the distinct user ids of the "
                     "interactions).")
    renamed = {f"{t}.{c}": s for t, m in maps.items() for c, s in m.items() if c != s}
    ts_origin = inter.origin.get("timestamp", "timestamp")
    readme = "\n".join([
        "# Tabular import",
        "",
        f"Imported by kgrank (`import_tabular`) from `{src}`.",
        "",
        "## Transformation",
        f"- interactions: `{src.name}` in file order ({len(inter.df):,} rows); timestamps from "
        f"column `{ts_origin}` (numbers = epoch in unit '{timestamp_unit}', strings = ISO 8601, "
        "no offset = UTC); event defaults to `purchase` and weight to 1 when absent.",
        *[f"- {n}" for n in notes],
        "- column mapping: " + (", ".join(f"{k} <- `{v}`" for k, v in sorted(renamed.items()))
                                if renamed else "none (columns taken by name)") + ".",
        "- other source columns are kept as attribute columns"
        + (" (as strings from CSV)." if inter.from_csv else "."),
        "",
        "## Caveats",
        "- Nothing is dropped or deduplicated: duplicate events in the source stay duplicated.",
        "",
    ])
    return write_dataset(
        dst, items_df, inter.df, users=users_df, overwrite=overwrite, readme=readme
    )
