"""Distributed execution with Ray: the only kgrank package that imports ``ray``.

Ray is imported inside the functions that need it, so importing this package (or a stage that
may use it) never starts or even loads Ray.
"""

from __future__ import annotations

from kgrank.distributed.encode import EncoderActor, encode_with_ray, encode_with_ray_detailed

__all__ = ["EncoderActor", "encode_with_ray", "encode_with_ray_detailed"]
