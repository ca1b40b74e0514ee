"""Data-parallel LightGBM LambdaRank on Ray: query groups are never split across workers, and
the model trains, early-stops and predicts like an in-process one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from kgrank.config import RayTrainConfig
from kgrank.distributed.ltr import fit_ltr_ray_detailed, partition_groups
from kgrank.ranking.ltr import LTRModel
from tests.ranking.test_ltr import CFG, FAMILIES, NAMES, ndcg_at, planted


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    before = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)


def test_partition_keeps_groups_whole_and_balanced() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, size=101)
    parts = partition_groups(sizes, 3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(101))  # every group once, in one part only
    rows = [int(sizes[p].sum()) for p in parts]
    assert max(rows) - min(rows) <= sizes.max()
    with pytest.raises(ValueError, match="cannot fill"):
        partition_groups(sizes[:2], 3)


def test_two_workers_train_on_whole_groups_and_predict(ray_local: None, tmp_path: Path) -> None:
    # 300 groups of 20 rows, 10% without a positive (dropped before sharding)
    X, y, _ = planted(300, seed=0, empty_share=0.1)
    sizes = np.full(300, 20)
    ray_cfg = RayTrainConfig(address="local", workers=2, storage_path=str(tmp_path))
    model, shards = fit_ltr_ray_detailed(X, y, sizes, NAMES, FAMILIES, CFG, 5, ray_cfg)
    assert isinstance(model, LTRModel)
    # the workers' shards are disjoint sets of whole training groups that cover them all
    assert len(shards) == 2 and all(len(s) for s in shards)
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert sorted(np.concatenate(shards).tolist()) == model.train_groups.tolist()
    assert not set(model.train_groups.tolist()) & set(model.holdout_groups.tolist())
    Xt, yt, _ = planted(200, seed=1)
    ndcg = ndcg_at(model.predict(Xt), yt, 5)
    local = LTRModel().fit(X, y, sizes, NAMES, FAMILIES, CFG, k=5, progress=False)
    assert ndcg > 0.6 and abs(ndcg - ndcg_at(local.predict(Xt), yt, 5)) < 0.1
    assert model.best_iteration >= 1 and 0 < model.best_score <= 1
    contrib, names = model.explain(Xt[:4])
    np.testing.assert_allclose(contrib.sum(1), model.predict(Xt[:4]), rtol=1e-6, atol=1e-6)
    model.save(tmp_path / "m.txt")
    np.testing.assert_allclose(LTRModel.load(tmp_path / "m.txt").predict(Xt), model.predict(Xt))
