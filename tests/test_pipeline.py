"""End to end: `kgrank run` / `kgrank train graph` / `kgrank graph stats` on a tiny demo shop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from kgrank.cli import main
from kgrank.config import load_config
from kgrank.pipeline import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipe")
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.path={out / 'shop'}", "data.demo_users=300", "data.demo_items=200",
        f"output_dir={out / 'runs'}", "eval.bootstrap=50",
        "graph.lightgcn.epochs=3", "graph.kg.epochs=3", "graph.lightgcn.batch_size=512",
        "graph.kg.batch_size=512", "baselines.models=[popularity,itemknn]",
        "encoders.modalities=[text]", f"encoders.cache_dir={out / 'cache'}",
        "fusion.epochs=2", "fusion.batch_size=256", "fusion.negatives=64",
        "ranking.candidates=30", "ranking.ltr.n_estimators=30", "ranking.ltr.threads=1",
        "ranking.ablations=true",  # what `make ablations` adds to `make demo`
    ])
    result = run(cfg, progress=False)
    assert result.run_dir == out / "runs" / "demo"
    return result.run_dir


def test_run_writes_a_complete_run_directory(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    stages = ["popularity", "itemknn", "lightgcn", "kg", "text-only", "fusion", "fusion+ltr"]
    assert list(metrics)[: len(stages)] == stages and list(metrics)[-1] == "oracle"
    ablations = [m for m in metrics if m.startswith("fusion+ltr -")]
    assert {"fusion+ltr -graph", "fusion+ltr -text", "fusion+ltr -query"} <= set(ablations)
    for values in metrics.values():
        assert 0.0 <= values["ndcg@10"] <= 1.0 and "hr@10" in values and "ndcg@10_ci_low" in values
    assert metrics["oracle"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    for name in ("lightgcn", "kg"):
        emb = load_file(str(tiny_run / "graph" / name / "embeddings.safetensors"))
        assert emb["item"].shape[0] == 200 and emb["user"].shape[0] == 300
        assert len(json.loads((tiny_run / "graph" / name / "item_ids.json").read_text())) == 200
    entities = json.loads((tiny_run / "graph" / "entity_ids.json").read_text())
    kg_emb = load_file(str(tiny_run / "graph" / "kg" / "embeddings.safetensors"))
    assert len(entities) == kg_emb["entity"].shape[0] > 0
    assert {"category", "brand"} <= {e["type"] for e in entities}
    report = (tiny_run / "report.md").read_text()
    assert "| lightgcn |" in report and "Candidate recall" in report and "ablations" in report
    assert (tiny_run / "ranking" / "ltr_model.txt").is_file()
    changes = json.loads((tiny_run / "ablations.json").read_text())
    assert [c["model"] for c in changes] == ablations
    for c in changes:  # the paired change is the difference of the two means
        assert c["change"] == pytest.approx(c["ndcg@10"] - metrics["fusion+ltr"]["ndcg@10"])
        assert c["change_ci_low"] <= c["change"] <= c["change_ci_high"]
    assert "paired 95% CI" in report and (tiny_run / "plots" / "ablations.png").is_file()
    timings = json.loads((tiny_run / "timings.json").read_text())
    assert {"graph", "encoders", "fusion", "ranking", "total"} <= set(timings)
    assert (tiny_run / "plots" / "feature_families.png").is_file()
    assert (tiny_run / "encoders" / "text" / "embeddings.safetensors").is_file()
    assert (tiny_run / "plots" / "ndcg_at_k.png").stat().st_size > 1000
    assert not [p for p in tiny_run.parent.iterdir() if p.name.startswith(".")]


def test_train_graph_and_graph_stats_cli(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shop = tiny_run.parent.parent / "shop"
    cfg = tiny_run.parent.parent / "cfg.yaml"
    cfg.write_text(f"name: g\noutput_dir: {tiny_run.parent}\ndata: {{path: {shop}}}\n"
                   "eval: {bootstrap: 0}\ngraph: {models: [lightgcn], lightgcn: {epochs: 2}}\n")
    assert main(["-q", "train", "graph", str(cfg)]) == 0
    metrics = json.loads((tiny_run.parent / "g" / "metrics.json").read_text())
    assert "lightgcn" in metrics and "popularity" not in metrics
    capsys.readouterr()
    assert main(["graph", "stats", str(shop), "--export", str(tiny_run.parent / "gx")]) == 0
    out = capsys.readouterr().out
    assert "item" in out and "in_category" in out and "weakly connected components" in out
    assert (tiny_run.parent / "gx" / "edges.parquet").exists()


def test_train_graph_without_models_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ndata: {path: nowhere}\n")
    assert main(["train", "graph", str(cfg)]) == 2
    assert "graph.models is empty" in capsys.readouterr().err
