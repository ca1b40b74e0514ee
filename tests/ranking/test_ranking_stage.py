"""The ranking stage on a tiny demo shop: trains on validation only, ranks test, explains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kgrank.config import RunConfig, load_config
from kgrank.data.dataset import Dataset
from kgrank.data.demo import DemoConfig, generate_demo
from kgrank.data.split import Split, make_split
from kgrank.pipeline import _ranking_baselines, item_texts
from kgrank.ranking.stage import FULL, RankingInputs, RankingStage, run_ranking_stage

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Split, RunConfig]:
    root = tmp_path_factory.mktemp("rank")
    dataset = generate_demo(root / "shop", DemoConfig(n_users=250, n_items=150, seed=1))
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.path={root / 'shop'}", "eval.bootstrap=20", "ranking.enabled=true",
        "ranking.candidates=30", "ranking.ltr.n_estimators=30", "ranking.ltr.threads=1",
        "ranking.ltr.min_child_samples=5", "ranking.ablations=true",
    ])
    return dataset, make_split(dataset, cfg.data.split), cfg


def _inputs(dataset: Dataset, cfg: RunConfig) -> RankingInputs:
    return RankingInputs(baselines=_ranking_baselines(cfg, []), item_texts=item_texts(dataset))


def test_stage_ranks_test_and_writes_artifacts(
    shop: tuple[Dataset, Split, RunConfig], tmp_path: Path
) -> None:
    dataset, split, cfg = shop
    out = run_ranking_stage(dataset, split, cfg, _inputs(dataset, cfg), tmp_path, progress=False)
    names = [r.name for r in out.results]
    assert names[0] == FULL and f"{FULL} -behaviour" in names and f"{FULL} -context" in names
    for r in out.results:
        assert r.part == "test" and 0.0 <= r.metrics["ndcg@10"] <= 1.0
    assert 0.0 < out.candidate_recall["test"]["union"] <= 1.0
    assert out.info["train_requests"] <= len(split.valid)
    assert abs(sum(out.importance.values()) - 1.0) < 1e-6
    for name in ("ltr_model.txt", "candidate_recall.json", "importance.json", "explanations.json"):
        assert (tmp_path / name).is_file()
    ex = json.loads((tmp_path / "explanations.json").read_text())[0]["results"][0]
    assert abs(sum(ex["why"].values()) - ex["score"]) < 1e-4 and "bias" in ex["why"]


def test_ranker_never_sees_test_interactions(shop: tuple[Dataset, Split, RunConfig]) -> None:
    """Scrambling the test targets changes nothing the ranker learns on validation."""
    dataset, split, cfg = shop
    cfg = cfg.model_copy(update={"ranking": cfg.ranking.model_copy(update={"ablations": False})})
    rng = np.random.default_rng(0)
    scrambled_test = split.test.assign(item_idx=rng.permutation(split.test["item_idx"].to_numpy()))
    other = Split(split.dataset, split.method, split.train, split.valid, scrambled_test,
                  split.stats)
    preds = []
    for sp in (split, other):
        stage = RankingStage(dataset, sp, cfg, _inputs(dataset, cfg), progress=False)
        valid = stage.build_part("valid")
        models, *_ = stage.train(valid)
        x, *_ = stage.table(valid, np.arange(20))
        preds.append(models[FULL].predict(x))
    assert np.array_equal(preds[0], preds[1])


def test_ltr_goes_through_ray_only_when_configured(
    shop: tuple[Dataset, Split, RunConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kgrank.distributed.ltr as dist

    dataset, split, cfg = shop
    calls: list[int] = []

    def fake(x: np.ndarray, *args: object, **kwargs: object) -> str:
        calls.append(len(x))
        return "ray-model"

    monkeypatch.setattr(dist, "fit_ltr_ray", fake)
    x = np.random.default_rng(0).random((40, 2))
    y = np.tile([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4)
    group = np.full(4, 10)
    names, fam = ["a", "b"], {"a": "behaviour", "b": "context"}
    local = RankingStage(dataset, split, cfg, RankingInputs(), progress=False)
    assert local.fit_ltr(x, y, group, names, fam).feature_names == names and not calls
    on_ray = cfg.model_copy(update={"ray": cfg.ray.model_copy(
        update={"address": "local", "stages": ["ranking"]})})
    stage = RankingStage(dataset, split, on_ray, RankingInputs(), progress=False)
    assert stage.fit_ltr(x, y, group, names, fam) == "ray-model" and calls == [40]


def test_families_without_signal_are_not_ablated() -> None:
    names = ["score_fusion", "score_fusion_without_graph", "score_kg", "has_query", "hour_sin"]
    fam = {"score_fusion": "fusion", "score_fusion_without_graph": "fusion_variant",
           "score_kg": "graph", "has_query": "query", "hour_sin": "context"}
    sets = RankingStage.feature_sets(names, fam)
    assert sets[FULL] == [0, 2, 3, 4]
    assert sets[f"{FULL} -graph"] == [3, 4, 1]  # the fusion score swapped for its variant
    assert sets[f"{FULL} -query"] == [2, 4]  # no variant: the fusion score goes too
    assert f"{FULL} -query" not in RankingStage.feature_sets(names, fam, absent=("query",))
