from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kgrank.config import LTRConfig
from kgrank.ranking.ltr import BIAS, LTRModel, rows_of, top_reasons

NAMES = ["g:score", "g rank", "text.sim", "ctx_a", "ctx_b"]  # names LightGBM would reject
FAMILIES = {"g:score": "graph", "g rank": "graph", "text.sim": "text", "ctx_a": "context",
            "ctx_b": "context"}
CFG = LTRConfig(n_estimators=60, learning_rate=0.1, num_leaves=15, min_child_samples=10,
                early_stopping_rounds=15, threads=1)
SIZE = 20


def planted(n_groups: int, seed: int, empty_share: float = 0.0):
    """One positive per group: the row with the highest 2*f0 + f2 + noise; f1, f3, f4 are noise.
    ``empty_share`` of the groups get no positive at all."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * SIZE, len(NAMES))).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values are allowed
    latent = np.nan_to_num(2 * X[:, 0] + X[:, 2]) + 0.3 * rng.normal(size=len(X))
    best = latent.reshape(n_groups, SIZE).argmax(axis=1)
    y = np.zeros((n_groups, SIZE), dtype=np.int64)
    y[np.arange(n_groups), best] = 1
    y[rng.random(n_groups) < empty_share] = 0
    return X, y.ravel(), np.full(n_groups, SIZE)


def ndcg_at(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean NDCG@k of single-positive groups of SIZE rows."""
    s, y = scores.reshape(-1, SIZE), y.reshape(-1, SIZE)
    rank = (s > s[np.arange(len(s)), y.argmax(1)][:, None]).sum(1)  # 0-based rank of the target
    return float(np.where(rank < k, 1 / np.log2(rank + 2), 0.0).mean())


@pytest.fixture(scope="module")
def fitted() -> tuple[LTRModel, np.ndarray]:
    X, y, group = planted(400, seed=0, empty_share=0.1)
    model = LTRModel().fit(X, y, group, NAMES, FAMILIES, CFG, k=5, progress=False)
    return model, X


def test_learns_planted_relevance(fitted: tuple[LTRModel, np.ndarray]) -> None:
    model, _ = fitted
    X, y, _ = planted(200, seed=1)
    ndcg = ndcg_at(model.predict(X), y, 5)
    rand = ndcg_at(np.random.default_rng(2).random(len(y)), y, 5)
    assert rand < 0.25 and ndcg > 0.6, (ndcg, rand)
    share = model.importance_by_family("gain")
    assert set(share) == {"graph", "text", "context"}
    assert abs(sum(share.values()) - 1) < 1e-9 and share["graph"] > share["context"]
    assert abs(sum(model.importance_by_family("split").values()) - 1) < 1e-9
    assert model.best_iteration >= 1 and 0 < model.best_score <= 1


def test_groups_are_never_split(fitted: tuple[LTRModel, np.ndarray]) -> None:
    model, _ = fitted
    _, y, group = planted(400, seed=0, empty_share=0.1)
    with_pos = np.flatnonzero(y.reshape(-1, SIZE).any(1))
    assert model.n_groups_dropped == 400 - len(with_pos) > 0
    train, hold = set(model.train_groups.tolist()), set(model.holdout_groups.tolist())
    assert not train & hold and train | hold == set(with_pos.tolist())
    assert len(hold) == round(CFG.holdout * len(with_pos))
    # the rows given to LightGBM for a set of groups are exactly those groups' whole row ranges
    offsets = np.array([0, 3, 5, 9, 10])
    np.testing.assert_array_equal(rows_of(offsets, np.array([2, 0])), [5, 6, 7, 8, 0, 1, 2])
    np.testing.assert_array_equal(rows_of(offsets, np.array([3])), [9])


def test_contributions_sum_to_predictions_and_aggregate_by_family(
    fitted: tuple[LTRModel, np.ndarray],
) -> None:
    model, X = fitted
    X = X[:300]
    contrib, names = model.explain(X)
    assert names == ["graph", "text", "context", BIAS] and contrib.shape == (300, 4)
    np.testing.assert_allclose(contrib.sum(1), model.predict(X), rtol=0, atol=1e-6)
    assert model.booster is not None
    raw = np.asarray(model.booster.predict(X, num_iteration=model.best_iteration,
                                           pred_contrib=True))
    np.testing.assert_allclose(contrib[:, 0], raw[:, 0] + raw[:, 1])
    np.testing.assert_allclose(contrib[:, 1], raw[:, 2])
    np.testing.assert_allclose(contrib[:, 2], raw[:, 3] + raw[:, 4])
    np.testing.assert_allclose(contrib[:, 3], raw[:, 5])


