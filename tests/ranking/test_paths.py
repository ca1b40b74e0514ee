"""Path attributions: exact additivity, agreement with TreeSHAP on which family matters."""

import lightgbm as lgb
import numpy as np

from kgrank.ranking.paths import PathExplainer


def _model() -> tuple[lgb.Booster, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 6))
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values take the default branch
    y = (2 * np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 3]) > 0.5).astype(int)
    group = np.full(100, 30)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": 15, "verbosity": -1,
                         "min_child_samples": 5, "seed": 0},
                        lgb.Dataset(X, label=y, group=group), num_boost_round=40)
    return booster, X


def test_contributions_sum_to_the_raw_score() -> None:
    booster, X = _model()
    families = np.zeros((6, 3))
    families[[0, 1], 0] = families[[2, 3], 1] = families[[4, 5], 2] = 1
    for n_iter in (None, 25):
        exp = PathExplainer(booster, families, n_iter)
        contrib, bias = exp.explain(X[:200])
        raw = booster.predict(X[:200], raw_score=True, num_iteration=n_iter)
        assert contrib.shape == (200, 3)
        assert np.allclose(contrib.sum(1) + bias, raw, atol=1e-9)


def test_the_family_driving_the_label_gets_the_credit() -> None:
    booster, X = _model()
    families = np.zeros((6, 3))
    families[[0, 1], 0] = families[[2, 3], 1] = families[[4, 5], 2] = 1
    contrib, _ = PathExplainer(booster, families).explain(X[:500])
    shap = booster.predict(X[:500], pred_contrib=True)[:, :-1] @ families
    mag, shap_mag = np.abs(contrib).mean(0), np.abs(shap).mean(0)
    assert mag.argmax() == shap_mag.argmax() == 0 and mag[2] < 0.1 * mag[0]
    # row by row the two attributions point the same way on the dominant family
    assert np.mean(np.sign(contrib[:, 0]) == np.sign(shap[:, 0])) > 0.9
