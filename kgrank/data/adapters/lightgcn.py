"""LightGCN / NGCF split files -> kgrank dataset.

Source format (as published with NGCF, LightGCN and, for the interactions, KGAT):

- ``train.txt`` and ``test.txt``: one line per user, ``user item item ...``, whitespace-separated
  remapped integer ids (>= 0). A line holding only a user is allowed: that user has no interaction
  in that file. Blank lines carry nothing and are ignored.
- ``user_list.txt`` / ``item_list.txt`` (optional): a header line (``org_id remap_id``, KGAT's
  item list adds ``freebase_id``), then one line per id. In two-column lists the ``remap_id`` is the
  last token of the line and the ``org_id`` is everything before it (KGAT's entity list has names
  with spaces).

The files hold no time information: every interaction gets timestamp 1970-01-01T00:00:00Z and a
``split`` column (``train`` / ``test``) carries the published split.

Errors name the file, the row and the column. In ``train.txt`` / ``test.txt`` the row is the 0-based
line number and the column is ``user`` (first token) or ``item``; in the id lists the row is the
0-based data row (the header line excluded).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import DatasetError

EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
_LAST_TOKEN = re.compile(r"^(.*?)\s*(\S+)\s*$")


@dataclass
class SplitFile:
    """One parsed ``user item item ...`` file.

    ``users`` / ``items`` hold one entry per (user, item) pair, ``pair_lines`` the 0-based line of
    each pair; ``line_users`` / ``lines`` the user and line number of every non-blank line.
    """

    path: Path
    users: np.ndarray
    items: np.ndarray
    pair_lines: np.ndarray
    line_users: np.ndarray
    lines: np.ndarray


@dataclass
class LightGCNData:
    """The tables built from a LightGCN-format folder, plus notes for the README."""

    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    split_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a decoding error names the 0-based line."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start)
        raise DatasetError(path, "not valid UTF-8", row=line) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _to_int64(tokens: list[str]) -> np.ndarray | None:
    """Vectorised str -> int64; None if some token is not a plain integer."""
    if not tokens:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.array(tokens).astype(np.int64)
    except (ValueError, OverflowError):
        return None
    return arr


def _is_int_token(tok: str) -> bool:
    return tok.lstrip("+-").isdigit() and tok.isascii()


def parse_int_rows(
    path: Path, lines: list[str], column_names: tuple[str, ...] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse whitespace-separated integer lines.

    Returns (flat int64 values, tokens per line, start offset of each line). ``column_names`` fixes
    the number of tokens per non-blank line (and names them in errors); None means ragged lines
    whose first token is a ``user`` and the rest ``item``.
    """
    toks = [ln.split() for ln in lines]
    counts = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def col_name(j: int) -> str:
        if column_names is None:
            return "user" if j == 0 else "item"
        return column_names[j]

    if column_names is not None:
        bad_len = np.flatnonzero((counts != 0) & (counts != len(column_names)))
        if len(bad_len):
            row = int(bad_len[0])
            raise DatasetError(
                path, f"expected {len(column_names)} integers "
                f"({' '.join(column_names)}), found {counts[row]} tokens", row=row,
            )
    values = _to_int64(list(itertools.chain.from_iterable(toks)))
    if values is None:
        for row, line_toks in enumerate(toks):
            for j, tok in enumerate(line_toks):
                if not _is_int_token(tok) or not -(2**63) <= int(tok) < 2**63:
                    raise DatasetError(
                        path, f"{tok!r} is not an integer id", row=row, column=col_name(j)
                    )
        raise AssertionError("unreachable: a token failed to parse")  # pragma: no cover
    neg = np.flatnonzero(values < 0)
    if len(neg):
        pos = int(neg[0])
        row = int(np.searchsorted(starts + counts, pos, side="right"))
        raise DatasetError(
            path, f"negative id {int(values[pos])}", row=row, column=col_name(pos - int(starts[row]))
        )
    return values, counts, starts


def read_split_file(path: Path) -> SplitFile:
    """Parse a ``user item item ...`` file (Gowalla's 810k pairs take well under a second)."""
    lines = read_text_lines(path)
    values, counts, starts = parse_int_rows(path, lines, None)
    nonblank = np.flatnonzero(counts > 0)
    line_users = values[starts[nonblank]]
    n_items = counts[nonblank] - 1
    is_item = np.ones(len(values), dtype=bool)
    is_item[starts[nonblank]] = False
    return SplitFile(
        path=path,
        users=np.repeat(line_users, n_items),
        items=values[is_item],
        pair_lines=np.repeat(nonblank, n_items),
        line_users=line_users,
        lines=nonblank,
    )


