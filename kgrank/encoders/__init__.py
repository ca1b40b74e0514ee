"""Encoders stage: text and image embeddings of catalog items and an on-disk embedding cache.

The image encoder (`kgrank.encoders.image`) is imported on demand: it pulls in open_clip.
"""

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
