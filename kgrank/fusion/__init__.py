"""Fusion stage: a two-tower network over graph, text and image item embeddings and the user's
history, context and query (:mod:`kgrank.fusion.model`), trained with a logQ-corrected sampled
softmax (:mod:`kgrank.fusion.train`).

The training names are imported lazily (on first attribute access), so that serving can import
:mod:`kgrank.fusion.model` / :mod:`kgrank.fusion.inputs` without loading training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kgrank.fusion.model import FusionModel, FusionSpec, UserBatch

if TYPE_CHECKING:
    from kgrank.fusion.train import (
        MODALITIES,
        FusionEpoch,
        FusionInputs,
        FusionResult,
        train_fusion,
    )

_TRAIN_NAMES = {"MODALITIES", "FusionEpoch", "FusionInputs", "FusionResult", "train_fusion"}


def __getattr__(name: str) -> Any:
    if name in _TRAIN_NAMES:
        from kgrank.fusion import train

        return getattr(train, name)
    raise AttributeError(f"module 'kgrank.fusion' has no attribute {name!r}")


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
