"""Encoders stage: files written, cache reuse, masked items, the Ray branch, profile results.

Tiny random models, saved to temp dirs and loaded through the production config path: a 2-layer
BERT (``encoders.text.model=<dir>``) and a 1-layer open_clip ViT with saved weights
(``encoders.image.model_name=local-dir:<dir>``); for LiT alignment a timm ``test_efficientnet``
trunk + 2-layer BERT text tower (``local-dir`` too). The dataset is a 60-item demo shop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

from kgrank.config import ConfigError, RunConfig, SplitConfig, load_config
from kgrank.data.dataset import Dataset, load_dataset, write_dataset
from kgrank.data.demo import DemoConfig, generate_demo
from kgrank.data.split import Split, make_split
from kgrank.encoders.stage import (
    EncoderOutputs,
    build_text_encoder,
    encode_cached,
    load_item_embeddings,
    run_encoder_stage,
)
from kgrank.encoders.store import EmbeddingStore
from kgrank.encoders.text import default_text_model_dir, item_text

REPO = Path(__file__).resolve().parents[2]
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(
    "abcdefghijklmnopqrstuvwxyz0123456789.,'-:;>&()/"
)
CLIP_CFG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    },
    "preprocess_cfg": {},
}


def make_tiny_bert(directory: Path) -> Path:
    """A random 2-layer BERT (hidden 16) with a character vocabulary, saved to ``directory``."""
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(TOKENS)})
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory)
    return directory


def make_tiny_clip(directory: Path) -> str:
    """A random 1-layer open_clip ViT (32 px, dim 16) with SAVED weights (so every process that
    loads it gets the same model); returns its open_clip model name ``local-dir:<dir>``."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(CLIP_CFG))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    return f"local-dir:{directory}"


def make_tiny_lit_clip(directory: Path) -> str:
    """A random open_clip CustomTextCLIP that LiT can tune (timm ``test_efficientnet`` trunk +
    linear head, 2-layer BERT of width 16 with the installed MiniLM tokenizer), weights SAVED;
    returns ``local-dir:<dir>``."""
    import open_clip
    from safetensors.torch import save_file

    bert = directory / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(bert)
    clip = directory / "clip"
    AutoTokenizer.from_pretrained(str(default_text_model_dir())).save_pretrained(clip)
    cfg = {"model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"context_length": 16, "hf_model_name": str(bert),
                     "hf_tokenizer_name": str(clip), "hf_model_pretrained": False,
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"},
    }, "preprocess_cfg": {}}
    (clip / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{clip}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(clip / "open_clip_model.safetensors"))
    return f"local-dir:{clip}"


def make_shop(root: Path, n_users: int = 100, n_items: int = 60) -> Dataset:
    """A small demo shop with one deleted and one corrupt image file (besides the items the
    generator leaves without an image)."""
    ds = generate_demo(root, DemoConfig(n_users=n_users, n_items=n_items, seed=0))
    with_image = [i for i, p in enumerate(ds.items["image"]) if isinstance(p, str)]
    (root / ds.items["image"][with_image[0]]).unlink()
    (root / ds.items["image"][with_image[1]]).write_bytes(b"\x00not a png\xff" * 20)
    return load_dataset(root)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("tiny_models")
    return {"text": str(make_tiny_bert(base / "bert")), "image": make_tiny_clip(base / "clip")}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Split]:
    ds = make_shop(tmp_path_factory.mktemp("shop") / "shop")
    return ds, make_split(ds, SplitConfig(positive_events=["click", "cart", "purchase"]))


def stage_config(models: dict[str, str], cache: Path, *extra: str) -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", [
        "data.path=unused", "eval.bootstrap=0", "encoders.modalities=[text,image]",
        f"encoders.text.model={models['text']}", "encoders.text.batch_size=16",
        f"encoders.image.model_name={models['image']}", "encoders.image.batch_size=16",
        "encoders.image.image_size=null",  # the tiny model's own 32 px (demo.yaml sets 112)
        f"encoders.cache_dir={cache}", "encoders.profile_half_life=[1.0,1000.0]", *extra,
    ])


