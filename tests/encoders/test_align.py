"""LiT alignment tests on tiny randomly initialised open_clip models (nothing is downloaded).

The tiny model: timm ``test_efficientnet`` trunk (random init) + a 2-layer BERT of width 32 built
from a config (random init) that reuses the installed MiniLM tokenizer's vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kgrank.encoders.image as image_mod
from kgrank.config import AlignConfig
from kgrank.encoders.align import (
    _TextRunner,
    align,
    embed_images,
    embed_texts,
    load_aligned,
    locked_image_features,
    retrieval_metrics,
    save_aligned,
    sidecar_path,
    text_layers,
    tuned_parameter_names,
    zero_shot_accuracy,
)
from kgrank.encoders.text import default_text_model_dir

COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 230, 30),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
    "purple": (140, 30, 160),
    "orange": (250, 140, 0),
}
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run fastest on one thread (and do not spin-wait on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig

    d = tmp_path_factory.mktemp("tiny-bert")
    BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tokenizer() -> Callable[..., torch.Tensor]:
    import open_clip

    tok: Callable[..., torch.Tensor] = open_clip.tokenizer.HFTokenizer(
        str(default_text_model_dir()), context_length=16
    )
    return tok


def tiny_clip(bert_dir: Path, seed: int = 0) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        timm_model_name="test_efficientnet",
        timm_model_pretrained=False,
        timm_pool="avg",
        timm_proj="linear",
        image_size=SIZE,
    )
    text = CLIPTextCfg(
        context_length=16,
        hf_model_name=str(bert_dir),
        hf_tokenizer_name=str(bert_dir),
        hf_model_pretrained=False,
        hf_pooler_type="mean_pooler",
        hf_proj_type="linear",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(16, vision, text)
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """Two shades per colour, each named in its text: a learnable image-text pairing."""
    d = tmp_path_factory.mktemp("toy")
    paths: list[Path] = []
    texts: list[str] = []
    for name, rgb in COLOURS.items():
        for shade in (0, 1):
            p = d / f"{name}{shade}.png"
            colour = tuple(max(0, c - 25 * shade) for c in rgb)
            Image.new("RGB", (40, 48), colour).save(p)
            paths.append(p)
            texts.append(f"a {name} square")
    return paths, texts


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_trunk_locked_tuned_parameters_change_loss_falls(
    bert_dir: Path, tokenizer: Callable[..., torch.Tensor], toy: tuple[list[Path], list[str]]
) -> None:
    model, preprocess = tiny_clip(bert_dir)
    paths, texts = toy
    names = tuned_parameter_names(model, 1)
    assert "logit_scale" in names and "visual.head.proj.weight" in names
    assert "text.proj.weight" in names
    assert any(n.startswith("text.transformer.encoder.layer.1.") for n in names)
    assert not any(
        n.startswith(
            ("visual.trunk.", "text.transformer.encoder.layer.0.", "text.transformer.embeddings.")
        )
        for n in names
    )
    before = _state(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    feats = locked_image_features(model, preprocess, paths)
    img0 = embed_images(model, feats)
    txt0 = embed_texts(model, tokenizer, texts)
    cfg = AlignConfig(epochs=40, batch_size=8, lr=3e-3, train_top_layers=1, seed=0)
    res = align(model, tokenizer, paths, texts, cfg, preprocess=preprocess, progress=False)

    after = model.state_dict()
    for key, value in before.items():
        tuned = key in names
        same = torch.equal(value, after[key])
        assert same != tuned, key  # untuned bit-identical (trunk incl. BN stats), tuned changed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not model.training
    assert res.n_pairs == len(paths) and res.n_skipped == 0 and res.tuned == names
    assert len(res.loss_history) == 40
    assert res.loss_history[-1] < 0.5 * res.loss_history[0], res.loss_history
    # the locked features did not move, the embeddings did, and now match colour to its name
    assert torch.equal(locked_image_features(model, preprocess, paths).features, feats.features)
    img1, txt1 = embed_images(model, feats), embed_texts(model, tokenizer, texts)
    assert not torch.allclose(img0, img1)
    same_colour = [i ^ 1 for i in range(len(texts))]  # the other shade has the same text
    top2_before = (txt0 @ img0.T).topk(2, dim=1).indices
    top2_after = (txt1 @ img1.T).topk(2, dim=1).indices
    hits = [
        sum(set(t.tolist()) == {i, same_colour[i]} for i, t in enumerate(top))
        for top in (top2_before, top2_after)
    ]
    assert hits[1] >= 14 and hits[1] > hits[0], hits


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cached_frozen_text_layers_match_full_tower(
    bert_dir: Path, tokenizer: Callable[..., torch.Tensor], k: int
) -> None:
    model, _ = tiny_clip(bert_dir)
    texts = ["a red square", "black", "a much longer text about a blue and green square", ""]
    tokens = tokenizer(texts)
    runner = _TextRunner(model, tokens, k, batch_size=3, progress=False)
    assert runner.cache is not None
    idx = torch.tensor([2, 0, 3])
    with torch.no_grad():
        full = model.text(tokens[idx])  # type: ignore[operator]
        assert torch.allclose(runner(idx), full, atol=1e-5)
    assert len(text_layers(model)) == 2  # the tower is whole again


def test_embed_images_matches_encode_image(
    bert_dir: Path, toy: tuple[list[Path], list[str]]
) -> None:
    model, preprocess = tiny_clip(bert_dir)
    paths, _ = toy
    batch = torch.stack([preprocess(Image.open(p)) for p in paths[:4]])
    with torch.inference_mode():
        direct = model.encode_image(batch, normalize=True)  # type: ignore[operator]
    via_feats = embed_images(model, locked_image_features(model, preprocess, paths[:4]))
    assert torch.allclose(direct, via_feats, atol=1e-5)


def test_missing_image_is_masked_not_fatal(
    bert_dir: Path,
    tokenizer: Callable[..., torch.Tensor],
    toy: tuple[list[Path], list[str]],
    tmp_path: Path,
) -> None:
    model, preprocess = tiny_clip(bert_dir)
    paths, texts = toy
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not a png" * 20)
    imgs: list[str | Path | None] = [None, *paths[:6], tmp_path / "gone.png", corrupt]
    txts = ["nothing", *texts[:6], "gone", "bad"]
    cfg = AlignConfig(epochs=2, batch_size=4, lr=1e-3, train_top_layers=0)
    res = align(model, tokenizer, imgs, txts, cfg, preprocess=preprocess, progress=False)
    assert res.n_pairs == 6 and res.n_skipped == 3
    assert [f[0] for f in res.failures] == [0, 7, 8]
    assert "not found" in res.failures[1][2] and "unreadable" in res.failures[2][2]
    feats = locked_image_features(model, preprocess, imgs)
    assert feats.mask.tolist() == [False] + [True] * 6 + [False, False]
    assert not embed_images(model, feats)[torch.from_numpy(~feats.mask)].any()
    with pytest.raises(ValueError, match="at least 2 pairs"):
        align(
            model,
            tokenizer,
            [None, paths[0]],
            ["a", "b"],
            cfg,
            preprocess=preprocess,
            progress=False,
        )
    with pytest.raises(ValueError, match="train_top_layers"):
        align(
            model,
            tokenizer,
            paths,
            texts,
            cfg.model_copy(update={"train_top_layers": 3}),
            preprocess=preprocess,
            progress=False,
        )
    assert len(text_layers(model)) == 2


def test_save_load_round_trip(
    bert_dir: Path,
    tokenizer: Callable[..., torch.Tensor],
    toy: tuple[list[Path], list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, preprocess = tiny_clip(bert_dir)
    paths, texts = toy
    cfg = AlignConfig(epochs=3, batch_size=8, lr=1e-3, train_top_layers=1)
    res = align(model, tokenizer, paths, texts, cfg, preprocess=preprocess, progress=False)
    out = save_aligned(model, tmp_path / "aligned.safetensors", res, extra={"k": 1})
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["tuned"] == res.tuned and meta["extra"] == {"k": 1}
    from safetensors.torch import load_file

    assert sorted(load_file(str(out))) == sorted(res.tuned)  # only the tuned tensors
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left

    fresh, _ = tiny_clip(bert_dir)  # same seed: same base weights, untuned
    feats = locked_image_features(fresh, preprocess, paths)
    assert not torch.allclose(embed_images(fresh, feats), embed_images(model, feats))
    load_aligned(fresh, out)
    assert torch.equal(embed_images(fresh, feats), embed_images(model, feats))
    assert torch.equal(embed_texts(fresh, tokenizer, texts), embed_texts(model, tokenizer, texts))

    other, _ = tiny_clip(bert_dir, seed=1)  # another trunk: refused
    with pytest.raises(ValueError, match="other base weights"):
        load_aligned(other, out)
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(out.read_bytes()[:-1] + b" ")
    sidecar_path(tampered).write_text(sidecar_path(out).read_text())
    with pytest.raises(ValueError, match="sha256"):
        load_aligned(fresh, tampered)

    # ImageEncoder(aligned=...) with the tiny model standing in for the offline one
    monkeypatch.setattr(image_mod, "build_offline_clip", lambda **_: tiny_clip(bert_dir))
    plain = image_mod.ImageEncoder(batch_size=4)
    enc = image_mod.ImageEncoder(batch_size=4, aligned=out)
    assert enc.encoder_id != plain.encoder_id and "lit-aligned@" in enc.encoder_id
    assert enc.aligned is not None and enc.aligned["tuned"] == res.tuned
    emb, mask = enc.encode_paths(paths)
    assert mask.all()
    assert np.allclose(emb, embed_images(model, feats).numpy(), atol=1e-5)
    assert np.allclose(
        enc.encode_text(texts), embed_texts(model, tokenizer, texts).numpy(), atol=1e-5
    )


def test_retrieval_metrics_hand_made() -> None:
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    # scores t0: [1, 0, .8] -> rank 1; t1: [0, 1, .6] -> image 1 is 2nd of [.8?]; see below
    image = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    # t0 vs images: [1.0, 0.6, 0.0] -> relevant (0) rank 1
    # t1 vs images: [0.0, 0.8, 1.0] -> relevant (1) rank 2
    # t2 vs images: [0.6, 1.0, 0.8] -> relevant (2) rank 2
    m = retrieval_metrics(text, image, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@2"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["median_rank"] == 2.0 and m["n"] == 3.0
    # ties count against the model: constant embeddings are no better than chance
    flat = np.ones((4, 2), dtype=np.float32)
    assert retrieval_metrics(flat, flat, ks=(1, 4))["recall@1"] == 0.0
    assert retrieval_metrics(flat, flat, ks=(1, 4))["recall@4"] == 1.0
    with pytest.raises(ValueError):
        retrieval_metrics(text, image[:2])


def test_zero_shot_accuracy_hand_made() -> None:
    classes = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    images = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], dtype=np.float32)
    assert zero_shot_accuracy(images, classes, [0, 1, 1]) == pytest.approx(2 / 3)
    assert zero_shot_accuracy(torch.from_numpy(images), classes, np.array([0, 1, 0])) == 1.0
    with pytest.raises(ValueError):
        zero_shot_accuracy(images, classes, [0, 1, 2])
