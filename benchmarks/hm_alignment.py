"""LiT catalog alignment of the offline open_clip model, measured on held-out H&M photos.

Data: ``../shared/datasets/hm-fashion-catalog-images-subset`` (read in place): the 3,934 articles
of ``articles_sample.csv`` that have a photo. 20% of them (seeded permutation of the sorted
article ids) are held out; the model is LiT-aligned (:mod:`kgrank.encoders.align`) on the image-
text pairs of the other 80%. Text of an article: ``"{prod_name}, {colour_group_name}
{product_type_name}"`` (e.g. "Tigra, Black Trousers"): the name plus the colour and type words a
shopper would type; the free-text ``detail_desc`` is left out (long, and mostly about fabric).

Reported on the held-out articles, for the offline model (EfficientNet-Lite0 trunk + MiniLM text
tower, fixed-seed random image projection):

- text -> image Recall@1 / Recall@10 (query: held-out texts, gallery: held-out images, one
  relevant image per text; ties count against the model);
- zero-shot product_type accuracy: each held-out image is assigned the product type whose prompt
  ``"a photo of a {product_type_name}"`` (lower-cased) is most similar, over the types present
  in the held-out set.

Variants: (a) random-init trunk (same architecture, no pretrained weights) after the same LiT
alignment, (b) ImageNet trunk before alignment, (c) ImageNet trunk after alignment, (d) random
trunk before alignment. ``--tune`` instead splits the TRAINING articles 80/20 again and reports a
small grid on that validation split only (the held-out 20% is not touched).

    .venv/bin/python benchmarks/hm_alignment.py

Variants of one product (same ``product_code``, other colour) can fall on both sides of the split,
as the split is by article; the script prints how many held-out articles have such a sibling.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import SHARED, machine  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from kgrank.config import AlignConfig  # noqa: E402
from kgrank.data.adapters.hm import image_path, read_articles  # noqa: E402
from kgrank.encoders.align import (  # noqa: E402
    LockedFeatures,
    align,
    embed_images,
    embed_texts,
    locked_image_features,
    retrieval_metrics,
    save_aligned,
    zero_shot_accuracy,
)
from kgrank.encoders.image import TEXT_CONTEXT_LENGTH, TIMM_NAME, build_offline_clip  # noqa: E402
from kgrank.encoders.text import default_text_model_dir  # noqa: E402

SOURCE = "hm-fashion-catalog-images-subset"
PROMPT = "a photo of a {}"


def article_text(row: dict[str, Any]) -> str:
    """``"{prod_name}, {colour_group_name} {product_type_name}"`` (missing parts skipped)."""
    name = str(row.get("prod_name") or "").strip()
    words = " ".join(
        str(row.get(c) or "").strip() for c in ("colour_group_name", "product_type_name")
    ).strip()
    return ", ".join(p for p in (name, words) if p)


def split_ids(ids: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(kept, held out): a seeded permutation of the sorted ids; ``share`` of them held out."""
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_out = round(share * len(ordered))
    out = {ordered[i] for i in perm[:n_out]}
    return [a for a in ordered if a not in out], [a for a in ordered if a in out]


