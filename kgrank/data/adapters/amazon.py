"""Amazon Beauty (2014) 5-core folder -> kgrank dataset.

Source format (``/work/shared/datasets/amazon-beauty-2014-5core``, see its SOURCE.md):

- ``interactions.csv``: comma-separated with header
  ``user_id,item_id,timestamp,p5_user_idx,p5_item_idx,seq_pos``; user_id = Amazon reviewerID,
  item_id = ASIN, timestamp = ``unixReviewTime`` (unix seconds, UTC midnight). Rows per user in
  P5 / S3-Rec sequence order. The ``p5_*`` and ``seq_pos`` columns are optional.
- ``Amazon_Beauty.item``: a RecBole atomic file, tab-separated with default CSV quoting (titles may
  hold tabs inside double quotes), header
  ``item_id:token title:token sales_type:token sales_rank:float categories:token_seq price:float
  brand:token``. ``categories`` is a comma-separated list of single- or double-quoted tokens such as
  ``'Beauty', 'Makeup', 'Face', 'Concealers & Neutralizers'``: one category path from the root
  down; a token equal to the first token (the root) starts a new path.

Errors name the file, the 0-based data row (header excluded) and the column.
"""

from __future__ import annotations

import ast
import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.adapters.tabular import read_csv
from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import DatasetError

ITEM_COLUMNS = ("item_id", "title", "sales_type", "sales_rank", "categories", "price", "brand")
EXTRA_INTERACTION_COLUMNS = ("p5_user_idx", "p5_item_idx", "seq_pos")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    return path


def parse_category_paths(field: str) -> list[str]:
    """``'Beauty', 'Makeup', 'Face'`` -> ``['Beauty > Makeup > Face']``.

    A token equal to the first token starts a new path (concatenated paths such as
    ``'Beauty', 'Makeup', 'Beauty', 'Tools'`` give two paths). Raises ValueError if the field is
    not a list of quoted strings.
    """
    field = field.strip()
    if not field:
        return []
    tokens = ast.literal_eval(f"[{field}]")
    if not all(isinstance(t, str) for t in tokens):
        raise ValueError("not a list of quoted strings")
    paths: list[list[str]] = []
    for tok in tokens:
        tok = tok.strip()
        if not paths or tok == tokens[0].strip():
            paths.append([])
        paths[-1].append(tok)
    return [" > ".join(p) for p in paths]


def _float_or_nan(value: str, file: Path, row: int, column: str) -> float:
    if value.strip() == "":
        return math.nan
    try:
        out = float(value)
    except ValueError:
        raise DatasetError(file, f"{value!r} is not a number", row=row, column=column) from None
    if not math.isfinite(out) or (column == "price" and out < 0):
        raise DatasetError(file, f"{value!r} is not a valid {column}", row=row, column=column)
    return out


