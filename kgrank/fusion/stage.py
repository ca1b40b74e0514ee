"""The fusion step of ``kgrank run``: train the two-tower network on the earlier stages' outputs.

Graph inputs are the chosen graph model's embeddings propagated over the training graph only, for
training, validation and test alike, so that neither early stopping nor the ranker trained on the
validation period ever sees validation interactions through them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kgrank.config import RunConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import Split
from kgrank.eval.protocol import EvalResult, evaluate
from kgrank.features.context import Demographics
from kgrank.features.requests import requests_for_targets
from kgrank.fusion.train import FusionInputs, FusionResult, train_fusion

log = logging.getLogger("kgrank")

ALL_MODALITIES = ("graph", "text", "image", "context", "query", "behaviour")


def fusion_inputs(dataset: Dataset, cfg: RunConfig, art: Any) -> FusionInputs:
    """Assemble the fusion network's inputs from the graph and encoder stages' artifacts."""
    graph_user = graph_item = None
    if cfg.fusion.graph_model is not None and cfg.fusion.graph_model in art.graph:
        user, item = art.graph[cfg.fusion.graph_model].embeddings("valid")
        graph_user, graph_item = user.numpy(), item.numpy()
    enc = art.encoders
    text = None if enc is None else enc.text
    image = None if enc is None else enc.image
    demo = Demographics.from_users(dataset.users)
    has_demo = bool(demo.numeric_names or demo.categorical_names)
    return FusionInputs(
        graph_user=graph_user,
        graph_item=graph_item,
        text_item=None if text is None else text.emb,
        text_mask=None if text is None else text.mask,
        image_item=None if image is None else image.emb,
        image_mask=None if image is None else image.mask,
        encode_query=None if enc is None or enc.text_encoder is None else enc.text_encoder.encode,
        demographics=demo if has_demo else None,
    )


def available_modalities(inputs: FusionInputs, split: Split) -> list[str]:
    """Modalities the data actually carries (an ablation of an absent one would be a no-op)."""
    present = ["context", "behaviour"]
    if inputs.graph_item is not None:
        present.append("graph")
    if inputs.text_item is not None:
        present.append("text")
    if inputs.image_item is not None:
        present.append("image")
    if inputs.encode_query is not None and "query" in split.train and (
            split.train["query"].notna().any()):
        present.append("query")
    return [m for m in ALL_MODALITIES if m in present]


def _trainer(cfg: RunConfig) -> Callable[..., FusionResult]:
    """:func:`train_fusion`, or its Ray Train twin when ``ray.address`` is set and ``fusion`` is
    among ``ray.stages`` (Ray is imported only then)."""
    if cfg.ray.address is None or "fusion" not in cfg.ray.stages:
        return train_fusion
    from kgrank.distributed.train_fusion import train_fusion_ray

    return partial(train_fusion_ray, ray_cfg=cfg.ray, output_dir=cfg.output_dir)


def run_fusion_stage(
    dataset: Dataset, split: Split, cfg: RunConfig, art: Any, out_dir: Path,
    progress: bool = True, ablate: bool = False,
) -> tuple[list[EvalResult], FusionResult, dict[str, FusionResult]]:
    """Train the fusion network (and, with ``ablate``, one variant without each modality),
    evaluate it on test and save it under ``out_dir``."""
    inputs = fusion_inputs(dataset, cfg, art)
    present = available_modalities(inputs, split)
    # Training histories include the user's other events at the same timestamp (never the event
    # itself), as scoring histories do; order-free within the timestamp.
    model = _trainer(cfg)(split, inputs, cfg.fusion, cfg.eval, out_dir, progress,
                          modalities=present, same_time_history=True)
    requests = requests_for_targets(split.test)
    history = split.history("test")
    test = evaluate(model.scorer(requests, history), split, "test", cfg.eval, name="fusion",
                    progress=progress)
    log.info("fusion: test %s=%.4f (best epoch %s)", cfg.eval.main_metric,
             test.metrics[cfg.eval.main_metric], model.best_epoch)
    variants: dict[str, FusionResult] = {}
    if ablate:
        for m in present:
            keep = [x for x in present if x != m]
            variants[m] = _trainer(cfg)(split, inputs, cfg.fusion, cfg.eval, None, progress,
                                       modalities=keep, same_time_history=True)
            log.info("fusion without %s: best epoch %s", m, variants[m].best_epoch)
    return [test], model, variants
