"""Fusion stage: a two-tower network over graph, text and image item embeddings and the user's
history, context and query (:mod:`kgrank.fusion.model`), trained with a logQ-corrected sampled
softmax (:mod:`kgrank.fusion.train`)."""

from kgrank.fusion.model import FusionModel, FusionSpec, UserBatch
from kgrank.fusion.train import (
    MODALITIES,
    FusionEpoch,
    FusionInputs,
    FusionResult,
    train_fusion,
)

__all__ = [
    "MODALITIES",
    "FusionEpoch",
    "FusionInputs",
    "FusionModel",
    "FusionResult",
    "FusionSpec",
    "UserBatch",
    "train_fusion",
]
