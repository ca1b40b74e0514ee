"""The graph step of ``kgrank run`` / ``kgrank train graph``: build, train, save, evaluate."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kgrank.config import RunConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import Split
from kgrank.eval.protocol import EvalResult, evaluate
from kgrank.graph.build import build_graph, graph_summary
from kgrank.graph.train import GraphModelResult, save_embeddings, train_graph_model

log = logging.getLogger("kgrank")


def run_graph_stage(
    dataset: Dataset, split: Split, cfg: RunConfig, out_dir: Path, progress: bool = True
) -> tuple[list[EvalResult], dict[str, GraphModelResult]]:
    """Build the training-split graph, train each configured model with early stopping on
    validation, save its embeddings under ``out_dir/<model>/`` and evaluate it on test.

    Returns the test results and the trained models by name (later stages use their
    embeddings)."""
    t0 = time.perf_counter()
    kg = build_graph(dataset, split, cfg.graph.build)
    summary = graph_summary(kg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "graph_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    # Row e of the KG model's `entity` embeddings is entity e here (its name and node type).
    entities = [{"name": name, "type": kg.entity_type_names[int(t)]}
                for name, t in zip(kg.entity_names, kg.entity_types, strict=True)]
    (out_dir / "entity_ids.json").write_text(json.dumps(entities) + "\n")
    log.info("graph built in %.1fs: %s", time.perf_counter() - t0, summary)
    results = []
    models: dict[str, GraphModelResult] = {}
    for name in cfg.graph.models:
        train_cfg = cfg.graph.lightgcn if name == "lightgcn" else cfg.graph.kg
        model_dir = out_dir / name
        if cfg.ray.address is not None and "graph" in cfg.ray.stages:
            from kgrank.distributed.train_graph import train_graph_model_ray

            result = train_graph_model_ray(name, kg, split, train_cfg, cfg.eval, model_dir,
                                           cfg.ray, progress, cfg.output_dir)
        else:
            result = train_graph_model(name, kg, split, train_cfg, cfg.eval, model_dir, progress)
        save_embeddings(result, model_dir, item_ids=list(dataset.items["item_id"]),
                        user_ids=list(dataset.users["user_id"]))
        test = evaluate(result.score, split, "test", cfg.eval, name=name, progress=progress)
        log.info("%s: test %s=%.4f (best epoch %s)", name, cfg.eval.main_metric,
                 test.metrics[cfg.eval.main_metric], result.best_epoch)
        results.append(test)
        models[name] = result
    return results, models
