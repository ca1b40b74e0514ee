"""Fusion-tower training (sampled softmax) with Ray Train: DDP, sharded requests, checkpoints and
resume after failures.

The driver prepares the training once (:func:`kgrank.fusion.train.prepare_fusion`: requests and
their features, the sampling distribution, validation features; query texts are encoded there,
so the workers never need the text encoder) and puts it in the object store. The training step
is :func:`kgrank.fusion.train.fusion_epoch`, the same as in-process, with
:class:`~kgrank.fusion.train.FusionLoss` wrapped by ``ray.train.torch.prepare_model`` (DDP with
``find_unused_parameters``: modality dropout can leave a modality's weights out of a step).

Data shards: every worker draws the same permutation of the ``R`` training requests each epoch
(a generator seeded ``seed``, common to all workers) and takes its own contiguous block of
``floor(R / W)`` of it (the at most ``W - 1`` remaining requests change from epoch to epoch), in
local batches of ``ceil(batch_size / W)`` (``batch_size`` with ``RayTrainConfig.split_batch``
False), so every worker makes the same number of steps and a
step averages the gradient over ``~batch_size`` requests. Each worker draws its own ``negatives``
per local batch (numpy generator seeded ``(seed, rank)``) and its own modality-dropout masks
(torch generator seeded ``seed + rank``).

Validation, early stopping and checkpoints work as in :mod:`kgrank.distributed.train_graph`;
the result is a :class:`~kgrank.fusion.train.FusionResult` like the in-process trainer's (saved
to ``out_dir`` when given).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kgrank.config import EvalConfig, FusionConfig, RayTrainConfig
from kgrank.data.split import Split
from kgrank.distributed.checkpoint import (
    BEST_FILE,
    broadcast_float,
    load_tensors,
    mean_over_workers,
    read_rank_state,
    read_state,
    report_epoch,
    restore,
    rng_from_state,
    rng_state,
    set_torch_rng_state,
    torch_rng_state,
)
from kgrank.distributed.session import (
    FailPlan,
    fit_torch_trainer,
    maybe_fail,
    run_name,
    setup_worker,
    worker_device,
)
from kgrank.fusion.inputs import QueryCache
from kgrank.fusion.train import (
    MODALITIES,
    FusionEpoch,
    FusionInputs,
    FusionLoss,
    FusionResult,
    FusionTraining,
    _state,
    build_model,
    fusion_epoch,
    log_epoch,
    prepare_fusion,
    validation_value,
)
from kgrank.graph.train import EarlyStopping

log = logging.getLogger("kgrank")


def _without_encoder(queries: QueryCache) -> QueryCache:
    """The cached query vectors without the encoder (workers only look cached queries up)."""
    out = QueryCache(None, queries.dim)
    out.texts, out.rows, out.vectors = list(queries.texts), dict(queries.rows), queries.vectors
    return out


def _fusion_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of the fusion towers."""
    import ray
    import ray.train
    import ray.train.torch

    rank, world = setup_worker(int(config["threads"]))
    split: Split
    inputs: FusionInputs
    prep: FusionTraining
    split, inputs, prep = ray.get(config["data"])
    cfg = FusionConfig.model_validate(config["cfg"])
    eval_cfg = EvalConfig.model_validate(config["eval_cfg"])
    device = worker_device(bool(config["use_gpu"]))
    cfg = cfg.model_copy(update={"device": str(device)})
    plan = FailPlan(**config["fail"])
    progress = bool(config["progress"]) and rank == 0

    model = build_model(split, inputs, cfg, prep.modalities, prep.vocab, prep.queries.dim)
    result = FusionResult(model, cfg, prep.vocab, prep.modalities, prep.queries,
                          metric=eval_cfg.main_metric)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    validate = prep.valid_feats is not None
    stopper = EarlyStopping(cfg.patience, validate)
    history: list[FusionEpoch] = []
    best_state = _state(model)
    order_rng = np.random.default_rng(cfg.seed)  # the same permutation on every worker
    rng = np.random.default_rng([cfg.seed, rank])  # this worker's negatives
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    first_epoch = 1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, best_state = restore(Path(d), model, optimizer, device)
            saved = read_rank_state(Path(d), rank, world)
        stopper = EarlyStopping(**state["stopper"])
        history = [FusionEpoch(**r) for r in state["history"]]
        first_epoch = int(state["epoch"]) + 1
        order_rng = rng_from_state(state["order_rng"])
        if saved is not None:
            rng = rng_from_state(saved["numpy"])
            set_torch_rng_state(gen, saved["torch"])
        else:  # another worker count: fresh streams, still deterministic
            rng = np.random.default_rng([cfg.seed, rank, first_epoch])
        if progress:
            print(f"fusion: resumed from epoch {first_epoch - 1} ({world} workers)", flush=True)

    targets = torch.from_numpy(prep.target).to(device)
    n_local = len(prep.target) // world
    batch_local = max(2, math.ceil(cfg.batch_size / world)) if config["split_batch"] \
        else cfg.batch_size
    loss_fn = ray.train.torch.prepare_model(
        FusionLoss(model, torch.from_numpy(prep.log_q).to(device), cfg.temperature),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    for epoch in range(first_epoch, cfg.epochs + 1):
        maybe_fail(plan, epoch, rank, world)
        start = time.perf_counter()
        model.train()
        order = order_rng.permutation(len(prep.target))[rank * n_local : (rank + 1) * n_local]
        loss = fusion_epoch(loss_fn, optimizer, prep.feats, targets, order, batch_local,
                            cfg.negatives, prep.cdf, rng, gen, device)
        seconds = time.perf_counter() - start
        loss = mean_over_workers(loss, world, device)
        model.eval()
        start = time.perf_counter()
        value = None
        if rank == 0 and prep.valid_feats is not None:
            value = validation_value(result, prep.valid_feats, split, eval_cfg)
        value = broadcast_float(value, world, device)
        record = FusionEpoch(epoch, loss, value, seconds, time.perf_counter() - start)
        history.append(record)
        if stopper.update(epoch, value):
            best_state = _state(model)
        if progress:
            log_epoch(record, eval_cfg.main_metric)
        metrics = {"epoch": epoch, "loss": loss, "seconds": seconds,
                   "valid": float("nan") if value is None else value}
        mine = {"numpy": rng_state(rng), "torch": torch_rng_state(gen)}
        if rank == 0:
            state = {"epoch": epoch, "world": world, "stopper": asdict(stopper),
                     "history": [asdict(r) for r in history],
                     "order_rng": rng_state(order_rng)}
            report_epoch(rank, metrics, mine, model, best_state, optimizer, state)
        else:
            report_epoch(rank, metrics, mine)
        if stopper.stop:
            break


def train_fusion_ray(
    split: Split,
    inputs: FusionInputs,
    cfg: FusionConfig,
    eval_cfg: EvalConfig,
    out_dir: Path | None,
    progress: bool = True,
    modalities: Collection[str] = MODALITIES,
    same_time_history: bool = False,
    *,
    ray_cfg: RayTrainConfig,
    output_dir: str | Path = "runs",
) -> FusionResult:
    """Train the fusion towers with Ray Train on ``ray_cfg.workers`` workers; the arguments of
    :func:`kgrank.fusion.train.train_fusion` (same positions) plus ``ray_cfg`` and
    ``output_dir`` (the default storage's parent), the same result (see the module docstring)."""

    prep = prepare_fusion(split, inputs, cfg, modalities, same_time_history)
    shipped = (split, replace(inputs, encode_query=None),
               replace(prep, queries=_without_encoder(prep.queries)))
    label = run_name("fusion")
    fitted, storage = fit_torch_trainer(
        _fusion_worker, shipped, {"cfg": cfg.model_dump(), "eval_cfg": eval_cfg.model_dump()},
        ray_cfg, output_dir, label, progress, "the fusion towers")
    with fitted.checkpoint.as_directory() as d:
        state = read_state(Path(d))
        best_state = load_tensors(Path(d) / BEST_FILE)
    device = torch.device(cfg.device)
    model = build_model(split, inputs, cfg, prep.modalities, prep.vocab, prep.queries.dim)
    model.load_state_dict({k: v.to(device) for k, v in best_state.items()})
    model.eval()
    stopper = EarlyStopping(**state["stopper"])
    result = FusionResult(model, cfg, prep.vocab, prep.modalities, prep.queries,
                          [FusionEpoch(**r) for r in state["history"]], stopper.best_epoch,
                          stopper.best_value, eval_cfg.main_metric, same_time_history)
    log.info("fusion: ray train (%d workers) stopped at epoch %d, best epoch %d; storage %s/%s",
             ray_cfg.workers, state["epoch"], stopper.best_epoch, storage, label)
    if out_dir is not None:
        result.save(Path(out_dir))
    return result
