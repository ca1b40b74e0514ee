"""Data-parallel LightGBM LambdaRank on Ray, with every query group inside one worker's shard.

LambdaRank's gradients are computed per query group (all pairs of a group's rows), so a group
split across machines loses its cross-partition pairs and its NDCG normalisation: LightGBM's
Dask ranker has exactly this failure when partitions cut groups (microsoft/LightGBM#5676). Here
the shards are built from whole groups: :func:`partition_groups` assigns each training group to
one worker (largest groups first, to the worker with the fewest rows so far), and a worker's rows
are its groups' rows, group by group.

Training runs in Ray Train's ``LightGBMTrainer`` (Ray 2.60, Train V2): its backend gives every
worker LightGBM's socket-network parameters (``machines``, ``local_listen_port``,
``num_machines``; :func:`ray.train.lightgbm.get_network_params`), and each worker calls
``lightgbm.train`` on its own shard with ``tree_learner="data"`` and ``pre_partition=True``:
histograms are all-reduced over the network, so every worker grows the same trees. The trainer's
Ray Data ingestion is not used, because Ray Data splits blocks by rows and would cut groups;
each worker instead fetches its own shard from the object store.

The early-stopping holdout is the same seeded set of whole groups as
:meth:`kgrank.ranking.ltr.LTRModel.fit`, and every worker evaluates the full holdout, so the
NDCG@k that drives early stopping is identical on all workers and they stop at the same round.
Rank 0 writes the model text into the reported checkpoint; the driver loads it into an
:class:`~kgrank.ranking.ltr.LTRModel` (text model, no pickle) that predicts, explains and saves
like one fitted in-process.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kgrank.config import LTRConfig, RayTrainConfig
from kgrank.distributed.session import fit_trainer, run_name, setup_worker
from kgrank.io import atomic_write_text
from kgrank.ranking.ltr import LTRModel, lgb_names, rows_of

log = logging.getLogger("kgrank")

MODEL_TXT = "ltr_model.txt"


def partition_groups(sizes: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """Split group indices ``0..len(sizes)-1`` into ``n_parts`` sets of whole groups with
    balanced row counts (greedy: largest group first to the lightest part); each set sorted."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    if len(sizes) < n_parts:
        raise ValueError(f"{len(sizes)} groups cannot fill {n_parts} workers (each needs one)")
    load = np.zeros(n_parts, dtype=np.int64)
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for g in np.argsort(-sizes, kind="stable"):
        p = int(np.argmin(load))
        parts[p].append(int(g))
        load[p] += sizes[g]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _ltr_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: LightGBM on this worker's whole groups."""
    import lightgbm as lgb
    import ray
    import ray.train
    from ray.train.lightgbm import get_network_params

    rank, world = setup_worker(int(config["threads"]))
    shard = ray.get(config["shards"][rank])
    hold = ray.get(config["holdout"])
    names = list(config["names"])
    if int(shard["sizes"].sum()) != len(shard["X"]):
        raise RuntimeError(f"rank {rank}: shard rows do not add up to whole groups")
    params = {**config["params"], "num_threads": int(config["threads"])}
    if world > 1:
        params.update(get_network_params())
        params.update({"tree_learner": "data", "pre_partition": True})
    train = lgb.Dataset(shard["X"], label=shard["y"], group=shard["sizes"], feature_name=names,
                        position=shard.get("position"), params={"verbosity": -1})
    valid = lgb.Dataset(hold["X"], label=hold["y"], group=hold["sizes"], reference=train,
                        feature_name=names, params={"verbosity": -1})
    booster = lgb.train(params, train, num_boost_round=int(config["rounds"]),
                        valid_sets=[valid], valid_names=["holdout"],
                        callbacks=[lgb.early_stopping(int(config["early_stopping"]),
                                                      verbose=False)])
    best = int(booster.best_iteration or booster.current_iteration())
    k = int(config["k"])
    score = booster.best_score.get("holdout", {}).get(f"ndcg@{k}")
    with tempfile.TemporaryDirectory(prefix="kgrank-ltr-") as tmp:
        atomic_write_text(Path(tmp) / f"shard_rank{rank}.json",
                          json.dumps({"groups": shard["groups"].tolist(),
                                      "rows": len(shard["X"])}))
        if rank == 0:
            atomic_write_text(Path(tmp) / MODEL_TXT, booster.model_to_string())
            atomic_write_text(Path(tmp) / "info.json", json.dumps({
                "best_iteration": best, "rounds": booster.current_iteration(),
                "best_score": None if score is None else float(score)}))
        ray.train.report({"best_iteration": best},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def fit_ltr_ray_detailed(
    X: np.ndarray,
    y: np.ndarray,
    group: np.ndarray,
    feature_names: Sequence[str],
    families: Mapping[str, str],
    cfg: LTRConfig,
    k: int,
    ray_cfg: RayTrainConfig,
    position: np.ndarray | None = None,
    output_dir: str | Path = "runs",
) -> tuple[LTRModel, list[np.ndarray]]:
    """:func:`fit_ltr_ray` plus the training-group indices (into ``group``) of each worker."""
    import ray
    from ray.train.lightgbm import LightGBMTrainer

    model = LTRModel()
    # the same checks, metadata and seeded holdout of whole groups as LTRModel.fit
    X, y, offsets, position = model.prepare(X, y, group, feature_names, families, cfg, k,
                                            position)
    sizes = np.diff(offsets)
    parts = [model.train_groups[p] for p in
             partition_groups(sizes[model.train_groups], ray_cfg.workers)]

    def shard(groups: np.ndarray, pos: bool) -> dict[str, Any]:
        rows = rows_of(offsets, groups)
        out: dict[str, Any] = {"X": X[rows], "y": y[rows].astype(np.int32),
                               "sizes": sizes[groups], "groups": groups}
        if pos and position is not None:
            out["position"] = np.asarray(position)[rows]
        return out

    def make(scaling: Any, run_cfg: Any) -> Any:
        return LightGBMTrainer(
            _ltr_worker,
            train_loop_config={
                "shards": [ray.put(shard(p, model.used_position)) for p in parts],
                "holdout": ray.put(shard(model.holdout_groups, False)),
                "names": lgb_names(model.feature_names), "params": model.params(cfg, k),
                "rounds": cfg.n_estimators, "early_stopping": cfg.early_stopping_rounds,
                "k": k, "threads": ray_cfg.threads_per_worker,
            },
            scaling_config=scaling, run_config=run_cfg,
        )

    # LightGBM's data-parallel learner here is CPU-only
    result, _ = fit_trainer(make, ray_cfg, output_dir, run_name("ltr"), "the LambdaRank model",
                            use_gpu=False)
    import lightgbm as lgb

    with result.checkpoint.as_directory() as d:
        directory = Path(d)
        model.booster = lgb.Booster(model_str=(directory / MODEL_TXT).read_text())
        info = json.loads((directory / "info.json").read_text())
        shards = [np.asarray(json.loads((directory / f"shard_rank{r}.json").read_text())
                             ["groups"], dtype=np.int64) for r in range(ray_cfg.workers)]
    model.best_iteration = int(info["best_iteration"])
    model.best_score = float("nan") if info["best_score"] is None else float(info["best_score"])
    log.info("LTR on Ray (%d workers, whole groups): best iteration %d of %d, holdout ndcg@%d="
             "%.4f", ray_cfg.workers, model.best_iteration, info["rounds"], k, model.best_score)
    return model, shards


def fit_ltr_ray(
    X: np.ndarray,
    y: np.ndarray,
    group: np.ndarray,
    feature_names: Sequence[str],
    families: Mapping[str, str],
    cfg: LTRConfig,
    k: int,
    ray_cfg: RayTrainConfig,
    position: np.ndarray | None = None,
    output_dir: str | Path = "runs",
) -> LTRModel:
    """Fit a :class:`~kgrank.ranking.ltr.LTRModel` (same arguments as ``LTRModel.fit``) with
    data-parallel LightGBM on ``ray_cfg.workers`` Ray workers; see the module docstring."""
    return fit_ltr_ray_detailed(X, y, group, feature_names, families, cfg, k, ray_cfg, position,
                                output_dir)[0]
