"""Embedding tables as Parquet: an ``id`` string column + a fixed-size float32 ``vector`` column
(+ an optional boolean ``present`` column for modalities some items lack)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_embeddings(path: Path, ids: list[str], vectors: np.ndarray,
                     present: np.ndarray | None = None) -> None:
    """Write ``[len(ids), d]`` float32 ``vectors`` keyed by ``ids``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"{path.name}: {vectors.shape} vectors for {len(ids)} ids")
    col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                            vectors.shape[1])
    arrays = {"id": pa.array([str(i) for i in ids], pa.string()), "vector": col}
    if present is not None:
        arrays["present"] = pa.array(np.asarray(present, dtype=bool))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """``(ids, vectors [n, d] float32, present or None)`` of a table written by
    :func:`write_embeddings`."""
    table = pq.read_table(path)
    ids = [str(i) for i in table.column("id").to_pylist()]
    vec = table.column("vector").combine_chunks()
    dim = vec.type.list_size
    flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    present = (table.column("present").to_numpy().astype(bool)
               if "present" in table.column_names else None)
    return ids, flat.reshape(len(ids), dim), present
