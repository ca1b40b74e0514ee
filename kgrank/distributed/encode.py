"""Batch inference of the item encoders through Ray Data.

The inputs become a Ray dataset of ``{"row": i, "input": ...}`` rows, which ``map_batches``
sends through a fixed pool of ``num_actors`` :class:`EncoderActor` actors: each actor builds its
encoder once, from a picklable spec (a :class:`~kgrank.config.TextConfig` or
:class:`~kgrank.config.ImageConfig` dumped as a dict), and encodes batches of ``batch_size``
rows. The results are collected and put back in input order by ``row``.

Ray sets ``OMP_NUM_THREADS=1`` in its workers (ray-project/ray#15718), so each actor sets
torch's thread count to ``threads_per_actor`` itself. A local Ray instance is started (and shut
down again) only when Ray is not initialised already.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from kgrank.config import EncodeRayConfig, ImageConfig, TextConfig

log = logging.getLogger("kgrank")

EncoderKind = Literal["text", "image"]


def build_encoder(kind: EncoderKind, spec: dict[str, Any], use_gpu: bool = False) -> Any:
    """A :class:`~kgrank.encoders.text.TextEncoder` or
    :class:`~kgrank.encoders.image.ImageEncoder` from its config dict.

    With ``use_gpu`` and a CPU device in the spec, the encoder runs on ``cuda`` (inside a Ray
    actor that is the one GPU Ray assigned to it). An image spec may also carry ``aligned``: the
    path of LiT-aligned weights (:func:`kgrank.encoders.align.save_aligned`) loaded over the model.
    """
    if kind == "text":
        text = TextConfig.model_validate(spec)
        if use_gpu and text.device == "cpu":
            text = text.model_copy(update={"device": "cuda"})
        from kgrank.encoders.text import TextEncoder, TextEncoderConfig

        return TextEncoder(TextEncoderConfig(
            model=text.model, max_length=text.max_length, batch_size=text.batch_size,
            dtype=text.dtype, device=text.device,
        ))
    if kind == "image":
        rest = dict(spec)
        aligned = rest.pop("aligned", None)  # LiT-aligned weights file (not an ImageConfig field)
        image = ImageConfig.model_validate(rest)
        if use_gpu and image.device == "cpu":
            image = image.model_copy(update={"device": "cuda"})
        from kgrank.encoders.image import ImageEncoder

        return ImageEncoder(model_name=image.model_name, pretrained=image.pretrained,
                            checkpoint=image.checkpoint, device=image.device,
                            batch_size=image.batch_size, aligned=aligned, image_size=image.image_size)
    raise ValueError(f"unknown encoder kind {kind!r} (text or image)")


class EncoderActor:
    """Ray Data callable class: one encoder per actor, built once in ``__init__``.

    ``__call__`` maps a numpy batch ``{"row", "input"}`` to ``{"row", "emb", "ok", "reason"}``:
    embeddings [B, dim] float32, whether each input was encoded, and why not (or "").
    """

    def __init__(self, kind: EncoderKind, spec: dict[str, Any], threads: int = 1,
                 use_gpu: bool = False) -> None:
        import torch

        torch.set_num_threads(threads)
        self.kind = kind
        self.encoder = build_encoder(kind, spec, use_gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [None if x is None else str(x) for x in batch["input"]]
        reasons = ["" for _ in inputs]
        if self.kind == "text":
            emb = np.asarray(self.encoder.encode(inputs), dtype=np.float32)
            ok = np.array([x is not None for x in inputs], dtype=bool)
            emb[~ok] = 0.0
            for i in np.flatnonzero(~ok):
                reasons[i] = "no text"
        else:
            emb, ok = self.encoder.encode_paths(inputs)
            for i, _path, reason in self.encoder.failures:
                reasons[i] = reason
        return {"row": np.asarray(batch["row"], dtype=np.int64), "emb": emb,
                "ok": np.asarray(ok, dtype=bool), "reason": np.array(reasons, dtype=object)}


def _start_ray(ray_cfg: EncodeRayConfig) -> bool:
    """Initialise Ray unless it is already; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Ray 2.60 sets up token authentication (and writes a token file) unless told otherwise.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING)
    return True