@pytest.fixture(scope="module")
def first_run(
    models: dict[str, str], shop: tuple[Dataset, Split], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RunConfig, EncoderOutputs]:
    base = tmp_path_factory.mktemp("stage")
    cfg = stage_config(models, base / "cache")
    out = run_encoder_stage(*shop, cfg, base / "enc", progress=False)
    return base, cfg, out


def test_stage_writes_embeddings_meta_and_results(
    first_run: tuple[Path, RunConfig, EncoderOutputs], shop: tuple[Dataset, Split]
) -> None:
    base, _, out = first_run
    ds, _ = shop
    for modality in ("text", "image"):
        d = base / "enc" / modality
        tensors = load_file(str(d / "embeddings.safetensors"))
        emb, mask = tensors["item_emb"], tensors["mask"]
        assert emb.shape == (60, 16) and emb.dtype == np.float32 and mask.dtype == bool
        np.testing.assert_allclose(np.linalg.norm(emb[mask], axis=1), 1.0, atol=1e-5)
        assert not emb[~mask].any()
        assert json.loads((d / "item_ids.json").read_text()) == list(ds.items["item_id"])
        meta = json.loads((d / "meta.json").read_text())
        assert meta["dim"] == 16 and meta["n_cached"] == 0
        assert meta["n_encoded"] + meta["n_missing"] == 60 == meta["n_items"]
        assert meta["seconds"] > 0 and meta["ray"] is False
        assert meta["n_missing"] == len(meta["failures"]) == int((~mask).sum())
        loaded = load_item_embeddings(d)
        assert loaded.encoder_id == meta["encoder_id"]
        np.testing.assert_array_equal(loaded.emb, emb)
    assert out.text is not None and out.text.mask.all() and out.text.stats is not None
    assert out.text.stats.n_encoded == 60
    assert [r.name for r in out.results] == ["text-only", "image-only"]
    assert all(r.part == "test" and 0 <= r.metrics["ndcg@10"] <= 1 for r in out.results)
    assert {t.params["half_life"] for t in out.tuned} <= {1.0, 1000.0}
    metrics = json.loads((base / "enc" / "metrics.json").read_text())
    assert list(metrics) == ["text-only", "image-only"]


def test_text_embeddings_match_the_encoder(
    first_run: tuple[Path, RunConfig, EncoderOutputs], shop: tuple[Dataset, Split]
) -> None:
    _, cfg, out = first_run
    direct = build_text_encoder(cfg.encoders.text).encode(item_text(shop[0].items))
    assert out.text is not None
    np.testing.assert_allclose(out.text.emb, direct, atol=1e-5)
    assert out.text_encoder is not None
    np.testing.assert_allclose(out.text_encoder.encode(item_text(shop[0].items)[:3]),
                               direct[:3], atol=1e-5)


def test_missing_and_corrupt_images_are_masked_and_listed(
    first_run: tuple[Path, RunConfig, EncoderOutputs], shop: tuple[Dataset, Split]
) -> None:
    _, _, out = first_run
    ds, _ = shop
    assert out.image is not None
    refs = list(ds.items["image"])
    no_image = {i for i, p in enumerate(refs) if not isinstance(p, str)}
    with_image = [i for i, p in enumerate(refs) if isinstance(p, str)]
    deleted, corrupt = with_image[0], with_image[1]
    assert no_image and set(np.flatnonzero(~out.image.mask)) == no_image | {deleted, corrupt}
    by_item = {f.item_id: f for f in out.failures if f.modality == "image"}
    assert by_item[ds.items["item_id"][deleted]].reason == "file not found"
    assert by_item[ds.items["item_id"][deleted]].path == refs[deleted]
    assert "unreadable" in by_item[ds.items["item_id"][corrupt]].reason
    assert all(by_item[ds.items["item_id"][i]].reason == "no image" for i in no_image)
    assert out.image_text_encoder is not None
    q = out.image_text_encoder(["red shirt", "blue cup"])
    assert q.shape == (2, 16)