def random_trunk_model(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose image trunk is re-initialised (timm init, no pretrained weights)."""
    import timm

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, global_pool="avg")
    trunk: Any = clone.visual.trunk  # type: ignore[union-attr]
    trunk.load_state_dict(fresh.state_dict(), strict=True)
    return clone.eval()


def features(
    name: str,
    model: nn.Module,
    preprocess: Any,
    paths: list[Path],
    cache: Path | None,
) -> tuple[LockedFeatures, float]:
    """Locked trunk features of all photos (optionally cached on disk), and the seconds taken."""
    key = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    file = cache / f"{name}-{key}.safetensors" if cache is not None else None
    t0 = time.perf_counter()
    if file is not None and file.is_file():
        data = load_file(str(file))
        feats = LockedFeatures(data["features"], data["mask"].numpy().astype(bool), [])
        return feats, time.perf_counter() - t0
    feats = locked_image_features(model, preprocess, paths, batch_size=32, progress=True)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        mask = torch.from_numpy(feats.mask.astype(np.uint8))
        save_file({"features": feats.features.contiguous(), "mask": mask}, str(file))
    return feats, time.perf_counter() - t0


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    feats: LockedFeatures,
    texts: list[str],
    types: list[str],
) -> dict[str, float]:
    """Held-out metrics: text->image R@1/R@10 and zero-shot product-type accuracy."""
    ok = np.flatnonzero(feats.mask)
    img = embed_images(model, feats)[torch.from_numpy(ok)]
    txt = embed_texts(model, tokenizer, [texts[i] for i in ok])
    out = retrieval_metrics(txt, img, ks=(1, 10))
    classes = sorted({types[i] for i in ok})
    labels = [classes.index(types[i]) for i in ok]
    class_emb = embed_texts(model, tokenizer, [PROMPT.format(c.lower()) for c in classes])
    out["zero_shot"] = zero_shot_accuracy(img, class_emb, labels)
    return out


def load_articles(src: Path) -> pd.DataFrame:
    """Articles with a photo in ``src/images`` (article_id sorted), with ``text`` and ``path``."""
    df = read_articles(src / "articles_sample.csv")
    df["path"] = [src / image_path(a) for a in df["article_id"]]
    df = df[[p.is_file() for p in df["path"]]].sort_values("article_id").reset_index(drop=True)
    df["text"] = [article_text(r) for r in df.to_dict("records")]
    return df


def run_tune(
    df: pd.DataFrame,
    train_ids: list[str],
    model: nn.Module,
    tokenizer: Any,
    feats: LockedFeatures,
    args: argparse.Namespace,
) -> None:
    """Grid over lr x epochs x top layers on an 80/20 split of the TRAINING articles only."""
    fit_ids, val_ids = split_ids(train_ids, 0.2, args.split_seed + 1)
    pos = {a: i for i, a in enumerate(df["article_id"])}
    fit = [pos[a] for a in fit_ids]
    val = [pos[a] for a in val_ids]
    texts = df["text"].tolist()
    types = df["product_type_name"].tolist()
    print(f"tune: {len(fit)} fit / {len(val)} validation articles (all from the training 80%)")
    print("| lr | epochs | batch | top layers | val R@1 | val R@10 | val zero-shot | s |")
    print("|---|---|---|---|---|---|---|---|")
    grid = itertools.product(args.tune_lr, args.tune_epochs, args.tune_batch, args.tune_layers)
    for lr, epochs, batch, layers in grid:
        cfg = AlignConfig(
            enabled=True,
            epochs=epochs,
            batch_size=batch,
            lr=lr,
            train_top_layers=layers,
            seed=args.seed,
        )
        m = copy.deepcopy(model)
        res = align(m, tokenizer, feats.subset(fit), [texts[i] for i in fit], cfg, progress=False)
        met = evaluate(
            m, tokenizer, feats.subset(val), [texts[i] for i in val], [types[i] for i in val]
        )
        print(
            f"| {lr:g} | {epochs} | {batch} | {layers} | {met['recall@1']:.4f} | "
            f"{met['recall@10']:.4f} | {met['zero_shot']:.4f} | {res.seconds:.0f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=SHARED / SOURCE)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=AlignConfig().epochs)
    p.add_argument("--batch-size", type=int, default=AlignConfig().batch_size)
    p.add_argument("--lr", type=float, default=AlignConfig().lr)
    p.add_argument("--top-layers", type=int, default=AlignConfig().train_top_layers)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--features-cache",
        type=Path,
        default=None,
        help="directory to keep the locked trunk features in between runs",
    )
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        help="write the aligned ImageNet-trunk tensors here (.safetensors + .json)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="grid on a split of the training articles instead of the held-out test",
    )
    p.add_argument("--tune-lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--tune-epochs", type=int, nargs="+", default=[5, 10])
    p.add_argument("--tune-batch", type=int, nargs="+", default=[128])
    p.add_argument("--tune-layers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    import open_clip

    df = load_articles(args.src)
    train_ids, test_ids = split_ids(df["article_id"].tolist(), args.holdout, args.split_seed)
    pos = {a: i for i, a in enumerate(df["article_id"])}
    train = [pos[a] for a in train_ids]
    test = [pos[a] for a in test_ids]
    codes_train = set(df["product_code"].iloc[train])
    siblings = int(sum(c in codes_train for c in df["product_code"].iloc[test]))
    print(
        f"{len(df)} articles with a photo: {len(train)} align / {len(test)} held out "
        f"({siblings} held-out articles share a product_code with a training article)"
    )
    print(f"example text: {df['text'].iloc[0]!r}")

    imagenet, preprocess = build_offline_clip()
    random_init = random_trunk_model(imagenet, args.seed)
    tokenizer = open_clip.tokenizer.HFTokenizer(
        str(default_text_model_dir()), context_length=TEXT_CONTEXT_LENGTH
    )
    paths = df["path"].tolist()
    feats_in, sec_in = features("imagenet", imagenet, preprocess, paths, args.features_cache)
    if args.tune:
        run_tune(df, train_ids, imagenet, tokenizer, feats_in, args)
        return
    feats_rand, sec_rand = features("random", random_init, preprocess, paths, args.features_cache)
    print(
        f"locked trunk features: imagenet {sec_in:.0f} s, random-init {sec_rand:.0f} s; "
        f"unusable photos: {int((~feats_in.mask).sum())}"
    )

    texts = df["text"].tolist()
    types = df["product_type_name"].tolist()
    test_texts = [texts[i] for i in test]
    test_types = [types[i] for i in test]
    cfg = AlignConfig(
        enabled=True,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        train_top_layers=args.top_layers,
        seed=args.seed,
    )
    rows: dict[str, dict[str, float]] = {}
    rows["(d) random-init trunk, before"] = evaluate(
        random_init, tokenizer, feats_rand.subset(test), test_texts, test_types
    )
    rows["(b) ImageNet trunk, before"] = evaluate(
        imagenet, tokenizer, feats_in.subset(test), test_texts, test_types
    )
    seconds: dict[str, float] = {}
    for label, model, feats in (
        ("(a) random-init trunk, after LiT", random_init, feats_rand),
        ("(c) ImageNet trunk, after LiT", imagenet, feats_in),
    ):
        res = align(model, tokenizer, feats.subset(train), [texts[i] for i in train], cfg)
        seconds[label] = res.seconds
        print(
            f"{label}: loss per epoch {[round(x, 3) for x in res.loss_history]}, "
            f"{res.n_tuned_params:,} tuned parameters, {res.seconds:.0f} s"
        )
        rows[label] = evaluate(model, tokenizer, feats.subset(test), test_texts, test_types)
        if args.save is not None and model is imagenet:
            save_aligned(model, args.save, res, extra={"benchmark": "hm_alignment"})

    ok = np.flatnonzero(feats_in.subset(test).mask)
    counts = pd.Series([test_types[i] for i in ok]).value_counts()
    n_test = len(ok)
    print(
        f"\nheld out: {n_test} images/texts; {len(counts)} product types, majority class "
        f"{counts.index[0]!r} {counts.iloc[0] / n_test:.3f}; chance R@1 {1 / n_test:.4f}, "
        f"R@10 {10 / n_test:.4f}"
    )
    print(f"config: {cfg.model_dump()}; machine: {machine()}\n")
    order = [
        "(d) random-init trunk, before",
        "(a) random-init trunk, after LiT",
        "(b) ImageNet trunk, before",
        "(c) ImageNet trunk, after LiT",
    ]
    print("| model | text->image R@1 | text->image R@10 | zero-shot product_type acc |")
    print("|---|---|---|---|")
    for label in order:
        m = rows[label]
        print(f"| {label} | {m['recall@1']:.4f} | {m['recall@10']:.4f} | {m['zero_shot']:.4f} |")
    print(
        f"| chance / majority class | {1 / n_test:.4f} | {10 / n_test:.4f} | "
        f"{counts.iloc[0] / n_test:.4f} |"
    )
    a, b, c = (rows[k] for k in order[1:])
    beats = all(c[k] > max(a[k], b[k]) for k in ("recall@10", "zero_shot"))
    wall = time.perf_counter() - t_start
    print(
        f"\nRESULT hm_alignment n_test={n_test} n_classes={len(counts)} "
        f"majority={counts.iloc[0] / n_test:.4f} "
        f"after_r1={c['recall@1']:.4f} after_r10={c['recall@10']:.4f} "
        f"after_zs={c['zero_shot']:.4f} before_r1={b['recall@1']:.4f} "
        f"before_r10={b['recall@10']:.4f} before_zs={b['zero_shot']:.4f} "
        f"random_after_r1={a['recall@1']:.4f} random_after_r10={a['recall@10']:.4f} "
        f"random_after_zs={a['zero_shot']:.4f} epochs={cfg.epochs} lr={cfg.lr:g} "
        f"batch={cfg.batch_size} top_layers={cfg.train_top_layers} "
        f"align_s={seconds[order[3]]:.0f} wall_s={wall:.0f} beats_both={str(beats).lower()}"
    )


if __name__ == "__main__":
    main()
