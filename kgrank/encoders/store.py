"""On-disk embedding cache keyed by (encoder id, sha256 of the text).

Layout: ``root/<sanitised encoder id>-<hash>/`` holds ``shard_NNNN.npy`` float32 arrays and
``index.json`` (key -> [shard, row]). Keys are text hashes for
:meth:`EmbeddingStore.get_or_encode`; :meth:`EmbeddingStore.lookup` and
:meth:`EmbeddingStore.add` take any string key (e.g. the sha256 of an image file's bytes). A new
shard is written to a temp file and ``os.replace``d into place; the index is rewritten the same
way, last, so a crash never leaves an index that points at a missing shard. Shards are read with
``np.load(mmap_mode="r")``; no pickle is ever written or read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def text_hash(text: str | None) -> str:
    """sha256 hex digest of the text (None counts as "")."""
    return hashlib.sha256((text if isinstance(text, str) else "").encode("utf-8")).hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class EmbeddingStore:
    """Embeddings cached on disk; ``get_or_encode`` encodes only texts not stored yet."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.last_encoded = 0
        self.last_cached = 0

    def encoder_dir(self, encoder_id: str) -> Path:
        """The directory of one encoder's shards (a readable, collision-free name)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id).strip("._")[:60] or "encoder"
        return self.root / f"{safe}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:16]}"

    def load_index(self, encoder_id: str) -> dict[str, Any]:
        """The stored index of an encoder (an empty one if nothing is stored)."""
        path = self.encoder_dir(encoder_id) / INDEX_NAME
        if not path.is_file():
            return {"version": INDEX_VERSION, "encoder_id": encoder_id, "dim": None,
                    "shards": [], "entries": {}}
        index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if index.get("encoder_id") != encoder_id:
            raise ValueError(f"{path} belongs to encoder {index.get('encoder_id')!r}, "
                             f"not {encoder_id!r}")
        return index

    def open_shard(self, encoder_id: str, shard: str) -> np.ndarray:
        """A memory-mapped, read-only view of one shard."""
        if not re.fullmatch(r"shard_\d{4,}\.npy", shard):
            raise ValueError(f"bad shard name {shard!r}")
        arr: np.ndarray = np.load(self.encoder_dir(encoder_id) / shard, mmap_mode="r",
                                  allow_pickle=False)
        return arr

    def get_or_encode(
        self,
        encoder_id: str,
        texts: Sequence[str | None],
        encode_fn: Callable[[list[str]], np.ndarray],
    ) -> np.ndarray:
        """Embeddings [len(texts), dim] float32 in the order of ``texts``.

        Only texts whose hash is not stored for ``encoder_id`` are passed (once each) to
        ``encode_fn``; sets ``last_encoded`` / ``last_cached`` (counts of distinct texts).
        """
        clean = [t if isinstance(t, str) else "" for t in texts]
        hashes = [text_hash(t) for t in clean]
        index = self.load_index(encoder_id)
        entries: dict[str, list[int]] = index["entries"]
        missing: dict[str, str] = {}
        for h, t in zip(hashes, clean, strict=True):
            if h not in entries and h not in missing:
                missing[h] = t
        self.last_encoded = len(missing)
        self.last_cached = len(set(hashes)) - len(missing)
        if missing:
            self._append(encoder_id, index, list(missing), list(missing.values()), encode_fn)
        return self.lookup(encoder_id, hashes)[0]

    def lookup(self, encoder_id: str, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [len(keys), dim] float32, found [len(keys)] bool) for arbitrary string keys.

        Rows of keys not stored are zero; ``dim`` is 0 when nothing is stored for ``encoder_id``.
        """
        index = self.load_index(encoder_id)
        entries: dict[str, list[int]] = index["entries"]
        dim = int(index["dim"]) if index["dim"] is not None else 0
        out = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.fromiter((k in entries for k in keys), dtype=bool, count=len(keys))
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            if found[pos]:
                shard, row = entries[key]
                by_shard.setdefault(shard, []).append((pos, row))
        for shard, pairs in by_shard.items():
            arr = self.open_shard(encoder_id, index["shards"][shard])
            pos_idx = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
            row_idx = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
            out[pos_idx] = arr[row_idx]
            del arr
        return out, found

    def add(self, encoder_id: str, keys: Sequence[str], emb: np.ndarray) -> int:
        """Store row ``i`` of ``emb`` under ``keys[i]``; returns how many rows were new.

        Keys already stored (or repeated within ``keys``: the first row wins) are skipped; all
        new rows go into one new shard.
        """
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"emb has shape {emb.shape} for {len(keys)} keys")
        index = self.load_index(encoder_id)
        entries: dict[str, list[int]] = index["entries"]
        new: dict[str, int] = {}
        for pos, key in enumerate(keys):
            if key not in entries and key not in new:
                new[key] = pos
        if new:
            rows = emb[list(new.values())]
            self._append(encoder_id, index, list(new), list(new), lambda _: rows)
        return len(new)

    def _append(
        self,
        encoder_id: str,
        index: dict[str, Any],
        hashes: list[str],
        texts: list[str],
        encode_fn: Callable[[list[str]], np.ndarray],
    ) -> dict[str, Any]:
        emb = np.ascontiguousarray(np.asarray(encode_fn(texts), dtype=np.float32))
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"encode_fn returned shape {emb.shape} for {len(texts)} texts")
        if index["dim"] is not None and emb.shape[1] != index["dim"]:
            raise ValueError(f"encode_fn returned dim {emb.shape[1]}, the store for "
                             f"{encoder_id!r} holds dim {index['dim']}")
        if not np.isfinite(emb).all():
            raise ValueError("encode_fn returned non-finite values")
        directory = self.encoder_dir(encoder_id)
        directory.mkdir(parents=True, exist_ok=True)
        shard_no = len(index["shards"])
        name = f"shard_{shard_no:04d}.npy"
        _atomic_write(directory / name, lambda fh: np.save(fh, emb, allow_pickle=False))
        new_index = {
            "version": INDEX_VERSION,
            "encoder_id": encoder_id,
            "dim": int(emb.shape[1]),
            "shards": [*index["shards"], name],
            "entries": {**index["entries"],
                        **{h: [shard_no, row] for row, h in enumerate(hashes)}},
        }
        payload = json.dumps(new_index, separators=(",", ":")).encode("utf-8")
        _atomic_write(directory / INDEX_NAME, lambda fh: fh.write(payload))
        return new_index
