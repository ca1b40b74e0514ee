"""kgrank export: manifest, Parquet embeddings, FAISS index, ONNX towers, LightGBM model, round
trip through the exported artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kgrank.cli import main
from kgrank.export import SCHEMA_VERSION, ExportError, load
from kgrank.export.onnx import TOLERANCE, batch_arrays
from tests.export.tiny import TinyExport, tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)  # made once per session (cached in tests.export.tiny)


def test_manifest_and_embedding_tables(tiny: TinyExport) -> None:
    ex = load(tiny.export_dir)
    m = ex.manifest
    assert m.schema_version == SCHEMA_VERSION and m.kgrank_version
    assert len(m.config_hash) == 64 and m.dataset_fingerprint == ex.dataset.fingerprint
    assert (m.n_users, m.n_items) == (200, 120) and m.created_at.endswith("+00:00")
    assert set(ex.stages) == {"graph_kg", "text", "image", "fusion"}
    for e in m.embeddings:
        ids, vec, present = ex.embeddings(e.stage, e.kind)
        assert vec.shape == (e.rows, e.dim) and vec.dtype == np.float32 and len(ids) == e.rows
        assert np.isfinite(vec).all()
        if e.normalised:
            norms = np.linalg.norm(vec, axis=1)
            ok = norms > 0 if present is None else present
            assert np.allclose(norms[ok], 1.0, atol=1e-4)
    assert ex.embeddings("text")[2] is not None  # which items have a text embedding
    assert ex.embeddings("graph_kg", "users")[0][0] == str(ex.dataset.users["user_id"][0])
    frame = ex.embedding_frame("fusion", "items")
    assert list(frame.columns) == ["id", "vector"] and len(frame) == 120
    index = ex.faiss_index()
    assert index.ntotal == 120
    fused = ex.embeddings("fusion")[1]
    scores, idx = index.search(fused[:3], 5)
    brute = fused[:3] @ fused.T  # exact inner product: FAISS agrees with brute force
    assert np.allclose(scores, -np.sort(-brute, axis=1)[:, :5], atol=1e-5)
    assert np.allclose(np.take_along_axis(brute, idx, 1), scores, atol=1e-5)
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)  # unit rows: the best match is cos 1
    assert ex.ltr_model().feature_names
    # the export was written atomically: no temporary siblings are left behind
    assert not [p for p in tiny.export_dir.parent.iterdir() if p.name.startswith(".")]


def test_onnx_towers_match_torch(tiny: TinyExport) -> None:
    from kgrank.features.requests import requests_for_targets
    from kgrank.fusion.train import EventIndex, FusionResult, request_features

    ex = load(tiny.export_dir)
    assert ex.manifest.onnx_check["user_tower_max_abs_diff"] <= TOLERANCE
    assert ex.manifest.onnx_check["item_tower_max_abs_diff"] <= TOLERANCE
    fusion = FusionResult.load(tiny.run_dir / "fusion")
    from kgrank.data.split import make_split

    split = make_split(ex.dataset, ex.config.data.split)
    requests = requests_for_targets(split.test)
    feats = request_features(requests, EventIndex(split.history("test")), fusion.vocab,
                             fusion.queries, fusion.config.history_len, strict=False)
    batch = feats.batch(np.arange(len(feats)), torch.device("cpu"))
    with torch.no_grad():
        want = fusion.model.users_with_items(batch, fusion.model.all_items()).numpy()
        items_t = fusion.model.all_items().numpy()
    got = ex.onnx_session("user").run(None, batch_arrays(batch))[0]
    items_o = ex.onnx_session("item").run(None, {"items": np.arange(120)})[0]
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.abs(items_o - items_t).max() <= TOLERANCE
    assert np.abs(ex.embeddings("fusion")[1] - items_t).max() <= TOLERANCE


def test_round_trip_reproduces_the_runs_ndcg(tiny: TinyExport) -> None:
    from kgrank.serve.searcher import Searcher

    metrics = json.loads((tiny.run_dir / "metrics.json").read_text())["fusion+ltr"]
    searcher = Searcher(load(tiny.export_dir))
    got = searcher.score_part()
    assert got["ndcg@10"] == metrics["ndcg@10"]
    assert got["hr@10"] == metrics["hr@10"]
    assert load(tiny.export_dir).manifest.ltr_metric["ndcg@10"] == metrics["ndcg@10"]


def test_bad_inputs_are_clear_errors(tiny: TinyExport, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExportError, match="no manifest.json"):
        load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema_version": 99}')
    with pytest.raises(ExportError, match="schema_version 99"):
        load(tmp_path)
    assert main(["-q", "export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert main(["-q", "export", str(tiny.run_dir), str(tiny.export_dir), "--no-overwrite"]) == 2
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