def test_save_load_round_trip(fitted: tuple[LTRModel, np.ndarray], tmp_path: Path) -> None:
    model, X = fitted
    path = tmp_path / "ltr.txt"
    model.save(path)
    meta = json.loads((tmp_path / "ltr.txt.meta.json").read_text())
    assert meta["feature_names"] == NAMES and meta["best_iteration"] == model.best_iteration
    loaded = LTRModel.load(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.explain(X)[0], model.explain(X)[0])
    assert loaded.importance_by_family() == model.importance_by_family()
    assert loaded.families == FAMILIES and loaded.k == 5 and loaded.cfg == CFG
    path.write_text(path.read_text() + "\n")  # model and sidecar no longer match
    with pytest.raises(ValueError, match="does not match"):
        LTRModel.load(path)


def logged_clicks(n_groups: int, seed: int):
    """Clicks = relevance (f0 + f2) x examination 1 / (1 + position); the logging policy ordered
    the results by f1 (+ noise), which is irrelevant but correlates with the position."""
    rng = np.random.default_rng(seed)
    size = 10
    X = rng.normal(size=(n_groups * size, 3)).astype(np.float32)
    rel = 1 / (1 + np.exp(-3 * (X[:, 0] + X[:, 2])))
    policy = (X[:, 1] + 0.5 * rng.normal(size=len(X))).reshape(n_groups, size)
    position = np.argsort(np.argsort(-policy, axis=1), axis=1).ravel().astype(np.int64)
    y = (rng.random(len(X)) < rel / (1 + position)).astype(np.int64)
    return X, y, np.full(n_groups, size), position


def test_position_bias_is_passed_to_lightgbm() -> None:
    """What this proves: positions reach LightGBM and change the model (on this seeded data, the
    feature that only correlates with the display position loses importance share), and
    ``position_bias=False`` ignores them. It does not prove the debiased model ranks better."""
    X, y, group, position = logged_clicks(3000, seed=0)
    names, fam = ["f0", "f1", "f2"], {"f0": "a", "f1": "policy", "f2": "b"}
    cfg = CFG.model_copy(update={"num_leaves": 7, "min_child_samples": 20, "n_estimators": 80})
    plain = LTRModel().fit(X, y, group, names, fam, cfg, 5, progress=False)
    debiased = LTRModel().fit(X, y, group, names, fam, cfg, 5, position=position, progress=False)
    off = LTRModel().fit(X, y, group, names, fam, cfg.model_copy(update={"position_bias": False}),
                         5, position=position, progress=False)
    assert debiased.used_position and not plain.used_position and not off.used_position
    assert not np.allclose(plain.predict(X), debiased.predict(X))
    np.testing.assert_array_equal(off.predict(X), plain.predict(X))
    share_plain = plain.importance_by_family()["policy"]
    share_debiased = debiased.importance_by_family()["policy"]
    assert share_debiased < share_plain - 0.05, (share_debiased, share_plain)


def test_clear_errors_on_bad_inputs() -> None:
    X, y, group = planted(10, seed=3)
    fit = LTRModel().fit
    with pytest.raises(ValueError, match="sum to 201"):
        fit(X, y, np.append(group, 1), NAMES, FAMILIES, CFG, 5, progress=False)
    with pytest.raises(ValueError, match="positive integers"):
        fit(X, y, np.array([SIZE * 10 + 5, -5]), NAMES, FAMILIES, CFG, 5, progress=False)
    with pytest.raises(ValueError, match="without a family"):
        fit(X, y, group, NAMES, {"g:score": "graph"}, CFG, 5, progress=False)
    with pytest.raises(ValueError, match="y must"):
        fit(X, y - 1, group, NAMES, FAMILIES, CFG, 5, progress=False)
    with pytest.raises(ValueError, match="at least 2 groups"):
        fit(X, np.zeros_like(y), group, NAMES, FAMILIES, CFG, 5, progress=False)
    with pytest.raises(ValueError, match="position"):
        fit(X, y, group, NAMES, FAMILIES, CFG, 5, position=np.zeros(3, np.int64),
            progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        LTRModel().predict(X)


def test_top_reasons() -> None:
    names = ["graph", "text", "image", BIAS]
    assert top_reasons(np.array([0.5, -0.2, 0.9, 3.0]), names) == ["image", "graph"]
    assert top_reasons(np.array([0.5, 0.7, 0.9, 3.0]), names, n=2) == ["image", "text"]
    assert top_reasons(np.array([-1.0, -2.0, 0.0, 1.0]), names) == []
