"""MovieLens 100K (``ml-100k``) folder -> kgrank dataset.

Source format (GroupLens ml-100k, see the folder's README):

- ``u.data``: ``user id \\t item id \\t rating \\t unix timestamp``, no header (100,000 lines).
- ``u.item``: latin-1, ``|``-separated: ``movie id | title | release date | video release date |
  IMDb URL | 19 genre flags`` (0/1, in the order of ``u.genre``).
- ``u.genre``: ``name|index`` lines (trailing blank lines allowed).
- ``u.user``: ``user id | age | gender | occupation | zip code``.

These files have no header: errors name the file, the 0-based line as row, and the field by its
meaning (``user_id``, ``rating``, ``release_date``, ...).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import DatasetError, check_unique

DATA_FIELDS = ("user_id", "item_id", "rating", "timestamp")
USER_FIELDS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_FIELDS = ("item_id", "title", "release_date", "video_release_date", "imdb_url")


def _lines(path: Path, encoding: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not valid {encoding}", row=data.count(b"\n", 0, exc.start)) \
            from None
    lines = text.split("\n")
    while lines and lines[-1].strip() == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def _fields(path: Path, lines: list[str], sep: str, names: tuple[str, ...], n: int) -> list[list[str]]:
    out = []
    for row, line in enumerate(lines):
        parts = line.split(sep)
        if len(parts) != n:
            raise DatasetError(path, f"expected {n} '{sep}'-separated fields ({', '.join(names)}"
                               f"{', ...' if n > len(names) else ''}), found {len(parts)}", row=row)
        out.append(parts)
    return out


def _int(value: str, path: Path, row: int, column: str) -> int:
    v = value.strip()
    if not (v.isascii() and v.isdigit()):
        raise DatasetError(path, f"{value!r} is not a non-negative integer", row=row, column=column)
    return int(v)


def read_genres(path: Path) -> list[str]:
    """Genre names ordered by their index (must be 0..n-1)."""
    rows = _fields(path, _lines(path, "latin-1"), "|", ("name", "index"), 2)
    by_index: dict[int, str] = {}
    for row, (name, idx) in enumerate(rows):
        i = _int(idx, path, row, "index")
        if i in by_index:
            raise DatasetError(path, f"duplicate genre index {i}", row=row, column="index")
        by_index[i] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(path, "genre indexes are not 0..n-1", column="index")
    return [by_index[i] for i in range(len(by_index))]


def read_items(path: Path, genres: list[str]) -> pd.DataFrame:
    n = len(ITEM_FIELDS) + len(genres)
    rows = _fields(path, _lines(path, "latin-1"), "|", ITEM_FIELDS, n)
    ids, titles, dates, years, urls, cats = [], [], [], [], [], []
    for row, parts in enumerate(rows):
        ids.append(str(_int(parts[0], path, row, "item_id")))
        titles.append(parts[1] or None)
        date = parts[2].strip()
        year = math.nan
        if date:
            try:
                year = float(datetime.strptime(date, "%d-%b-%Y").year)
            except ValueError:
                raise DatasetError(path, f"{date!r} is not a dd-Mon-yyyy date", row=row,
                                   column="release_date") from None
        dates.append(date or None)
        years.append(year)
        urls.append(parts[4] or None)
        flags = parts[len(ITEM_FIELDS):]
        cat = []
        for g, flag in zip(genres, flags, strict=True):
            if flag not in ("0", "1"):
                raise DatasetError(path, f"genre flag {flag!r} is not 0 or 1", row=row, column=g)
            if flag == "1":
                cat.append(f"Movies > {g}")
        cats.append(cat)
    items = pd.DataFrame({
        "item_id": pd.Series(ids, dtype=object),
        "title": pd.Series(titles, dtype=object),
        "categories": pd.Series(cats, dtype=object),
        "release_date": pd.Series(dates, dtype=object),
        "year": np.array(years, dtype=np.float64),
        "imdb_url": pd.Series(urls, dtype=object),
    })
    check_unique(items, "item_id", path)
    return items


def read_users(path: Path) -> pd.DataFrame:
    rows = _fields(path, _lines(path, "latin-1"), "|", USER_FIELDS, len(USER_FIELDS))
    ids, ages, genders, occupations, zips = [], [], [], [], []
    for row, (uid, age, gender, occupation, zip_code) in enumerate(rows):
        ids.append(str(_int(uid, path, row, "user_id")))
        ages.append(float(_int(age, path, row, "age")) if age.strip() else math.nan)
        genders.append(gender or None)
        occupations.append(occupation or None)
        zips.append(zip_code or None)
    users = pd.DataFrame({
        "user_id": pd.Series(ids, dtype=object),
        "age": np.array(ages, dtype=np.float64),
        "gender": pd.Series(genders, dtype=object),
        "occupation": pd.Series(occupations, dtype=object),
        "region": pd.Series(zips, dtype=object),
    })
    check_unique(users, "user_id", path)
    return users


def read_ratings(path: Path, items: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    rows = _fields(path, _lines(path, "utf-8"), "\t", DATA_FIELDS, len(DATA_FIELDS))
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
    arrays: dict[str, np.ndarray] = {}
    for name, values in zip(DATA_FIELDS, cols, strict=True):
        try:
            arrays[name] = np.array(values, dtype=str).astype(np.int64)
        except (ValueError, OverflowError):
            arrays[name] = np.zeros(0, np.int64)
        if len(arrays[name]) != len(values) or (arrays[name] < 0).any():
            for row, v in enumerate(values):
                _int(v, path, row, name)
    inter = pd.DataFrame({
        "user_id": arrays["user_id"].astype(str).astype(object),
        "item_id": arrays["item_id"].astype(str).astype(object),
        "timestamp": pd.to_datetime(arrays["timestamp"], unit="s", utc=True),
        "event": "rating",
        "weight": arrays["rating"].astype(np.float64),
    })
    for col, table, name in (("user_id", users, "u.user"), ("item_id", items, "u.item")):
        unknown = ~inter[col].isin(pd.Index(table[col])).to_numpy()
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DatasetError(path, f"id {inter[col].iat[row]} is not in {name}", row=row,
                               column=col)
    zips = users.set_index("user_id")["region"]
    inter["location"] = inter["user_id"].map(zips).astype(object)
    return inter


def import_movielens_100k(src: Path, dst: Path, *, overwrite: bool = False) -> Dataset:
    """Import the MovieLens 100K folder (u.data, u.item, u.genre, u.user)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    genres = read_genres(src / "u.genre")
    items = read_items(src / "u.item", genres)
    users = read_users(src / "u.user")
    inter = read_ratings(src / "u.data", items, users)
    dup_titles = int(items["title"].dropna().duplicated().sum())
    no_date = int(items["release_date"].isna().sum())
    readme = "\n".join([
        "# MovieLens 100K",
        "",
        f"Imported by kgrank from `{src}` (GroupLens terms apply; see the source README).",
        "",
        "## Transformation",
        f"- interactions: `u.data` in file order ({len(inter):,} rows), event `rating`, weight = "
        "the 1-5 rating, timestamp = unix seconds -> UTC, location = the user's zip code.",
        f"- items: `u.item` ({len(items):,} rows, decoded as latin-1): item_id = movie id, title, "
        "categories = ['Movies > <Genre>' for each genre flag], attributes release_date "
        "(string as given), year (NaN when there is no release date), imdb_url.",
        f"- users: `u.user` ({len(users):,} rows): age, gender, occupation, region = zip code.",
        "",
        "## Caveats",
        "- The official u1..u5 / ua / ub splits are not encoded; split by time or re-create them.",
        f"- {no_date} item(s) have no release date; {dup_titles} title(s) occur under more than one "
        "movie id in the source (kept as separate items).",
        "- Zip codes are US ZIPs mostly, some non-US postal codes; used verbatim.",
        "",
    ])
    return write_dataset(dst, items, inter, users=users, overwrite=overwrite, readme=readme)