def test_second_run_encodes_nothing(
    first_run: tuple[Path, RunConfig, EncoderOutputs], shop: tuple[Dataset, Split]
) -> None:
    base, cfg, out = first_run
    again = run_encoder_stage(*shop, cfg, base / "enc2", progress=False)
    for old, new in ((out.text, again.text), (out.image, again.image)):
        assert old is not None and new is not None and new.stats is not None
        assert new.stats.n_encoded == 0 and new.stats.n_cached == int(old.mask.sum())
        np.testing.assert_array_equal(new.emb, old.emb)
        np.testing.assert_array_equal(new.mask, old.mask)
    # the corrupt image was not cached: it is tried (and fails) again
    meta = json.loads((base / "enc2" / "image" / "meta.json").read_text())
    assert meta["n_missing"] == len(meta["failures"]) > 0


def test_ray_branch_is_wired(
    first_run: tuple[Path, RunConfig, EncoderOutputs],
    shop: tuple[Dataset, Split],
    models: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With encoders.ray.enabled the uncached inputs go to kgrank.distributed (faked here; the
    real Ray path is tested in tests/distributed)."""
    import kgrank.distributed.encode as dist

    calls: list[tuple[str, int, dict[str, Any]]] = []

    def fake(kind: str, inputs: list[str], spec: dict[str, Any], ray_cfg: Any,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
        calls.append((kind, len(inputs), spec))
        actor = dist.EncoderActor(kind, spec)  # type: ignore[arg-type]
        out = actor({"row": np.arange(len(inputs)), "input": np.array(inputs, dtype=object)})
        return out["emb"], out["ok"], [str(r) for r in out["reason"]]

    monkeypatch.setattr(dist, "encode_with_ray_detailed", fake)
    cfg = stage_config(models, tmp_path / "cache", "encoders.ray.enabled=true")
    out = run_encoder_stage(*shop, cfg, tmp_path / "enc", progress=False)
    _, _, ref = first_run
    assert [c[0] for c in calls] == ["text", "image"]
    assert calls[0][1] == 60 and calls[0][2]["model"] == str(Path(models["text"]).resolve())
    for a, b in ((out.text, ref.text), (out.image, ref.image)):
        assert a is not None and b is not None and a.stats is not None and a.stats.ray
        np.testing.assert_allclose(a.emb, b.emb, atol=1e-5)
        np.testing.assert_array_equal(a.mask, b.mask)
    reasons = {(f.item_id, f.reason) for f in out.failures}
    assert reasons == {(f.item_id, f.reason) for f in ref.failures}


def test_items_without_text_are_masked(
    models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [(f"u{u}", f"i{(u + s) % 12}", pd.Timestamp("2024-01-01", tz="UTC")
             + pd.Timedelta(days=s)) for u in range(20) for s in range(5)]
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(12)],
                          "title": [None if j in (3, 7) else f"thing {j}" for j in range(12)]})
    ds = write_dataset(tmp_path / "ds", items,
                       pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    cfg = stage_config(models, tmp_path / "cache", "encoders.modalities=[text]",
                       "data.split.positive_events=[purchase]")
    split = make_split(ds, cfg.data.split)
    out = run_encoder_stage(ds, split, cfg, tmp_path / "enc", progress=False)
    assert out.text is not None and out.image is None and out.image_text_encoder is None
    assert np.flatnonzero(~out.text.mask).tolist() == [3, 7]
    assert [(f.item_id, f.reason) for f in out.failures] == [("i3", "no text"), ("i7", "no text")]
    assert [r.name for r in out.results] == ["text-only"]
    assert not (tmp_path / "enc" / "image").exists()


def test_align_enabled_aligns_the_image_model(
    models: dict[str, str], shop: tuple[Dataset, Split], tmp_path: Path
) -> None:
    """LiT alignment on the catalog: weights + sidecar written, stats in meta.json, a new encoder
    id (so a separate cache entry), other embeddings, and Ray actors build the same encoder."""
    from kgrank.distributed.encode import build_encoder
    from kgrank.encoders.image import ImageEncoder

    lit = {**models, "image": make_tiny_lit_clip(tmp_path / "lit")}
    common = ("encoders.modalities=[image]", "encoders.align.epochs=1",
              "encoders.align.batch_size=8")
    plain = run_encoder_stage(*shop, stage_config(lit, tmp_path / "cache", *common),
                              tmp_path / "plain", progress=False)
    cfg = stage_config(lit, tmp_path / "cache", *common, "encoders.align.enabled=true")
    out = run_encoder_stage(*shop, cfg, tmp_path / "enc", progress=False)
    weights = tmp_path / "enc" / "image" / "aligned.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert not (tmp_path / "plain" / "image" / "aligned.safetensors").exists()
    assert out.image is not None and plain.image is not None and out.image.stats is not None
    assert "lit-aligned" in out.image.encoder_id and "lit-aligned" not in plain.image.encoder_id
    assert out.image.stats.n_cached == 0  # not served the unaligned embeddings from the cache
    np.testing.assert_array_equal(out.image.mask, plain.image.mask)
    assert not np.allclose(out.image.emb[out.image.mask], plain.image.emb[plain.image.mask],
                           atol=1e-4)
    meta = json.loads((tmp_path / "enc" / "image" / "meta.json").read_text())
    n_images = int(out.image.mask.sum())
    assert meta["encoder_id"] == out.image.encoder_id
    assert meta["align"]["n_pairs"] == n_images and meta["align"]["n_skipped"] == 60 - n_images
    assert meta["align"]["seconds"] > 0 and np.isfinite(meta["align"]["final_loss"])
    # the query encoder is the aligned one; Ray actors build it from the spec's "aligned" path
    aligned = ImageEncoder(model_name=lit["image"], aligned=weights)
    assert out.image_text_encoder is not None
    np.testing.assert_allclose(out.image_text_encoder(["red shirt"]),
                               aligned.encode_text(["red shirt"]), atol=1e-5)
    actor = build_encoder("image", {**cfg.encoders.image.model_dump(), "aligned": str(weights)})
    assert actor.encoder_id == out.image.encoder_id
    paths = [str(shop[0].root / p) for p in shop[0].items["image"] if isinstance(p, str)][2:5]
    rows = [i for i, p in enumerate(shop[0].items["image"]) if isinstance(p, str)][2:5]
    np.testing.assert_allclose(actor.encode_paths(paths)[0], out.image.emb[rows], atol=1e-5)


def test_align_of_an_unsupported_model_names_the_setting(
    models: dict[str, str], shop: tuple[Dataset, Split], tmp_path: Path
) -> None:
    cfg = stage_config(models, tmp_path / "cache", "encoders.modalities=[image]",
                       "encoders.align.enabled=true")
    with pytest.raises(ConfigError, match="encoders.align"):
        run_encoder_stage(*shop, cfg, tmp_path / "enc", progress=False)


def test_store_lookup_and_add_with_arbitrary_keys(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path)
    emb, found = store.lookup("img", ["a", "b"])
    assert emb.shape == (2, 0) and not found.any()
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.add("img", ["a", "b", "a"], rows) == 2  # a repeated key keeps its first row
    assert store.add("img", ["b", "c"], rows[:2]) == 1
    emb, found = store.lookup("img", ["c", "x", "a", "b"])
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(emb, np.stack([rows[1], np.zeros(4), rows[0], rows[1]]))
    with pytest.raises(ValueError, match="dim"):
        store.add("img", ["z"], np.zeros((1, 5), dtype=np.float32))


def test_encode_cached_counts_rows_and_skips_failures(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path)
    seen: list[list[str]] = []

    def encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        seen.append(batch)
        ok = np.array([not x.startswith("bad") for x in batch])
        emb = np.array([[len(x), 1.0] if good else [0.0, 0.0] for x, good in zip(batch, ok,
                                                                                   strict=True)],
                       dtype=np.float32)
        return emb, ok, ["" if good else "broken" for good in ok]

    keys = ["k1", None, "k2", "k1", "kb"]
    inputs = ["one", None, "three", "one", "bad"]
    emb, ok, reasons, n_enc, n_cached = encode_cached(store, "e", 2, keys, inputs, encode)
    assert seen == [["one", "three", "bad"]]  # each distinct key once
    assert ok.tolist() == [True, False, True, True, False] and (n_enc, n_cached) == (3, 0)
    assert reasons == ["", "", "", "", "broken"]
    emb2, ok2, _, n_enc2, n_cached2 = encode_cached(store, "e", 2, keys, inputs, encode)
    assert seen[-1] == ["bad"] and (n_enc2, n_cached2) == (0, 3)  # failures are not cached
    np.testing.assert_array_equal(emb2, emb)
