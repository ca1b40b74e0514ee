"""Load, validate and write kgrank datasets (see :mod:`kgrank.data.schema` for the format).

Loading maps string ids to contiguous ints: item ``i`` is row ``i`` of ``items.parquet`` and user
``u`` is row ``u`` of ``users.parquet`` (or the order of first appearance in the interactions when
there is no users table). Writing goes through a temporary directory that is validated by loading
it and only then renamed into place, so a failed import leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.schema import (
    EVENTS,
    INTERACTIONS,
    ITEMS,
    TRIPLES,
    USERS,
    DatasetError,
    check_allowed,
    check_finite,
    check_known,
    check_timestamps,
    check_unique,
    read_table,
)
from kgrank.io import staged_dir


@dataclass
class Dataset:
    """A validated dataset with contiguous int ids.

    ``items`` and ``users`` are indexed 0..n-1 (the int id); ``interactions`` keeps the file's row
    order and gains ``user_idx`` / ``item_idx`` int64 columns; ``timestamp`` is UTC.
    """

    root: Path
    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    triples: pd.DataFrame | None
    fingerprint: str
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def name(self) -> str:
        return self.root.name

    def item_index(self, item_ids: pd.Series | list[str]) -> np.ndarray:
        """Int ids of the given item ids (KeyError-free: unknown ids raise ValueError)."""
        idx = pd.Index(self.items["item_id"]).get_indexer(pd.Index(item_ids))
        if (idx < 0).any():
            raise ValueError(f"unknown item id {list(item_ids)[int(np.argmax(idx < 0))]!r}")
        return idx.astype(np.int64)

    def user_index(self, user_ids: pd.Series | list[str]) -> np.ndarray:
        idx = pd.Index(self.users["user_id"]).get_indexer(pd.Index(user_ids))
        if (idx < 0).any():
            raise ValueError(f"unknown user id {list(user_ids)[int(np.argmax(idx < 0))]!r}")
        return idx.astype(np.int64)

    def summary(self) -> dict[str, object]:
        inter = self.interactions
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": len(inter),
            "triples": 0 if self.triples is None else len(self.triples),
            "events": {str(k): int(v) for k, v in inter["event"].value_counts().items()},
            "first": str(inter["timestamp"].min()),
            "last": str(inter["timestamp"].max()),
            "density": len(inter) / max(1, self.n_users * self.n_items),
            "items_with_image": int(self.items["image"].notna().sum()) if "image" in self.items else 0,
            "fingerprint": self.fingerprint,
        }


def _hash_frame(df: pd.DataFrame) -> bytes:
    """Content hash of a table, independent of Parquet writer versions."""
    flat = df.copy()
    for col in flat.columns:
        if flat[col].dtype == object and any(isinstance(v, list | np.ndarray) for v in flat[col]):
            flat[col] = flat[col].map(
                lambda v: "\x1f".join(map(str, v)) if isinstance(v, list | np.ndarray) else v
            )
    h = hashlib.sha256(",".join(map(str, flat.columns)).encode())
    h.update(pd.util.hash_pandas_object(flat, index=False).to_numpy().tobytes())
    return h.digest()


def _validate_items(df: pd.DataFrame, file: Path, root: Path) -> pd.DataFrame:
    check_unique(df, "item_id", file)
    if "price" in df:
        check_finite(df["price"], file, "price", min_value=0.0)
    if "categories" in df:
        df["categories"] = df["categories"].map(
            lambda v: list(v) if isinstance(v, list | np.ndarray) else []
        )
    if "image" in df:
        for row, rel in enumerate(df["image"]):
            if rel is None or (isinstance(rel, float) and np.isnan(rel)):
                continue
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise DatasetError(file, f"image path {rel!r} must be relative, inside the "
                                   "dataset directory", row=row, column="image")
    return df.reset_index(drop=True)


def _validate_interactions(
    df: pd.DataFrame, file: Path, items: pd.DataFrame, users: pd.DataFrame | None
) -> pd.DataFrame:
    df["timestamp"] = check_timestamps(df["timestamp"], file, "timestamp")
    if "event" not in df:
        df["event"] = "purchase"
    check_allowed(df["event"], EVENTS, file, "event")
    if "weight" not in df:
        df["weight"] = 1.0
    check_finite(df["weight"], file, "weight", min_value=None, allow_missing=False)
    df["weight"] = df["weight"].astype(np.float32)
    if "split" in df:
        check_allowed(df["split"], ("train", "valid", "test"), file, "split")
    if "position" in df:
        check_finite(df["position"], file, "position", min_value=0.0)
    check_known(df["item_id"], pd.Index(items["item_id"]), file, "item_id", ITEMS.file)
    if users is not None:
        check_known(df["user_id"], pd.Index(users["user_id"]), file, "user_id", USERS.file)
    return df


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate a dataset directory; raise :class:`DatasetError` on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "not a dataset directory")
    items = _validate_items(read_table(root / ITEMS.file, ITEMS), root / ITEMS.file, root)
    users_path = root / USERS.file
    users: pd.DataFrame | None = None
    if users_path.exists():
        users = read_table(users_path, USERS)
        check_unique(users, "user_id", users_path)
    inter_path = root / INTERACTIONS.file
    inter = read_table(inter_path, INTERACTIONS, allow_empty=True)
    inter = _validate_interactions(inter, inter_path, items, users)
    if users is None:
        users = pd.DataFrame({"user_id": pd.unique(inter["user_id"])})
    users = users.reset_index(drop=True)
    inter["user_idx"] = pd.Index(users["user_id"]).get_indexer(inter["user_id"]).astype(np.int64)
    inter["item_idx"] = pd.Index(items["item_id"]).get_indexer(inter["item_id"]).astype(np.int64)
    triples: pd.DataFrame | None = None
    triples_path = root / TRIPLES.file
    if triples_path.exists():
        triples = read_table(triples_path, TRIPLES)
    h = hashlib.sha256()
    for df in (items, users, inter.drop(columns=["user_idx", "item_idx"]), triples):
        h.update(b"-" if df is None else _hash_frame(df))
    return Dataset(root, items, users, inter, triples, h.hexdigest()[:16])


def write_dataset(
    dst: str | Path,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    users: pd.DataFrame | None = None,
    triples: pd.DataFrame | None = None,
    files: Mapping[str, bytes | Path] | None = None,
    overwrite: bool = False,
    readme: str | None = None,
) -> Dataset:
    """Write tables (and extra files such as images, as bytes or source paths) as a dataset.

    The dataset is assembled in a temporary sibling directory, validated by :func:`load_dataset`,
    then moved into place; on any error nothing is left at ``dst``.
    """
    with staged_dir(Path(dst), overwrite=overwrite) as tmp:
        items.to_parquet(tmp / ITEMS.file, index=False)
        interactions.to_parquet(tmp / INTERACTIONS.file, index=False)
        if users is not None:
            users.to_parquet(tmp / USERS.file, index=False)
        if triples is not None:
            triples.to_parquet(tmp / TRIPLES.file, index=False)
        for rel, content in (files or {}).items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
        load_dataset(tmp)  # validate before publishing
    return load_dataset(dst)
