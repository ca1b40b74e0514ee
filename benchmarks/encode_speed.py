"""Encoding speed: kgrank's encoders vs the reference libraries on the same model and inputs.

Text: all-MiniLM-L6-v2 (the bundled local copy) on the first 2,000 Amazon Beauty item texts,
kgrank :class:`~kgrank.encoders.text.TextEncoder` vs sentence-transformers loading the same
directory; batch size 64, max length 128, float32 on CPU, runs interleaved, best of 2 each. The
two embeddings must agree (mean cosine > 0.999).

Image (only if ``kgrank.encoders.image.ImageEncoder`` exists): ``ImageEncoder().encode_paths``
on 64 H&M photos (end to end: decode + preprocess + forward) vs a plain timm forward of
``tf_efficientnet_lite0`` (random weights, ``pretrained=False``) on the same 64 images already
preprocessed (timm transform of the trunk) and forwarded in the encoder's batch size.

    .venv/bin/python benchmarks/encode_speed.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import SHARED, dataset, machine  # noqa: E402

from kgrank.encoders.text import TextEncoder, default_text_model_dir, item_text  # noqa: E402

N_TEXTS = 2000
BATCH = 64
MAX_LEN = 128
REPEATS = 2
N_IMAGES = 64
IMAGE_DIR = SHARED / "hm-fashion-catalog-images-subset" / "images"
TIMM_MODEL = "tf_efficientnet_lite0"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def sentence_transformer(model_dir: Path) -> Any:
    """The local MiniLM as a SentenceTransformer; built from modules if the dir won't load."""
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    except Exception as exc:  # pragma: no cover - depends on the installed versions
        print(f"SentenceTransformer(dir) failed ({exc!r}); building Transformer + mean Pooling")
        from sentence_transformers import models
        word = models.Transformer(str(model_dir), max_seq_length=MAX_LEN)
        pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[word, pool], device="cpu")
    st.max_seq_length = MAX_LEN
    return st


