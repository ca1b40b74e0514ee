"""Image encoder tests: weight mapping, an ImageNet check on real H&M photos, the offline CLIP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.models import ResNet50_Weights

from kgrank.encoders.image import (
    TIMM_NAME,
    ImageEncoder,
    build_offline_clip,
    efficientnet_lite0_state_dict,
    imagenet_logits,
    pretrained_cfg,
)

HM_DIR = Path(__file__).resolve().parents[3] / "shared" / "datasets" / (
    "hm-fashion-catalog-images-subset"
)
# clear product photos (articles_sample.csv product_type_name) -> the expected ImageNet top-1
PHOTOS = {
    "0449570062": ("T-shirt", "jersey"),
    "0145872053": ("Sweater", "sweatshirt"),
    "0399087010": ("Trousers", "jean"),
    "0253448059": ("Bra", "brassiere"),
    "0523404032": ("Shorts", "swimming trunks"),
}
CLOTHING = {
    610: "jersey", 841: "sweatshirt", 474: "cardigan", 608: "jean", 655: "miniskirt",
    869: "trench coat", 834: "suit", 459: "brassiere", 842: "swimming trunks", 638: "maillot",
    639: "maillot", 806: "sock", 774: "sandal", 770: "running shoe", 630: "Loafer",
    514: "cowboy boot", 445: "bikini", 697: "pajama", 689: "overskirt", 399: "abaya",
    578: "gown", 568: "fur coat", 617: "lab coat", 735: "poncho", 457: "bow tie", 411: "apron",
    614: "kimono", 465: "bulletproof vest", 824: "stole", 885: "velvet", 911: "wool",
    793: "shower cap", 808: "sombrero", 515: "cowboy hat", 414: "backpack", 748: "purse",
    658: "mitten", 893: "wallet", 591: "handkerchief",
}
CATEGORIES: list[str] = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def _photo(article_id: str) -> Path:
    return HM_DIR / "images" / article_id[:3] / f"{article_id}.jpg"


@pytest.fixture(scope="module")
def offline() -> tuple[torch.nn.Module, object]:
    return build_offline_clip()


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder(batch_size=4)


@pytest.fixture(scope="module")
def photo_batch(offline: tuple[torch.nn.Module, object]) -> torch.Tensor:
    _, preprocess = offline
    return torch.stack([preprocess(Image.open(_photo(a))) for a in PHOTOS])  # type: ignore[operator]


def test_weight_mapping_is_one_to_one() -> None:
    sd = efficientnet_lite0_state_dict()
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000)
    target = model.state_dict()
    assert set(sd) == set(target)
    for key, tensor in target.items():
        assert sd[key].shape == tensor.shape, key
    model.load_state_dict(sd, strict=True)  # raises on any missing/unexpected key
    assert torch.equal(model.state_dict()["classifier.weight"], sd["classifier.weight"])


def test_preprocess_uses_timm_mean_std(offline: tuple[torch.nn.Module, object]) -> None:
    cfg = pretrained_cfg()
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    _, preprocess = offline
    x = preprocess(Image.new("RGB", (300, 400), (255, 0, 128)))  # type: ignore[operator]
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 112, 112], torch.tensor([1.0, -1.0, 0.0039]), atol=1e-3)


def test_offline_trunk_carries_imagenet_weights(offline: tuple[torch.nn.Module, object]) -> None:
    model, _ = offline
    trunk_sd = model.visual.trunk.state_dict()  # type: ignore[union-attr]
    sd = efficientnet_lite0_state_dict()
    assert trunk_sd and all(torch.equal(v, sd[k]) for k, v in trunk_sd.items())


def _hits(logits: torch.Tensor) -> tuple[list[bool], list[str]]:
    top5 = logits.topk(5, dim=1).indices.tolist()
    return [bool(set(t) & set(CLOTHING)) for t in top5], [CATEGORIES[t[0]] for t in top5]


def test_imagenet_top5_of_hm_garments(photo_batch: torch.Tensor) -> None:
    assert HM_DIR.is_dir(), HM_DIR
    for idx, name in CLOTHING.items():  # the index table matches the ImageNet label list
        assert CATEGORIES[idx].startswith(name), (idx, CATEGORIES[idx], name)
    text = (HM_DIR / "articles_sample.csv").read_text()
    for article_id, (ptype, _) in PHOTOS.items():
        row = next(line for line in text.splitlines() if line.startswith(article_id))
        assert f",{ptype}," in row
    logits = imagenet_logits(photo_batch)
    assert logits.shape == (len(PHOTOS), 1000)
    hits, top1 = _hits(logits)
    assert all(hits), top1
    assert top1 == [label for _, label in PHOTOS.values()]

    # teeth: the same checks fail with a random-init trunk
    torch.manual_seed(0)
    rand = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000).eval()
    with torch.inference_mode():
        rand_hits, rand_top1 = _hits(rand(photo_batch))
    assert not all(rand_hits)
    assert rand_top1 != top1


def test_offline_clip_encoder(encoder: ImageEncoder, tmp_path: Path) -> None:
    assert encoder.dim == 384
    assert "img224x224" in encoder.encoder_id and "effnet-lite0" in encoder.encoder_id
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\x00not a jpeg\xff" * 50)
    good = [_photo(a) for a in PHOTOS]
    paths: list[str | Path | None] = [
        good[0], None, str(good[1]), tmp_path / "missing.jpg", corrupt, good[2],
    ]
    emb, mask = encoder.encode_paths(paths)
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    assert mask.tolist() == [True, False, True, False, False, True]
    assert np.allclose(np.linalg.norm(emb[mask], axis=1), 1.0, atol=1e-5)
    assert not emb[~mask].any()
    assert [f[0] for f in encoder.failures] == [1, 3, 4]
    assert encoder.failures[0][1] is None and "not found" in encoder.failures[1][2]
    assert "unreadable" in encoder.failures[2][2]
    # deterministic (fixed-seed projection) and batch-independent
    again = ImageEncoder(batch_size=1)
    emb2, _ = again.encode_paths([good[0]])
    assert again.encoder_id == encoder.encoder_id
    assert np.allclose(emb2[0], emb[0], atol=1e-5)

    txt = encoder.encode_text(["red cotton t-shirt", "black denim jeans", None])
    assert txt.shape == (3, 384) and txt.dtype == np.float32
    assert np.allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert float(txt[0] @ txt[1]) < 0.99


def test_empty_input(encoder: ImageEncoder) -> None:
    emb, mask = encoder.encode_paths([])
    assert emb.shape == (0, 384) and mask.shape == (0,)
    assert encoder.failures == []


def test_image_size_sets_resolution_and_cache_key(encoder: ImageEncoder) -> None:
    small = ImageEncoder(batch_size=2, image_size=96)
    assert "img96x96" in small.encoder_id and small.encoder_id != encoder.encoder_id
    good = [_photo(a) for a in list(PHOTOS)[:2]]
    emb, mask = small.encode_paths(good)
    assert mask.all() and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    full, _ = encoder.encode_paths(good)
    # same trunk at another resolution: not the 224 px embedding, but each photo stays nearer
    # to its own 224 px embedding than to the other photo's
    assert not np.allclose(emb, full, atol=1e-4)
    sim = emb @ full.T
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]