def _actor_cpus(ray_cfg: EncodeRayConfig) -> float:
    """CPUs reserved per actor: ``threads_per_actor``, shrunk so that the pool fits the cluster."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    cpus = float(ray_cfg.threads_per_actor)
    if total > 0 and cpus * ray_cfg.num_actors > total:
        cpus = total / ray_cfg.num_actors
        log.warning("ray: %d actors x %d threads exceed the %g CPUs of the cluster; reserving "
                    "%.2f CPU per actor", ray_cfg.num_actors, ray_cfg.threads_per_actor, total,
                    cpus)
    return cpus


def encode_with_ray_detailed(
    kind: EncoderKind,
    inputs: Sequence[str | None],
    encoder_spec: dict[str, Any],
    ray_cfg: EncodeRayConfig,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Like :func:`encode_with_ray`, plus the reason each input that failed was not encoded."""
    n = len(inputs)
    todo = [i for i, x in enumerate(inputs) if x is not None]
    reasons = ["no text" if kind == "text" else "no path" for _ in inputs]
    for i in todo:
        reasons[i] = ""
    if not todo:
        return np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=bool), reasons
    import ray
    import ray.data

    t0 = time.perf_counter()
    started = _start_ray(ray_cfg)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        rows = [{"row": i, "input": inputs[i]} for i in todo]
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, math.ceil(len(rows) / ray_cfg.batch_size))
        )
        out = ds.map_batches(
            EncoderActor,
            fn_constructor_kwargs={"kind": kind, "spec": dict(encoder_spec),
                                   "threads": ray_cfg.threads_per_actor,
                                   "use_gpu": ray_cfg.use_gpu},
            batch_size=ray_cfg.batch_size,
            batch_format="numpy",
            # ``concurrency=`` is deprecated since Ray 2.51: a fixed-size actor pool instead
            compute=ray.data.ActorPoolStrategy(size=ray_cfg.num_actors),
            num_cpus=_actor_cpus(ray_cfg),
            num_gpus=1 if ray_cfg.use_gpu else 0,
        )
        emb: np.ndarray | None = None
        ok = np.zeros(n, dtype=bool)
        seen = 0
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            idx = np.asarray(batch["row"], dtype=np.int64)
            part = np.asarray(batch["emb"], dtype=np.float32)
            if emb is None:
                emb = np.zeros((n, part.shape[1]), dtype=np.float32)
            emb[idx] = part
            ok[idx] = np.asarray(batch["ok"], dtype=bool)
            for i, reason in zip(idx.tolist(), batch["reason"], strict=True):
                reasons[i] = str(reason)
            seen += len(idx)
    finally:
        if started:
            ray.shutdown()
    if emb is None or seen != len(todo):
        raise RuntimeError(f"ray returned {seen} rows for {len(todo)} {kind} inputs")
    log.info("ray: encoded %d %s inputs with %d actors in %.1fs", len(todo), kind,
             ray_cfg.num_actors, time.perf_counter() - t0)
    return emb, ok, reasons


def encode_with_ray(
    kind: EncoderKind,
    inputs: Sequence[str | None],
    encoder_spec: dict[str, Any],
    ray_cfg: EncodeRayConfig,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``inputs`` (texts, or image file paths) with a Ray Data actor pool.

    Returns (embeddings [n, dim] float32, ok [n] bool) in input order; ``None`` inputs and
    images that cannot be read give zero rows with ok False (dim is 0 when nothing was encoded).
    ``encoder_spec`` is a :class:`~kgrank.config.TextConfig` / :class:`~kgrank.config.ImageConfig`
    as a dict; model paths in it must be valid on the Ray workers (absolute for a remote cluster).
    """
    emb, ok, _ = encode_with_ray_detailed(kind, inputs, encoder_spec, ray_cfg, progress)
    return emb, ok
