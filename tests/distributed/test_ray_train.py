"""Ray Train graph training: 2 CPU workers (DDP over gloo) against in-process, a worker crash
resumed from the last checkpoint, and checkpoints that are always complete safetensors.

One local Ray instance serves the module (started by the fixture, always shut down)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from kgrank.config import (
    DataConfig,
    EvalConfig,
    FusionConfig,
    GraphBuildConfig,
    GraphConfig,
    GraphTrainConfig,
    RayTrainConfig,
    RunConfig,
    SplitConfig,
)
from kgrank.data.dataset import Dataset
from kgrank.data.split import Split, make_split
from kgrank.distributed.checkpoint import (
    complete_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    rng_from_json,
    rng_to_json,
)
from kgrank.distributed.session import FAIL_ENV, MARKER_ENV
from kgrank.distributed.train_fusion import train_fusion_ray
from kgrank.distributed.train_graph import shard_sampler, train_graph_model_ray
from kgrank.fusion.train import FusionInputs, FusionResult, train_fusion
from kgrank.graph.build import build_graph
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.stage import run_graph_stage
from kgrank.graph.train import EarlyStopping, GraphModelResult, train_graph_model
from tests.conftest import make_sequences

CFG = GraphTrainConfig(dim=16, layers=2, epochs=3, batch_size=128, lr=0.01, patience=10,
                       eval_metric="ndcg@10")
EVAL = EvalConfig(bootstrap=0)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # the controller polls its workers this often (default 2 s): reports, finish and failures
    # are picked up sooner
    before = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_sequences(tmp_path_factory.mktemp("seq"), n_users=80, n_items=40)


@pytest.fixture(scope="module")
def data(dataset: Dataset) -> tuple[KnowledgeGraph, Split]:
    split = make_split(dataset, SplitConfig())
    return build_graph(dataset, split, GraphBuildConfig()), split


def _ray_cfg(path: Path) -> RayTrainConfig:
    return RayTrainConfig(address="local", workers=2, storage_path=str(path), max_failures=1)


def _checkpoint_dirs(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("checkpoint_*") if p.is_dir())


def _assert_complete(storage: Path) -> None:
    dirs = _checkpoint_dirs(storage)
    assert dirs
    for d in dirs:
        assert complete_checkpoint(d), d
        for f in d.glob("*.safetensors"):
            load_file(str(f))  # a truncated file raises
        assert not [p for p in d.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def graph_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-graph")


@pytest.fixture(scope="module")
def uninterrupted(ray_local: None, dataset: Dataset, data: tuple[KnowledgeGraph, Split],
                  graph_storage: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[GraphModelResult, Path]:
    """2 workers, through the graph stage's hook (``ray.address`` set in the run config)."""
    _, split = data
    out = tmp_path_factory.mktemp("out")
    cfg = RunConfig(name="t", data=DataConfig(path=str(dataset.root)), eval=EVAL,
                    graph=GraphConfig(models=["lightgcn"], lightgcn=CFG),
                    ray=_ray_cfg(graph_storage))
    results, models = run_graph_stage(dataset, split, cfg, out, progress=False)
    assert results[0].name == "lightgcn" and "ndcg@10" in results[0].metrics
    return models["lightgcn"], out / "lightgcn"


def test_two_workers_close_to_in_process(
    uninterrupted: tuple[GraphModelResult, Path], data: tuple[KnowledgeGraph, Split]
) -> None:
    kg, split = data
    result, out = uninterrupted
    local = train_graph_model("lightgcn", kg, split, CFG, EVAL, None, progress=False)
    assert isinstance(result, GraphModelResult)
    assert result.user_emb.shape == local.user_emb.shape
    assert result.valid_user_emb is not None and result.entity_emb is None
    assert len(result.history) == CFG.epochs
    # same objective, same effective batch, other sampling streams: the loss curves agree
    ray_loss = np.array([r.loss for r in result.history])
    local_loss = np.array([r.loss for r in local.history])
    assert np.all(np.diff(ray_loss) < 0)
    np.testing.assert_allclose(ray_loss, local_loss, atol=0.02)
    assert result.best_valid is not None and local.best_valid is not None
    assert abs(result.best_valid - local.best_valid) < 0.05, (result.best_valid,
                                                              local.best_valid)
    assert (out / "best.safetensors").exists()
    assert (out / "checkpoints" / f"epoch_{CFG.epochs:03d}.safetensors").exists()
    scores = result.score(np.arange(3))
    assert scores.shape == (3, split.n_items) and torch.isfinite(scores).all()


