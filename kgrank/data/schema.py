"""The kgrank dataset format: a directory of Parquet tables, and its validation.

A dataset directory holds ``items.parquet`` and ``interactions.parquet`` (required), and
``users.parquet`` and ``triples.parquet`` (optional), plus any files the tables point to (product
images). Every column is described in :data:`TABLES`; ``kgrank data schema`` prints it and the
README carries the same table.

Validation is strict and names the problem exactly: a :class:`DatasetError` carries the file, the
0-based data row and the column. Nothing is dropped silently: a bad row stops the load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

EVENTS: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
"""Allowed values of ``interactions.event``, weakest to strongest intent (``rating`` is explicit)."""

MIN_TIME = pd.Timestamp("1970-01-01", tz="UTC")
MAX_TIME = pd.Timestamp("2100-01-01", tz="UTC")


class DatasetError(ValueError):
    """A dataset file is unreadable or violates the schema.

    Attributes name the file, the 0-based data row (None when the problem is the whole file or a
    whole column) and the column (None when the problem is the whole file).
    """

    def __init__(
        self, file: str | Path, message: str, row: int | None = None, column: str | None = None
    ) -> None:
        self.file = str(file)
        self.row = row
        self.column = column
        self.message = message
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass(frozen=True)
class Column:
    """One column of a table: its name, logical kind, whether it must exist, and what it means."""

    name: str
    kind: str  # "string" | "float" | "int" | "timestamp" | "string_list"
    required: bool
    nullable: bool
    description: str


@dataclass(frozen=True)
class Table:
    """One Parquet table of a dataset. Columns not listed are kept as free attributes."""

    name: str
    required: bool
    key: str | None
    columns: tuple[Column, ...]
    description: str

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


ITEMS = Table(
    "items",
    required=True,
    key="item_id",
    description="The catalog: one row per item.",
    columns=(
        Column("item_id", "string", True, False, "Unique item id."),
        Column("title", "string", False, True, "Product title."),
        Column("description", "string", False, True, "Free-text description."),
        Column(
            "categories", "string_list", False, True,
            "Category paths, e.g. ['Beauty > Skin Care > Face'] (' > ' separates levels).",
        ),
        Column("brand", "string", False, True, "Brand name."),
        Column("price", "float", False, True, "Price (>= 0, any currency)."),
        Column("image", "string", False, True, "Image path relative to the dataset directory."),
    ),
)

USERS = Table(
    "users",
    required=False,
    key="user_id",
    description="Users and their optional attributes (age, gender, occupation, region, ...). "
    "When absent, users are the distinct user ids of the interactions.",
    columns=(
        Column("user_id", "string", True, False, "Unique user id."),
        Column("age", "float", False, True, "Age in years."),
        Column("gender", "string", False, True, "Gender as given by the source."),
        Column("occupation", "string", False, True, "Occupation as given by the source."),
        Column("region", "string", False, True, "Home region / location."),
    ),
)

INTERACTIONS = Table(
    "interactions",
    required=True,
    key=None,
    description="Events: one row per (user, item, time) event. Rows with equal timestamps are "
    "unordered; the file order is kept only so that splits match published ones.",
    columns=(
        Column("user_id", "string", True, False, "User id (in users.parquet when present)."),
        Column("item_id", "string", True, False, "Item id (must be in items.parquet)."),
        Column("timestamp", "timestamp", True, False, "Event time, UTC, 1970..2100."),
        Column("event", "string", False, False, f"One of {', '.join(EVENTS)}; default purchase."),
        Column("weight", "float", False, False, "Event weight or rating value (finite); default 1."),
        Column("query", "string", False, True, "Search query text that led to the event."),
        Column("device", "string", False, True, "Device, e.g. mobile / desktop / app."),
        Column("location", "string", False, True, "Location or region of the event."),
        Column("session_id", "string", False, True, "Session id."),
        Column("position", "int", False, True, "0-based position at which the item was shown."),
        Column("split", "string", False, True, "Predefined split: train / valid / test."),
    ),
)

TRIPLES = Table(
    "triples",
    required=False,
    key=None,
    description="Knowledge-graph facts. A head or tail equal to an item_id refers to that item; "
    "any other value is an external entity.",
    columns=(
        Column("head", "string", True, False, "Head entity or item id."),
        Column("relation", "string", True, False, "Relation name."),
        Column("tail", "string", True, False, "Tail entity or item id."),
    ),
)

TABLES: tuple[Table, ...] = (ITEMS, USERS, INTERACTIONS, TRIPLES)


def _kind_ok(kind: str, typ: pa.DataType) -> bool:
    if kind == "string":
        return bool(pa.types.is_string(typ) or pa.types.is_large_string(typ))
    if kind == "float":
        return bool(pa.types.is_floating(typ) or pa.types.is_integer(typ))
    if kind == "int":
        return bool(pa.types.is_integer(typ))
    if kind == "timestamp":
        return bool(pa.types.is_timestamp(typ))
    if kind == "string_list":
        return bool(
            (pa.types.is_list(typ) or pa.types.is_large_list(typ))
            and (pa.types.is_string(typ.value_type) or pa.types.is_large_string(typ.value_type))
        )
    raise AssertionError(kind)


def _first_bad_utf8(col: pa.ChunkedArray) -> int | None:
    """Row of the first value that is not valid UTF-8 in a binary column."""
    for row, value in enumerate(col.to_pylist()):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return row
    return None


def read_parquet_file(path: Path) -> pa.Table:
    """Read a Parquet file; an empty or unreadable file or a repeated column name is an error."""
    if path.stat().st_size == 0:
        raise DatasetError(path, "empty file (0 bytes), expected a Parquet table")
    try:
        pa_table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(path, f"not a readable Parquet file ({exc})") from None
    names = pa_table.column_names
    for name in names:
        if names.count(name) > 1:
            raise DatasetError(path, "duplicate column name", column=name)
    return pa_table


def read_table(path: Path, table: Table, allow_empty: bool = False) -> pd.DataFrame:
    """Read one Parquet table and check its columns' presence, types and null rules.

    Returns a pandas DataFrame with strings as Python objects, timestamps as UTC datetimes and
    ``categories`` as lists. ``allow_empty`` admits a table with no rows (a catalog-only dataset
    has an empty interactions table). Cross-table rules are checked in :mod:`kgrank.data.dataset`.
    """
    if not path.exists():
        raise DatasetError(path, f"missing (a dataset needs {table.file})")
    pa_table = read_parquet_file(path)
    if pa_table.num_rows == 0 and not allow_empty:
        raise DatasetError(path, "table has no rows")
    names = pa_table.column_names
    for col in table.columns:
        if col.name not in names:
            if col.required:
                raise DatasetError(path, "required column is missing", column=col.name)
            continue
        typ = pa_table.schema.field(col.name).type
        if pa.types.is_null(typ):  # an all-null optional column has no type; fine if nullable
            if not col.nullable and pa_table.num_rows > 0:
                raise DatasetError(path, "column is entirely null", row=0, column=col.name)
            continue
        if col.kind == "string" and (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
            bad = _first_bad_utf8(pa_table.column(col.name))
            if bad is not None:
                raise DatasetError(path, "value is not valid UTF-8", row=bad, column=col.name)
            raise DatasetError(path, "expected a string column, found binary", column=col.name)
        if not _kind_ok(col.kind, typ):
            raise DatasetError(path, f"expected {col.kind}, found {typ}", column=col.name)
        if not col.nullable:
            nulls = pa_table.column(col.name).is_null()
            if pa.compute.any(nulls).as_py():
                row = int(np.flatnonzero(nulls.to_numpy(zero_copy_only=False))[0])
                raise DatasetError(path, "null value in a required column", row=row, column=col.name)
    df = pa_table.to_pandas(types_mapper=None)
    return df


def check_unique(df: pd.DataFrame, column: str, file: str | Path) -> None:
    dup = df[column].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DatasetError(file, f"duplicate id {df[column].iat[row]!r}", row=row, column=column)


def check_known(values: pd.Series, known: pd.Index, file: str | Path, column: str, other: str) -> None:
    unknown = ~values.isin(known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DatasetError(
            file, f"unknown id {values.iat[row]!r} (not in {other})", row=row, column=column
        )


def check_finite(
    values: pd.Series,
    file: str | Path,
    column: str,
    min_value: float | None,
    allow_missing: bool = True,
) -> None:
    """Every value is a finite number (>= ``min_value``); missing values (null / NaN) pass only
    when ``allow_missing`` (a float NaN is not an Arrow null, so the null check misses it)."""
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    present = ~values.isna().to_numpy() if allow_missing else np.ones(len(values), dtype=bool)
    bad = present & ~np.isfinite(arr)
    if min_value is not None:
        bad |= present & np.isfinite(arr) & (arr < min_value)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        rule = "a finite number" if min_value is None else f"a finite number >= {min_value}"
        value = values.iat[row]
        shown = repr(value.item() if isinstance(value, np.generic) else value)
        raise DatasetError(file, f"{shown} is not {rule}", row=row, column=column)


def check_timestamps(values: pd.Series, file: str | Path, column: str) -> pd.Series:
    """Make timestamps tz-aware UTC (naive ones are taken as UTC) and check range and NaT."""
    ts = pd.to_datetime(values, utc=True)
    bad = ts.isna().to_numpy() | (ts < MIN_TIME).to_numpy() | (ts >= MAX_TIME).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            file, f"timestamp {values.iat[row]!s} is missing or outside 1970..2100",
            row=row, column=column,
        )
    return ts


def check_allowed(values: pd.Series, allowed: tuple[str, ...], file: str | Path, column: str) -> None:
    bad = ~values.isin(allowed)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(
            file, f"{values.iat[row]!r} is not one of {', '.join(allowed)}", row=row, column=column
        )


def describe_schema() -> str:
    """The schema as a Markdown table (printed by ``kgrank data schema``, copied into README)."""
    lines = []
    for table in TABLES:
        need = "required" if table.required else "optional"
        lines.append(f"### `{table.file}` ({need})\n\n{table.description}\n")
        lines.append("| column | type | required | nullable | meaning |")
        lines.append("|---|---|---|---|---|")
        for c in table.columns:
            req = "yes" if c.required else "no"
            nul = "yes" if c.nullable else "no"
            lines.append(f"| `{c.name}` | {c.kind} | {req} | {nul} | {c.description} |")
        lines.append("")
    return "\n".join(lines)