def read_items(path: Path) -> pd.DataFrame:
    """Parse ``Amazon_Beauty.item`` (file order kept)."""
    data = _require(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start)  # 0-based line; data row = line - 1
        raise DatasetError(path, "not valid UTF-8", row=line - 1 if line else None) from None
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    except csv.Error as exc:
        raise DatasetError(path, f"CSV error: {exc}") from None
    if not records:
        raise DatasetError(path, "empty file")
    header = [h.split(":", 1)[0] for h in records[0]]
    for col in ITEM_COLUMNS:
        if col not in header:
            raise DatasetError(path, "column missing from the header", column=col)
    pos = {c: header.index(c) for c in ITEM_COLUMNS}
    out: dict[str, list[object]] = {c: [] for c in ITEM_COLUMNS}
    for row, rec in enumerate(records[1:]):
        if len(rec) != len(header):
            raise DatasetError(path, f"expected {len(header)} tab-separated fields, found "
                               f"{len(rec)}", row=row)
        values = {c: rec[pos[c]] for c in ITEM_COLUMNS}
        if not values["item_id"].strip():
            raise DatasetError(path, "empty item id", row=row, column="item_id")
        out["item_id"].append(values["item_id"])
        for c in ("title", "sales_type", "brand"):
            out[c].append(values[c] if values[c] != "" else None)
        for c in ("sales_rank", "price"):
            out[c].append(_float_or_nan(values[c], path, row, c))
        try:
            out["categories"].append(parse_category_paths(values["categories"]))
        except (ValueError, SyntaxError) as exc:
            raise DatasetError(
                path, f"cannot parse category list {values['categories']!r} ({exc})",
                row=row, column="categories",
            ) from None
    items = pd.DataFrame({
        "item_id": pd.Series(out["item_id"], dtype=object),
        "title": pd.Series(out["title"], dtype=object),
        "categories": pd.Series(out["categories"], dtype=object),
        "brand": pd.Series(out["brand"], dtype=object),
        "price": np.array(out["price"], dtype=np.float64),
        "sales_type": pd.Series(out["sales_type"], dtype=object),
        "sales_rank": np.array(out["sales_rank"], dtype=np.float64),
    })
    dup = items["item_id"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DatasetError(path, f"duplicate item id {items['item_id'].iat[row]!r}", row=row,
                           column="item_id")
    return items


def _int_column(df: pd.DataFrame, column: str, file: Path) -> np.ndarray:
    raw = df[column]
    num = pd.to_numeric(raw, errors="coerce")
    arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(file, f"{raw.iat[row]!r} is not an integer", row=row, column=column)
    return arr.astype(np.int64)


def read_interactions(path: Path, item_ids: pd.Index) -> pd.DataFrame:
    """Parse ``interactions.csv`` in file order."""
    raw = read_csv(_require(path))
    for col in ("user_id", "item_id", "timestamp"):
        if col not in raw.columns:
            raise DatasetError(path, "column missing from the header", column=col)
        empty = raw[col].isna().to_numpy()
        if empty.any():
            raise DatasetError(path, "empty value", row=int(np.flatnonzero(empty)[0]), column=col)
    seconds = _int_column(raw, "timestamp", path)
    unknown = ~raw["item_id"].isin(item_ids).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DatasetError(path, f"item {raw['item_id'].iat[row]!r} is not in Amazon_Beauty.item",
                           row=row, column="item_id")
    inter = pd.DataFrame({
        "user_id": raw["user_id"].astype(object),
        "item_id": raw["item_id"].astype(object),
        "timestamp": pd.to_datetime(seconds, unit="s", utc=True),
        "event": "purchase",
        "weight": np.ones(len(raw), dtype=np.float32),
    })
    for col in EXTRA_INTERACTION_COLUMNS:
        if col in raw.columns:
            inter[col] = _int_column(raw, col, path)
    return inter


def import_amazon_5core(src: Path, dst: Path, *, overwrite: bool = False) -> Dataset:
    """Import the Amazon Beauty 2014 5-core folder (interactions.csv + Amazon_Beauty.item)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    items = read_items(src / "Amazon_Beauty.item")
    inter = read_interactions(src / "interactions.csv", pd.Index(items["item_id"]))
    n_multi = int(items["categories"].map(len).gt(1).sum())
    kept = [c for c in EXTRA_INTERACTION_COLUMNS if c in inter.columns]
    readme = "\n".join([
        "# Amazon Beauty 2014 5-core",
        "",
        f"Imported by kgrank from `{src}` (see its SOURCE.md for origins and license).",
        "",
        "## Transformation",
        f"- interactions: `interactions.csv` rows in FILE ORDER ({len(inter):,} rows, "
        f"{inter['user_id'].nunique():,} users); timestamp = unixReviewTime (unix seconds -> UTC), "
        "event `purchase` (a review), weight 1."
        + (f" Kept as attributes: {', '.join(kept)}." if kept else ""),
        f"- items: `Amazon_Beauty.item` in file order ({len(items):,} rows): item_id (ASIN), "
        "title, brand, price (NaN when empty), categories, and attributes sales_type, sales_rank.",
        "- categories: the quoted token list is turned into ' > '-joined paths; a token equal to "
        f"the root starts a new path ({n_multi:,} items have more than one path).",
        "- users: no users table (users are the distinct user ids of the interactions).",
        "",
        "## Caveats",
        "- interactions.csv is a join made by the data curators (P5 sequences + TiCoSeRec "
        "timestamps), not an upstream file.",
        "- Timestamps have DAY granularity; within one day the file order is increasing ASIN, an "
        "artifact: treat same-day events as unordered.",
        "- No ratings, review text or images. Text fields are verbatim (HTML entities such as "
        "`&amp;` are not unescaped).",
        "- Empty fields: title, brand and sales_type -> null; price and sales_rank -> NaN.",
        "",
    ])
    return write_dataset(dst, items, inter, overwrite=overwrite, readme=readme)
