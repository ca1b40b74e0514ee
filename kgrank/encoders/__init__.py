"""Encoders stage: text embeddings of catalog items and an on-disk embedding cache."""

from __future__ import annotations

from kgrank.encoders.store import EmbeddingStore
from kgrank.encoders.text import TextEncoder, TextEncoderConfig, default_text_model_dir, item_text

__all__ = [
    "EmbeddingStore",
    "TextEncoder",
    "TextEncoderConfig",
    "default_text_model_dir",
    "item_text",
]
