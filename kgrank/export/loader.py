"""``kgrank.export.load(OUT_DIR)``: read an export for downstream code (serving, notebooks).

Loading imports no training code: Parquet, JSON, safetensors, ONNX (onnxruntime), LightGBM text
and FAISS only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kgrank.config import RunConfig, load_config
from kgrank.data.dataset import Dataset, load_dataset
from kgrank.export.manifest import ExportError, Manifest, read_manifest
from kgrank.export.tables import read_embeddings


@dataclass
class Export:
    """An export directory: its manifest and lazy accessors for every artifact."""

    root: Path
    manifest: Manifest
    _cache: dict[tuple[str, str], tuple[list[str], np.ndarray, np.ndarray | None]] = field(
        default_factory=dict, repr=False)

    def path(self, role: str) -> Path:
        """Absolute path of a file role of the manifest (``ltr_model``, ``faiss_index``, ...)."""
        if role not in self.manifest.files:
            raise ExportError(f"{self.root}: the export has no {role!r}")
        return self.root / self.manifest.files[role]

    @cached_property
    def config(self) -> RunConfig:
        """The run's config, its dataset path pointing at the export's copy."""
        return load_config(self.path("config"), [f"data.path={self.path('dataset')}"])

    @cached_property
    def dataset(self) -> Dataset:
        """The dataset copy (validated; its fingerprint must match the manifest)."""
        ds = load_dataset(self.path("dataset"))
        if ds.fingerprint != self.manifest.dataset_fingerprint:
            raise ExportError(f"{self.root}/dataset: fingerprint {ds.fingerprint} differs from "
                              f"the manifest's {self.manifest.dataset_fingerprint}")
        return ds

    @property
    def stages(self) -> list[str]:
        """Embedding stages in the export (graph_<model>, text, image, fusion)."""
        return list(dict.fromkeys(e.stage for e in self.manifest.embeddings))

    def embeddings(self, stage: str, kind: str = "items"
                   ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """``(ids, vectors [n, d] float32, present mask or None)`` of one embedding table."""
        key = (stage, kind)
        if key not in self._cache:
            entry = self.manifest.embedding(stage, kind)
            if entry is None:
                raise ExportError(f"{self.root}: no {kind} embeddings of stage {stage!r} "
                                  f"(stages: {self.stages})")
            self._cache[key] = read_embeddings(self.root / entry.path)
        return self._cache[key]

    def embedding_frame(self, stage: str, kind: str = "items") -> pd.DataFrame:
        """One embedding table as a DataFrame (``id``, ``vector`` as arrays)."""
        ids, vec, present = self.embeddings(stage, kind)
        frame = pd.DataFrame({"id": ids, "vector": list(vec)})
        if present is not None:
            frame["present"] = present
        return frame

    def tuned_params(self) -> dict[str, dict[str, Any]]:
        """Baseline name -> tuned parameters (``tuning.json``; empty when absent)."""
        if "tuning" not in self.manifest.files:
            return {}
        raw = json.loads(self.path("tuning").read_text(encoding="utf-8"))
        return {name: dict(v["best"]) for name, v in raw.items()}

    def fusion_meta(self) -> dict[str, Any]:
        return dict(json.loads(self.path("fusion_meta").read_text(encoding="utf-8")))

    def ltr_model(self) -> Any:
        """The LightGBM LambdaRank model (:class:`kgrank.ranking.ltr.LTRModel`)."""
        from kgrank.ranking.ltr import LTRModel

        return LTRModel.load(self.path("ltr_model"))

    def faiss_index(self) -> Any:
        """The FAISS inner-product index over the fused item embeddings (row = item index)."""
        import faiss

        return faiss.read_index(str(self.path("faiss_index")))

    def onnx_session(self, tower: str = "user", threads: int = 1) -> Any:
        """An onnxruntime session of ``user`` / ``item`` tower."""
        from kgrank.export.onnx import session

        return session(self.path(f"{tower}_tower"), threads)


def load(export_dir: str | Path) -> Export:
    """Open an export written by ``kgrank export`` (checks the manifest's schema version)."""
    root = Path(export_dir)
    return Export(root, read_manifest(root))
