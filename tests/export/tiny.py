"""A tiny demo run (tiny random-init text / image encoders) and its export, made once per test
session and shared by tests/export and tests/serve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kgrank.config import load_config
from kgrank.export.writer import export_run
from kgrank.pipeline import run

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TinyExport:
    run_dir: Path
    export_dir: Path
    models: dict[str, str]


_CACHE: dict[str, TinyExport] = {}


def tiny_export(factory: pytest.TempPathFactory) -> TinyExport:
    """Run the whole pipeline on a 200-user / 120-item demo shop and export it (once)."""
    if "x" in _CACHE:
        return _CACHE["x"]
    from tests.encoders.test_stage import make_tiny_bert, make_tiny_clip

    out = factory.mktemp("tiny_export")
    models = {"text": str(make_tiny_bert(out / "bert")), "image": make_tiny_clip(out / "clip")}
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.path={out / 'shop'}", "data.demo_users=200", "data.demo_items=120",
        f"output_dir={out / 'runs'}", "eval.bootstrap=0",
        "graph.models=[kg]", "graph.kg.epochs=2", "graph.kg.batch_size=512",
        "baselines.models=[popularity,itemknn]",
        "encoders.modalities=[text,image]", f"encoders.cache_dir={out / 'cache'}",
        f"encoders.text.model={models['text']}", "encoders.text.batch_size=64",
        f"encoders.image.model_name={models['image']}", "encoders.image.batch_size=64",
        "encoders.image.image_size=null",  # the tiny model's own 32 px (demo.yaml sets 112)
        "encoders.profile_half_life=[1000.0]",
        "fusion.epochs=1", "fusion.batch_size=256", "fusion.negatives=32",
        "ranking.candidates=20", "ranking.ltr.n_estimators=20", "ranking.ltr.threads=1",
        "ranking.ablations=false",
    ])
    result = run(cfg, progress=False)
    exported = export_run(result.run_dir, out / "export", progress=False)
    _CACHE["x"] = TinyExport(result.run_dir, exported, models)
    return _CACHE["x"]
