"""Batch inference through Ray Data: same embeddings as in-process, input order, Ray shut down.

The Ray test starts a real local Ray instance with two encoder actors (about 15 s on 2 idle
CPUs) and runs in the normal suite: Ray is a hard dependency, so it is never skipped. The image branch of the actor is tested without Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from kgrank.config import EncodeRayConfig, ImageConfig, TextConfig
from kgrank.distributed.encode import EncoderActor, build_encoder, encode_with_ray
from tests.encoders.test_stage import make_tiny_bert, make_tiny_clip


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_ray_text_matches_in_process_in_input_order(bert_dir: Path) -> None:
    assert not ray.is_initialized()
    spec = TextConfig(model=str(bert_dir), max_length=32, batch_size=4).model_dump()
    texts: list[str | None] = [f"item {i}: " + "abc " * (i % 7) for i in range(45)]
    texts[17] = None
    ray_cfg = EncodeRayConfig(enabled=True, num_actors=2, batch_size=8)  # 6 batches, 2 actors
    emb, ok = encode_with_ray("text", texts, spec, ray_cfg, progress=False)
    assert not ray.is_initialized()  # started by encode_with_ray, so shut down by it
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"
    ref = build_encoder("text", spec).encode([t or "" for t in texts])
    assert emb.shape == (45, 16) and emb.dtype == np.float32
    assert ok.tolist() == [i != 17 for i in range(45)]
    np.testing.assert_allclose(emb[ok], ref[ok], atol=1e-5)
    assert not emb[17].any()
    # distinct texts give distinct rows, so any reordering would have been caught
    assert np.abs(emb[0] - emb[1]).max() > 1e-3


def test_no_inputs_does_not_start_ray() -> None:
    emb, ok = encode_with_ray("image", [None, None], {}, EncodeRayConfig(), progress=False)
    assert emb.shape == (2, 0) and not ok.any() and not ray.is_initialized()


def test_actor_image_batch_reports_failures(tmp_path: Path) -> None:
    name = make_tiny_clip(tmp_path / "clip")
    good = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    spec = ImageConfig(model_name=name, batch_size=2).model_dump()
    actor = EncoderActor("image", spec, threads=1)
    paths = [str(good), str(tmp_path / "missing.png"), str(bad), str(good)]
    out = actor({"row": np.array([5, 6, 7, 8]), "input": np.array(paths, dtype=object)})
    assert out["row"].tolist() == [5, 6, 7, 8]
    assert out["ok"].tolist() == [True, False, False, True]
    assert out["reason"][1] == "file not found" and "unreadable" in out["reason"][2]
    ref, _ = build_encoder("image", spec).encode_paths([str(good)])
    np.testing.assert_allclose(out["emb"][[0, 3]], np.repeat(ref, 2, axis=0), atol=1e-5)
    assert not out["emb"][[1, 2]].any()


def test_build_encoder_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder("audio", {})  # type: ignore[arg-type]
