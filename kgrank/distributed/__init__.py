"""Distributed execution with Ray: the only kgrank package that imports ``ray``.

Ray is imported inside the functions that need it, so importing this package (or a stage that
may use it) never starts or even loads Ray. Modules: ``encode`` (Ray Data batch inference of the
encoders), ``train_graph`` / ``train_fusion`` (Ray Train ``TorchTrainer`` runners of the training
loops, with ``session`` and ``checkpoint``), ``ltr`` (data-parallel LightGBM LambdaRank on whole
query groups).
"""

from __future__ import annotations

from kgrank.distributed.encode import EncoderActor, encode_with_ray, encode_with_ray_detailed

__all__ = ["EncoderActor", "encode_with_ray", "encode_with_ray_detailed"]
