"""Graph-model BPR training (LightGCN / KG model) with Ray Train: DDP, sharded sampling,
checkpoints and resume after failures.

The training step is :func:`kgrank.graph.train.bpr_epoch`, the same as in-process; here
``loss_fn`` is :class:`~kgrank.graph.train.BPRLoss` wrapped by ``ray.train.torch.prepare_model``
(DDP: gloo on CPU, NCCL on GPU), so gradients are averaged over the workers after every step.

Data shards: worker ``r`` of ``W`` owns the users ``u`` with ``u mod W == r`` and samples BPR
triples only from their training interactions (its own :class:`~kgrank.graph.sampling.BPRSampler`,
so a negative is never one of the user's positives). Each worker draws ``ceil(N / W)`` triples
per epoch (``N`` training interactions) in steps of ``ceil(batch_size / W)``: every worker makes
the same number of steps and a step averages the gradient over ``~batch_size`` triples, as
in-process (``RayTrainConfig.split_batch``). As every step propagates the whole graph, that
leaves each worker with about the in-process work per epoch; ``split_batch=False`` (steps of
``batch_size`` per worker: a ``W`` times larger global batch, ``W`` times fewer steps) is the
mode that can cut the epoch time. Worker RNGs are seeded ``(seed, rank)``.

Validation: rank 0 scores the validation part with the project's judge after every
``eval_every`` epochs and broadcasts the value; every worker applies the same
:class:`~kgrank.graph.train.EarlyStopping`, so they stop together.

Checkpoints (:mod:`kgrank.distributed.checkpoint`) after every epoch through
``ray.train.report``: weights, best weights, Adam state, early stopping, history and every
worker's RNG. After a worker failure Ray Train restarts the group (``FailureConfig``) and
``ray.train.get_checkpoint()`` resumes from the last epoch reported. The driver rebuilds the
model from the final checkpoint's best weights and returns a
:class:`~kgrank.graph.train.GraphModelResult` like the in-process trainer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kgrank.config import EvalConfig, GraphTrainConfig, RayTrainConfig
from kgrank.data.split import Split
from kgrank.distributed.checkpoint import (
    BEST_FILE,
    MODEL_FILE,
    broadcast_float,
    load_tensors,
    mean_over_workers,
    read_rank_state,
    read_state,
    report_epoch,
    restore,
    rng_from_state,
    rng_state,
)
from kgrank.distributed.session import (
    FailPlan,
    fit_torch_trainer,
    maybe_fail,
    run_name,
    setup_worker,
    worker_device,
)
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.sampling import BPRSampler
from kgrank.graph.train import (
    BPRLoss,
    EarlyStopping,
    EpochRecord,
    GraphModelResult,
    ModelName,
    _metric_eval_config,
    _state,
    bpr_epoch,
    build_model,
    finish_result,
    log_epoch,
    save_state,
    validation_value,
)

log = logging.getLogger("kgrank")


def shard_sampler(split: Split, rank: int, world: int) -> BPRSampler:
    """The BPR sampler of worker ``rank``: the training interactions of users ``u mod world ==
    rank`` (all of a user's positives stay in one shard)."""
    train = split.train
    users = train["user_idx"].to_numpy()
    mine = users % world == rank
    return BPRSampler(users[mine], train["item_idx"].to_numpy()[mine], split.n_users,
                      split.n_items)


def _graph_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of the graph models."""
    import ray
    import ray.train
    import ray.train.torch

    rank, world = setup_worker(int(config["threads"]))
    name: ModelName = config["name"]
    kg: KnowledgeGraph
    split: Split
    kg, split = ray.get(config["data"])
    cfg = GraphTrainConfig.model_validate(config["cfg"])
    eval_cfg = EvalConfig.model_validate(config["eval_cfg"])
    device = worker_device(bool(config["use_gpu"]))
    cfg = cfg.model_copy(update={"device": str(device)})
    plan = FailPlan(**config["fail"])
    progress = bool(config["progress"]) and rank == 0

    model = build_model(name, kg, cfg)
    g: Any = model.graph(kg, cfg.weighted)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                 fused=True if device.type in ("cpu", "cuda") else None)
    validate = len(split.valid) > 0
    valid_cfg = _metric_eval_config(eval_cfg, cfg.eval_metric)
    stopper = EarlyStopping(cfg.patience, validate)
    history: list[EpochRecord] = []
    best_state = _state(model)
    rng = np.random.default_rng([cfg.seed, rank])
    first_epoch = 1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, best_state = restore(Path(d), model, optimizer, device)
            saved = read_rank_state(Path(d), rank, world)
        stopper = EarlyStopping(**state["stopper"])
        history = [EpochRecord(**r) for r in state["history"]]
        first_epoch = int(state["epoch"]) + 1
        rng = rng_from_state(saved["numpy"]) if saved is not None else \
            np.random.default_rng([cfg.seed, rank, first_epoch])  # another worker count
        if progress:
            print(f"{name}: resumed from epoch {first_epoch - 1} ({world} workers)", flush=True)

    sampler = shard_sampler(split, rank, world)
    train = split.train
    n_total = BPRSampler(train["user_idx"].to_numpy(), train["item_idx"].to_numpy(),
                         split.n_users, split.n_items).n_interactions
    n_local = math.ceil(n_total / world)
    batch_local = math.ceil(cfg.batch_size / world) if config["split_batch"] else cfg.batch_size
    loss_fn = ray.train.torch.prepare_model(
        BPRLoss(model, g, cfg.reg),
        parallel_strategy_kwargs={"find_unused_parameters": name == "kg"},
    )
    for epoch in range(first_epoch, cfg.epochs + 1):
        maybe_fail(plan, epoch, rank, world)
        start = time.perf_counter()
        model.train()
        loss = bpr_epoch(loss_fn, optimizer, sampler.sample(rng, n_local), batch_local, device,
                         f"{name} epoch {epoch}", False)
        seconds = time.perf_counter() - start
        loss = mean_over_workers(loss, world, device)
        model.eval()
        start = time.perf_counter()
        value = None
        if rank == 0 and validate and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            value = validation_value(model, g, split, cfg, valid_cfg, name)
        value = broadcast_float(value, world, device)
        record = EpochRecord(epoch, loss, value, seconds, time.perf_counter() - start)
        history.append(record)
        if stopper.update(epoch, value):
            best_state = _state(model)
        if progress:
            log_epoch(name, record, cfg.eval_metric)
        metrics = {"epoch": epoch, "loss": loss, "seconds": seconds,
                   "valid": float("nan") if value is None else value}
        state = {"epoch": epoch, "world": world, "stopper": asdict(stopper),
                 "history": [asdict(r) for r in history], "model": name}
        start = time.perf_counter()
        if rank == 0:
            report_epoch(rank, metrics, {"numpy": rng_state(rng)}, model, best_state, optimizer,
                         state)
        else:
            report_epoch(rank, metrics, {"numpy": rng_state(rng)})
        # checkpoint write + upload + report; in the checkpoints of the following epochs
        record.extra["report_seconds"] = time.perf_counter() - start
        if stopper.stop:
            break


def train_graph_model_ray(
    name: ModelName,
    kg: KnowledgeGraph,
    split: Split,
    cfg: GraphTrainConfig,
    eval_cfg: EvalConfig,
    out_dir: Path | None,
    ray_cfg: RayTrainConfig,
    progress: bool = True,
    output_dir: str | Path = "runs",
) -> GraphModelResult:
    """Train ``name`` with Ray Train on ``ray_cfg.workers`` workers; the same result as
    :func:`kgrank.graph.train.train_graph_model` (see the module docstring).

    With ``out_dir`` the final checkpoint's best weights go to ``out_dir/best.safetensors`` and
    its last weights to ``out_dir/checkpoints/epoch_NNN.safetensors``, as in-process."""

    if (kg.n_users, kg.n_items) != (split.n_users, split.n_items):
        raise ValueError("graph and split disagree on the number of users / items")
    label = run_name(f"graph-{name}")
    result, storage = fit_torch_trainer(
        _graph_worker, (kg, split), {"name": name, "cfg": cfg.model_dump(),
                                     "eval_cfg": eval_cfg.model_dump()},
        ray_cfg, output_dir, label, progress, name)
    with result.checkpoint.as_directory() as d:
        directory = Path(d)
        state = read_state(directory)
        best_state = load_tensors(directory / BEST_FILE)
        if out_dir is not None:
            out = Path(out_dir)
            meta = {"model": name, "config": cfg.model_dump_json(), "epoch": str(state["epoch"])}
            save_state(best_state, out / BEST_FILE, meta)
            save_state(load_tensors(directory / MODEL_FILE),
                       out / "checkpoints" / f"epoch_{int(state['epoch']):03d}.safetensors", meta)
    model = build_model(name, kg, cfg)
    g: Any = model.graph(kg, cfg.weighted)
    history = [EpochRecord(**r) for r in state["history"]]
    stopper = EarlyStopping(**state["stopper"])
    log.info("%s: ray train (%d workers) stopped at epoch %d, best epoch %d; storage %s/%s",
             name, ray_cfg.workers, state["epoch"], stopper.best_epoch, storage, label)
    return finish_result(name, model, kg, split, cfg, g, best_state, history, stopper)