def text_part() -> tuple[list[str], dict[str, str]]:
    ds = dataset("amazon-5core", "amazon-beauty-2014-5core", "beauty")
    texts = item_text(ds.items)[:N_TEXTS]
    model_dir = default_text_model_dir()
    kg = TextEncoder(batch_size=BATCH, max_length=MAX_LEN, dtype="float32", device="cpu")
    st = sentence_transformer(model_dir)
    st_dtype = next(st.parameters()).dtype
    assert st_dtype == torch.float32, st_dtype

    def run_st() -> np.ndarray:
        out: np.ndarray = st.encode(texts, batch_size=BATCH, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return out

    # one tiny warm-up each (first-call allocations, lazy imports), not timed
    kg.encode(texts[:BATCH])
    st.encode(texts[:BATCH], batch_size=BATCH, show_progress_bar=False)
    kg_times: list[float] = []
    st_times: list[float] = []
    kg_emb = st_emb = np.zeros(0)
    for _ in range(REPEATS):  # interleaved
        s, kg_emb = timed(lambda: kg.encode(texts))
        kg_times.append(s)
        s, st_emb = timed(run_st)
        st_times.append(s)
    cos = np.sum(kg_emb * st_emb, axis=1) / (
        np.linalg.norm(kg_emb, axis=1) * np.linalg.norm(st_emb, axis=1))
    kg_ips, st_ips = len(texts) / min(kg_times), len(texts) / min(st_times)
    rows = [
        f"| kgrank TextEncoder | {len(texts)} | {', '.join(f'{t:.2f}' for t in kg_times)} "
        f"| {kg_ips:.1f} |",
        f"| sentence-transformers | {len(texts)} | {', '.join(f'{t:.2f}' for t in st_times)} "
        f"| {st_ips:.1f} |",
    ]
    print(f"\nText: all-MiniLM-L6-v2 ({model_dir}), batch {BATCH}, max length {MAX_LEN}, "
          f"float32, best of {REPEATS} interleaved")
    print("| encoder | texts | seconds per run | items/s (best) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"kgrank/ST speed ratio {kg_ips / st_ips:.3f}; cosine kgrank vs ST: mean "
          f"{cos.mean():.6f}, min {cos.min():.6f}")
    ok = bool(cos.mean() > 0.999)
    if not ok:
        print("WARNING: kgrank and sentence-transformers embeddings disagree (mean cosine <= 0.999)")
    return texts, {"text_kgrank_ips": f"{kg_ips:.1f}", "text_st_ips": f"{st_ips:.1f}",
                   "text_ratio": f"{kg_ips / st_ips:.3f}",
                   "text_cos_mean": f"{cos.mean():.6f}", "text_cos_min": f"{cos.min():.6f}",
                   "text_agree": str(ok).lower()}


def _preprocess(paths: list[Path], transform: Any) -> torch.Tensor:
    from PIL import Image

    tensors = []
    for p in paths:
        with Image.open(p) as img:
            tensors.append(transform(img.convert("RGB")))
    return torch.stack(tensors)


def image_part() -> dict[str, str]:
    if importlib.util.find_spec("kgrank.encoders.image") is None:
        print("\nImage: skipped (kgrank/encoders/image.py does not exist yet)")
        return {"image": "skipped_no_module"}
    from kgrank.encoders import image as image_mod

    if not hasattr(image_mod, "ImageEncoder"):
        print("\nImage: skipped (kgrank.encoders.image has no ImageEncoder)")
        return {"image": "skipped_no_class"}
    if not IMAGE_DIR.is_dir():
        print(f"\nImage: skipped ({IMAGE_DIR} does not exist)")
        return {"image": "skipped_no_images"}
    import timm
    from timm.data import create_transform, resolve_data_config

    paths = sorted(p for p in IMAGE_DIR.rglob("*")
                   if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})[:N_IMAGES]
    if len(paths) < N_IMAGES:
        print(f"\nImage: skipped (only {len(paths)} images in {IMAGE_DIR})")
        return {"image": "skipped_too_few_images"}
    enc = image_mod.ImageEncoder()
    net = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0).eval()
    transform = create_transform(**resolve_data_config({}, model=net))
    batch = _preprocess(paths, transform)

    chunk = int(getattr(enc, "batch_size", N_IMAGES))  # forward in the encoder's batch size

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            out = torch.cat([net(batch[i : i + chunk]) for i in range(0, len(batch), chunk)])
        return out

    enc.encode_paths(paths[:4])
    forward()
    kg_times, timm_times = [], []
    for _ in range(REPEATS):
        kg_times.append(timed(lambda: enc.encode_paths(paths))[0])
        timm_times.append(timed(forward)[0])
    kg_ips, timm_ips = N_IMAGES / min(kg_times), N_IMAGES / min(timm_times)
    print(f"\nImage: {N_IMAGES} H&M photos, {TIMM_MODEL}, batch {tuple(batch.shape)}, "
          f"forward in chunks of {chunk} (the ImageEncoder batch size), best of {REPEATS} interleaved")
    print("| encoder | images | seconds per run | items/s (best) |")
    print("|---|---|---|---|")
    print(f"| kgrank ImageEncoder.encode_paths (decode + preprocess + forward) | {N_IMAGES} | "
          f"{', '.join(f'{t:.2f}' for t in kg_times)} | {kg_ips:.1f} |")
    print(f"| timm forward on the preprocessed batch | {N_IMAGES} | "
          f"{', '.join(f'{t:.2f}' for t in timm_times)} | {timm_ips:.1f} |")
    print(f"kgrank/timm speed ratio {kg_ips / timm_ips:.3f}")
    return {"image_kgrank_ips": f"{kg_ips:.1f}", "image_timm_ips": f"{timm_ips:.1f}",
            "image_ratio": f"{kg_ips / timm_ips:.3f}"}


def main() -> None:
    print(machine())
    _, fields = text_part()
    fields.update(image_part())
    print("RESULT encode_speed " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
