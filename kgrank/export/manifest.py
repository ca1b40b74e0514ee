"""``manifest.json`` of an export: what is in it and what it was made from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Bumped whenever the export layout changes incompatibly; :func:`read_manifest` checks it."""
MANIFEST_FILE = "manifest.json"


class ExportError(ValueError):
    """An export directory that is missing, incomplete or of another schema version."""


@dataclass
class EmbeddingEntry:
    """One Parquet embedding table: ``id`` (string) + ``vector`` (fixed-size float32 list)."""

    stage: str
    """graph_<model> / text / image / fusion."""
    kind: str
    """items / users."""
    path: str
    """Relative to the export directory."""
    dim: int
    rows: int
    normalised: bool
    """Rows are L2-normalised (zero rows for items without that modality)."""
    note: str = ""


@dataclass
class Manifest:
    """The contents of ``manifest.json``."""

    schema_version: int
    kgrank_version: str
    config_hash: str
    """SHA-256 of the run config (canonical JSON of the resolved config)."""
    dataset_fingerprint: str
    run_name: str
    run_dir: str
    created_at: str
    n_users: int
    n_items: int
    similarity: str
    """The ANN index's metric: inner product over L2-normalised fused item embeddings (cosine)."""
    embeddings: list[EmbeddingEntry] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """Role -> relative path (config, dataset, ltr_model, faiss_index, user_tower, item_tower,
    fusion_meta, fusion_weights, ...)."""
    onnx_check: dict[str, float] = field(default_factory=dict)
    """Max |onnxruntime - torch| of each tower at export time."""
    ltr_metric: dict[str, float] = field(default_factory=dict)
    """The run's test metrics of ``fusion+ltr`` (what a round trip must reproduce)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def embedding(self, stage: str, kind: str) -> EmbeddingEntry | None:
        for e in self.embeddings:
            if e.stage == stage and e.kind == kind:
                return e
        return None


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def now_utc() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")


def read_manifest(export_dir: Path) -> Manifest:
    """Read and check ``manifest.json``; raises :class:`ExportError` naming the problem."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{export_dir}: not an export directory (no {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ExportError(f"{path}: schema_version {raw.get('schema_version')!r}, this kgrank "
                          f"reads {SCHEMA_VERSION}")
    raw["embeddings"] = [EmbeddingEntry(**e) for e in raw.get("embeddings", [])]
    return Manifest(**raw)
