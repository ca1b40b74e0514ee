"""EmbeddingStore tests: incremental encoding, atomic files, memory-mapped reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kgrank.encoders.store import EmbeddingStore


class FakeEncoder:
    """Deterministic embeddings from the text hash; records what it was asked to encode."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
        return out

    @property
    def n_encoded(self) -> int:
        return sum(len(c) for c in self.calls)


TEXTS = [f"item number {i}" for i in range(10)]


def test_second_call_encodes_nothing(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    first = store.get_or_encode("enc-a", TEXTS, enc)
    assert first.shape == (10, 8) and first.dtype == np.float32
    assert store.last_encoded == 10 and store.last_cached == 0
    np.testing.assert_array_equal(first, enc(TEXTS))
    enc.calls.clear()
    second = store.get_or_encode("enc-a", TEXTS, enc)
    assert enc.n_encoded == 0 and store.last_encoded == 0 and store.last_cached == 10
    np.testing.assert_array_equal(first, second)


def test_catalog_update_encodes_only_changes(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    store.get_or_encode("enc-a", TEXTS, enc)
    enc.calls.clear()
    updated = [*TEXTS, "new one", "new two"]
    updated[3] = "item number 3, now with a better title"
    out = store.get_or_encode("enc-a", updated, enc)
    assert enc.n_encoded == 3 and store.last_encoded == 3 and store.last_cached == 9
    assert sorted(enc.calls[0]) == sorted(["new one", "new two", updated[3]])
    np.testing.assert_array_equal(out, FakeEncoder()(updated))


def test_duplicates_and_order(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    texts = ["b", "a", "b", "", None, "a"]
    out = store.get_or_encode("enc-a", texts, enc)  # type: ignore[arg-type]
    assert enc.n_encoded == 3  # "b", "a", "" once each; None is ""
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[3], out[4])
    np.testing.assert_array_equal(out[1], FakeEncoder()(["a"])[0])
    reordered = store.get_or_encode("enc-a", ["a", "", "b"], enc)
    np.testing.assert_array_equal(reordered, out[[1, 3, 0]])


def test_different_encoder_id_does_not_reuse(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    store.get_or_encode("model/x@1:mean:len128", TEXTS, enc)
    store.get_or_encode("model/x@1:mean:len64", TEXTS, enc)
    assert enc.n_encoded == 20 and store.last_cached == 0
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(dirs) == 2 and all("/" not in d and ":" not in d for d in dirs)


def test_files_atomic_and_memory_mapped(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    store.get_or_encode("enc-a", TEXTS[:5], enc)
    store.get_or_encode("enc-a", TEXTS, enc)
    d = store.encoder_dir("enc-a")
    names = sorted(p.name for p in d.iterdir())
    assert names == ["index.json", "shard_0000.npy", "shard_0001.npy"]
    assert not list(tmp_path.rglob("*.tmp"))
    index = store.load_index("enc-a")
    assert index["shards"] == ["shard_0000.npy", "shard_0001.npy"] and index["dim"] == 8
    arr = store.open_shard("enc-a", "shard_0001.npy")
    assert isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
    assert arr.shape == (5, 8) and not arr.flags.writeable
    np.testing.assert_array_equal(arr, FakeEncoder()(TEXTS[5:]))


def test_index_survives_reopen(tmp_path: Path) -> None:
    enc = FakeEncoder()
    first = EmbeddingStore(tmp_path).get_or_encode("enc-a", TEXTS, enc)
    enc.calls.clear()
    reopened = EmbeddingStore(tmp_path)
    again = reopened.get_or_encode("enc-a", list(reversed(TEXTS)), enc)
    assert enc.n_encoded == 0 and reopened.last_cached == 10
    np.testing.assert_array_equal(again, first[::-1])


def test_failed_encode_leaves_store_unchanged(tmp_path: Path) -> None:
    store, enc = EmbeddingStore(tmp_path), FakeEncoder()
    store.get_or_encode("enc-a", TEXTS[:3], enc)

    def broken(texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts) + 1, 8), dtype=np.float32)

    with pytest.raises(ValueError, match="shape"):
        store.get_or_encode("enc-a", TEXTS, broken)
    with pytest.raises(ValueError, match="dim"):
        store.get_or_encode("enc-a", TEXTS, FakeEncoder(dim=4))
    assert len(store.load_index("enc-a")["entries"]) == 3
    assert sorted(p.name for p in store.encoder_dir("enc-a").iterdir()) == [
        "index.json", "shard_0000.npy"]