def read_id_list(path: Path) -> pd.DataFrame:
    """Read an ``org_id remap_id [...]`` list into a DataFrame sorted by ``remap_id`` (int64).

    The header line names the columns; without a header (second token an integer) the columns are
    ``org_id remap_id``. Other columns are strings. ``remap_id`` must be unique.
    """
    lines = read_text_lines(path)
    if not lines:
        raise DatasetError(path, "empty file, expected an 'org_id remap_id' list")
    head = lines[0].split()
    has_header = "remap_id" in head
    names = head if has_header else ["org_id", "remap_id"]
    data = lines[1:] if has_header else lines
    if len(names) != len(set(names)):
        raise DatasetError(path, f"duplicate column names in header {head}")
    rows: list[list[str]] = []
    for row, line in enumerate(data):
        if not line.strip():
            raise DatasetError(path, "blank line", row=row)
        if len(names) == 2 and names[1] == "remap_id":
            m = _LAST_TOKEN.match(line)
            assert m is not None  # a non-blank line always matches
            parts = [m.group(1).strip(), m.group(2)]
        else:
            parts = line.split()
            if len(parts) != len(names):
                raise DatasetError(
                    path, f"expected {len(names)} fields ({' '.join(names)}), found {len(parts)}",
                    row=row,
                )
        rows.append(parts)
    df = pd.DataFrame(rows, columns=names, dtype=object) if rows else pd.DataFrame(columns=names)
    remap = df["remap_id"].tolist()
    for row, tok in enumerate(remap):
        if not _is_int_token(tok) or int(tok) < 0:
            raise DatasetError(path, f"{tok!r} is not a non-negative integer", row=row,
                               column="remap_id")
    df["remap_id"] = np.array(remap, dtype=np.int64) if remap else np.zeros(0, np.int64)
    dup = df["remap_id"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DatasetError(path, f"duplicate remap_id {df['remap_id'].iat[row]}", row=row,
                           column="remap_id")
    return df.sort_values("remap_id", kind="stable").reset_index(drop=True)


def _check_known(files: list[SplitFile], known: np.ndarray, what: str, list_file: Path) -> None:
    """Every user / item id of the split files must be a remap_id of the id list."""
    for f in files:
        if what == "user":
            ids, rows = f.line_users, f.lines
        else:
            ids, rows = f.items, f.pair_lines
        unknown = np.flatnonzero(~np.isin(ids, known))
        if len(unknown):
            i = int(unknown[0])
            raise DatasetError(
                f.path, f"{what} id {int(ids[i])} is not in {list_file.name}",
                row=int(rows[i]), column=what,
            )


def _id_table(
    key: str, ids_seen: list[np.ndarray], list_path: Path, files: list[SplitFile], notes: list[str]
) -> pd.DataFrame:
    """Users or items: rows of the id list when present, else ids 0..max of those seen."""
    what = key.split("_")[0]
    if list_path.is_file():
        lst = read_id_list(list_path)
        _check_known(files, lst["remap_id"].to_numpy(), what, list_path)
        out = lst.rename(columns={"remap_id": key})
        out[key] = out[key].astype(str)
        cols = [key] + [c for c in out.columns if c != key]
        notes.append(f"{what}s: the {len(out):,} rows of {list_path.name} (remap_id -> {key}; "
                     f"other columns kept as attributes).")
        return out[cols]
    seen = np.concatenate(ids_seen) if ids_seen else np.zeros(0, np.int64)
    n = int(seen.max()) + 1 if len(seen) else 0
    n_seen = len(np.unique(seen))
    notes.append(f"{what}s: no {list_path.name}, so ids 0..{n - 1} ({n:,} rows; {n - n_seen:,} of "
                 f"them never appear in the split files).")
    return pd.DataFrame({key: np.arange(n).astype(str)})


def load_lightgcn(src: Path) -> LightGCNData:
    """Parse a LightGCN-format folder into items / users / interactions tables."""
    src = Path(src)
    files = [read_split_file(src / "train.txt"), read_split_file(src / "test.txt")]
    notes: list[str] = []
    items = _id_table("item_id", [f.items for f in files], src / "item_list.txt", files, notes)
    users = _id_table("user_id", [f.line_users for f in files], src / "user_list.txt", files, notes)
    n = [len(f.users) for f in files]
    total = sum(n)
    interactions = pd.DataFrame({
        "user_id": np.concatenate([f.users for f in files]).astype(str),
        "item_id": np.concatenate([f.items for f in files]).astype(str),
        "timestamp": pd.DatetimeIndex(np.zeros(total, dtype="datetime64[s]")).tz_localize("UTC"),
        "event": np.full(total, "click", dtype=object),
        "weight": np.ones(total, dtype=np.float32),
        "split": np.repeat(np.array(["train", "test"], dtype=object), n),
    })
    pairs = pd.DataFrame({"u": interactions["user_id"], "i": interactions["item_id"]})
    n_dup = int(pairs.duplicated().sum())
    if n_dup:
        notes.append(f"{n_dup:,} (user, item) pairs occur more than once; all are kept.")
    return LightGCNData(items, users, interactions, {"train": n[0], "test": n[1]}, notes)


def split_readme(title: str, src: Path, data: LightGCNData, extra: list[str] | None = None) -> str:
    lines = [
        f"# {title}",
        "",
        f"Imported by kgrank from `{src}`.",
        "",
        "## Transformation",
        f"- interactions: `train.txt` ({data.split_counts['train']:,} pairs) then `test.txt` "
        f"({data.split_counts['test']:,} pairs), in file order; one row per (user, item) pair "
        "with user_id / item_id = the remapped ids as strings, event `click`, weight 1, and a "
        "`split` column (`train` / `test`).",
        *[f"- {n}" for n in data.notes + (extra or [])],
        "",
        "## Caveats",
        "- The source has NO TIME INFORMATION: every timestamp is 1970-01-01T00:00:00Z. Do not use "
        "time-based splits; use the predefined `split` column.",
        "- Implicit feedback only (no ratings, no negative events).",
        "",
    ]
    return "\n".join(lines)


def import_lightgcn(src: Path, dst: Path, *, overwrite: bool = False) -> Dataset:
    """Import a LightGCN / NGCF folder (train.txt, test.txt, optional user/item lists)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    data = load_lightgcn(src)
    readme = split_readme("LightGCN-format split", src, data)
    return write_dataset(
        dst, data.items, data.interactions, users=data.users, overwrite=overwrite, readme=readme
    )