def test_crash_resumes_from_checkpoint(
    uninterrupted: tuple[GraphModelResult, Path], data: tuple[KnowledgeGraph, Split],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    kg, split = data
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, "2")
    monkeypatch.setenv(MARKER_ENV, str(marker))
    storage = tmp_path / "ray"
    result = train_graph_model_ray("lightgcn", kg, split, CFG, EVAL, None, _ray_cfg(storage),
                                   progress=False)
    assert marker.exists()  # the worker did crash at epoch 2
    assert [r.epoch for r in result.history] == list(range(1, CFG.epochs + 1))
    # model, Adam state and every worker's RNG were restored: the resumed run is the same run
    reference = uninterrupted[0]
    np.testing.assert_allclose([r.loss for r in result.history],
                               [r.loss for r in reference.history], rtol=1e-6)
    assert result.best_valid == pytest.approx(reference.best_valid, abs=1e-6)
    torch.testing.assert_close(result.user_emb, reference.user_emb, rtol=1e-5, atol=1e-6)
    _assert_complete(storage)


def test_checkpoints_are_complete(uninterrupted: tuple[GraphModelResult, Path],
                                  graph_storage: Path) -> None:
    _assert_complete(graph_storage)
    dirs = _checkpoint_dirs(graph_storage)
    assert len(dirs) == 2  # CheckpointConfig(num_to_keep=2)
    assert all(len(list(d.glob("rng_rank*.json"))) == 2 for d in dirs)


def test_shards_keep_each_user_whole(data: tuple[KnowledgeGraph, Split]) -> None:
    _, split = data
    shards = [shard_sampler(split, r, 3) for r in range(3)]
    users = [set(np.flatnonzero(s.counts)) for s in shards]
    assert not (users[0] & users[1]) and not (users[1] & users[2])
    assert sum(s.n_interactions for s in shards) == shard_sampler(split, 0, 1).n_interactions
    u, i, j = shards[1].sample(np.random.default_rng(0), 500)
    assert set(u.tolist()) <= users[1]
    assert not shards[1].is_positive(u, j).any() and shards[1].is_positive(u, i).all()


def test_optimizer_rng_and_early_stopping_round_trip() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    tensors, rest = optimizer_to_files(opt)
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    optimizer_from_files(other, tensors, rest)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 0.1
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            torch.testing.assert_close(b["state"][idx][key], value)
    rng = np.random.default_rng(7)
    rng.random(5)
    assert rng_from_json(rng_to_json(rng)).random() == rng.random()
    stop = EarlyStopping(patience=2)
    assert stop.update(1, 0.5) and not stop.update(2, 0.4) and not stop.update(3, None)
    assert not stop.stop and not stop.update(4, 0.5) and stop.stop and stop.best_epoch == 1
    assert EarlyStopping(patience=1, validate=False).update(1, None)


def test_fusion_two_workers_resume_after_crash(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_sequences(tmp_path, n_users=150, n_items=30, seed=1)
    split = make_split(ds, SplitConfig())
    inputs = FusionInputs(
        text_item=np.random.default_rng(0).normal(size=(ds.n_items, 16)).astype(np.float32))
    cfg = FusionConfig(dim=16, hidden=32, history_len=4, epochs=2, patience=5, batch_size=128,
                       negatives=32, lr=5e-3, temperature=0.1)
    ev = EvalConfig(ks=[10], main_metric="ndcg@10", bootstrap=0)
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, "2")
    monkeypatch.setenv(MARKER_ENV, str(marker))
    result = train_fusion_ray(split, inputs, cfg, ev, tmp_path / "fusion", False,
                              ray_cfg=_ray_cfg(tmp_path / "ray"))
    local = train_fusion(split, inputs, cfg, ev, None, progress=False)
    assert marker.exists() and isinstance(result, FusionResult)
    assert [r.epoch for r in result.history] == [1, 2]
    assert result.best_valid is not None and local.best_valid is not None
    assert result.best_valid > 0.15 and abs(result.best_valid - local.best_valid) < 0.06
    assert FusionResult.load(tmp_path / "fusion").best_epoch == result.best_epoch
    _assert_complete(tmp_path / "ray")
