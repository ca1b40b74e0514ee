"""Export of a finished run for serving: embeddings (Parquet), FAISS index, ONNX fusion towers,
the LightGBM model, a manifest; :func:`load` reads it back."""

from kgrank.export.loader import Export, load
from kgrank.export.manifest import SCHEMA_VERSION, ExportError

__all__ = ["SCHEMA_VERSION", "Export", "ExportError", "load"]
