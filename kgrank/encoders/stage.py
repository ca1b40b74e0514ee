"""The encoders step of a run (``kgrank encode``): item text and image embeddings, evaluated.

For each modality in ``encoders.modalities``:

* **text** - :func:`~kgrank.encoders.text.item_text` of every item, encoded by the configured
  :class:`~kgrank.encoders.text.TextEncoder`; items whose text is empty are masked.
* **image** - the file ``dataset.root / items.image`` of every item, encoded by the configured
  :class:`~kgrank.encoders.image.ImageEncoder`; items without an image, with a missing file or an
  unreadable one are masked and listed as failures.

Embeddings go through the shared :class:`~kgrank.encoders.store.EmbeddingStore`
(``encoders.cache_dir``), keyed by the sha256 of the text or of the image file's bytes, so only
inputs never seen by that encoder are encoded; failed images are never cached. With
``encoders.ray.enabled`` those inputs are encoded by a Ray Data actor pool
(:mod:`kgrank.distributed.encode`, imported only then) instead of in-process. The encoders are
still built in-process: their ids key the cache, and they embed search queries later.

With ``encoders.align.enabled`` the image model is first LiT-aligned
(:func:`kgrank.encoders.align.align`) on the catalog's image-text pairs (each item's photo and
:func:`~kgrank.encoders.text.item_text`; items without a usable image are skipped), the tuned
tensors are written to ``out_dir/image/aligned.safetensors`` (+ its JSON sidecar), and the items
are encoded by the aligned encoder, whose ``encoder_id`` carries the file's hash (so aligned
embeddings are cached apart from unaligned ones). Alignment uses catalog content only (titles and
photos, never interactions), so it leaks nothing from the validation/test split.

Each modality is written to ``out_dir/<modality>/``: ``embeddings.safetensors`` (``item_emb``
[n_items, dim] float32, L2-normalised rows, zero where masked; ``mask`` [n_items] bool; row ``i``
is item ``i``), ``item_ids.json`` and ``meta.json`` (encoder id, dim, counts, seconds, failures;
for an aligned image model also ``align``: seconds, final loss, pairs used and skipped).
A text-only and an image-only :class:`~kgrank.encoders.recommend.EmbeddingProfile` are tuned on
validation over ``encoders.profile_half_life`` and tested (``out_dir/metrics.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file, save
from tqdm.auto import tqdm

from kgrank.config import ConfigError, EncodersConfig, ImageConfig, RunConfig, TextConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import Split
from kgrank.encoders.recommend import EmbeddingProfile
from kgrank.encoders.store import EmbeddingStore, text_hash
from kgrank.encoders.text import TextEncoder, TextEncoderConfig, item_text
from kgrank.eval.protocol import EvalResult, Tuned, tune_and_test
from kgrank.eval.report import write_metrics_json
from kgrank.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger("kgrank")

EMBEDDINGS_FILE = "embeddings.safetensors"
ALIGNED_FILE = "aligned.safetensors"
RESULT_NAMES = {"text": "text-only", "image": "image-only"}

BatchEncode = Callable[[list[str]], tuple[np.ndarray, np.ndarray, list[str]]]
"""Encodes a batch of inputs: (embeddings [n, dim], ok [n] bool, failure reason or "" [n])."""


class QueryTextEncoder(Protocol):
    """What later stages need to embed search queries in the item-text space."""

    def encode(self, texts: Sequence[str | None], progress: bool = False) -> np.ndarray: ...


@dataclass
class EncodeStats:
    """How one modality's item embeddings were obtained (items, not distinct inputs)."""

    n_items: int
    n_encoded: int
    n_cached: int
    n_missing: int
    seconds: float
    ray: bool


@dataclass
class ItemEmbeddings:
    """One modality's item embeddings: row ``i`` is item ``i`` of the dataset."""

    emb: np.ndarray
    """[n_items, dim] float32, L2-normalised rows; zero rows where ``mask`` is False."""
    mask: np.ndarray
    """[n_items] bool: the item has an embedding."""
    encoder_id: str
    stats: EncodeStats | None = None

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])


@dataclass
class EncodeFailure:
    """An item left without an embedding, and why."""

    modality: str
    item_id: str
    path: str | None
    reason: str


@dataclass
class EncoderOutputs:
    """What the encoders stage hands to later stages."""

    text: ItemEmbeddings | None
    image: ItemEmbeddings | None
    results: list[EvalResult]
    text_encoder: QueryTextEncoder | None
    """Embeds queries in the item-text space (``.encode(texts)``); None without text."""
    image_text_encoder: Callable[[Sequence[str | None]], np.ndarray] | None
    """Embeds query texts in the image model's joint space; None without images."""
    failures: list[EncodeFailure]
    tuned: list[Tuned] = field(default_factory=list)


def encode_cached(
    store: EmbeddingStore,
    encoder_id: str,
    dim: int,
    keys: Sequence[str | None],
    inputs: Sequence[str | None],
    encode: BatchEncode,
) -> tuple[np.ndarray, np.ndarray, list[str], int, int]:
    """Embeddings of ``inputs`` through the store: (emb [n, dim], ok [n], reasons, n_encoded,
    n_cached).

    ``keys[i]`` is the cache key of ``inputs[i]``; None means there is nothing to encode (the
    row stays zero, ok False, and ``reasons[i]`` is left ""). Inputs whose key is stored are read
    from the store; the others are encoded once per distinct key, and only those encoded
    successfully are stored. The counts are of rows (items), not distinct keys.
    """
    n = len(keys)
    if len(inputs) != n:
        raise ValueError(f"{len(keys)} keys for {len(inputs)} inputs")
    emb = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    reasons = ["" for _ in range(n)]
    present = np.array([i for i, k in enumerate(keys) if k is not None], dtype=np.int64)
    present_keys = [str(keys[i]) for i in present]
    cached, found = store.lookup(encoder_id, present_keys)
    if found.any():
        if cached.shape[1] != dim:
            raise ValueError(f"the store holds dim {cached.shape[1]} for {encoder_id!r}, "
                             f"the encoder gives {dim}")
        emb[present[found]] = cached[found]
        ok[present[found]] = True
    todo: dict[str, int] = {}  # distinct uncached key -> first row with it
    for i, key, hit in zip(present.tolist(), present_keys, found.tolist(), strict=True):
        if not hit and key not in todo:
            todo[key] = i
    n_encoded = 0
    if todo:
        batch = [str(inputs[i]) for i in todo.values()]
        new_emb, new_ok, new_reasons = encode(batch)
        new_emb = np.asarray(new_emb, dtype=np.float32)
        new_ok = np.asarray(new_ok, dtype=bool)
        if new_ok.shape != (len(batch),) or len(new_reasons) != len(batch):
            raise ValueError(f"encoder returned {new_ok.shape} flags for {len(batch)} inputs")
        if new_ok.any() and new_emb.shape != (len(batch), dim):
            raise ValueError(f"encoder returned shape {new_emb.shape}, expected "
                             f"{(len(batch), dim)}")
        good = [k for k, flag in zip(todo, new_ok.tolist(), strict=True) if flag]
        if good:
            store.add(encoder_id, good, new_emb[new_ok])
        pos = {k: j for j, k in enumerate(todo)}
        for i, key, hit in zip(present.tolist(), present_keys, found.tolist(), strict=True):
            if hit:
                continue
            j = pos[key]
            if new_ok[j]:
                emb[i], ok[i] = new_emb[j], True
                n_encoded += 1
            else:
                reasons[i] = new_reasons[j] or "encoding failed"
    return emb, ok, reasons, n_encoded, int(found.sum())


def _absolute(spec: dict[str, Any]) -> dict[str, Any]:
    """The encoder spec with local model/checkpoint paths made absolute (for Ray workers)."""
    out = dict(spec)
    for key in ("model", "checkpoint", "aligned"):
        value = out.get(key)
        if isinstance(value, str) and Path(value).exists():
            out[key] = str(Path(value).resolve())
    name = out.get("model_name")
    prefix = "local-dir:"
    if isinstance(name, str) and name.startswith(prefix) and Path(name[len(prefix):]).exists():
        out["model_name"] = prefix + str(Path(name[len(prefix):]).resolve())
    return out


def _ray_encode(kind: str, spec: TextConfig | ImageConfig, cfg: EncodersConfig,
                progress: bool, extra: dict[str, Any] | None = None) -> BatchEncode:
    """Encodes through Ray actors built from ``spec`` (plus ``extra`` keys, e.g. ``aligned``)."""
    full = _absolute({**spec.model_dump(), **(extra or {})})

    def encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from kgrank.distributed.encode import encode_with_ray_detailed

        return encode_with_ray_detailed("text" if kind == "text" else "image", batch, full,
                                        cfg.ray, progress)

    return encode


def _load_error(section: str, exc: Exception) -> ConfigError:
    message = " ".join(str(exc).split())  # one line, whatever the library wrote
    if len(message) > 300:
        message = message[:297] + "..."
    return ConfigError(f"{section}: cannot load the encoder: {type(exc).__name__}: {message}")


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The :class:`TextEncoder` of a :class:`~kgrank.config.TextConfig`; a model that cannot be
    loaded raises :class:`~kgrank.config.ConfigError` naming ``encoders.text``."""
    try:
        return TextEncoder(TextEncoderConfig(model=cfg.model, max_length=cfg.max_length,
                                             batch_size=cfg.batch_size, dtype=cfg.dtype,
                                             device=cfg.device))
    except (OSError, RuntimeError) as exc:
        raise _load_error("encoders.text", exc) from exc


def build_image_encoder(cfg: ImageConfig, aligned: Path | None = None) -> Any:
    """The :class:`~kgrank.encoders.image.ImageEncoder` of a :class:`~kgrank.config.ImageConfig`
    (open_clip is imported only here), with the LiT-aligned weights ``aligned`` loaded over it
    when given; load failures raise :class:`~kgrank.config.ConfigError` naming
    ``encoders.image``."""
    from kgrank.encoders.image import ImageEncoder

    try:
        return ImageEncoder(model_name=cfg.model_name, pretrained=cfg.pretrained,
                            checkpoint=cfg.checkpoint, device=cfg.device,
                            batch_size=cfg.batch_size, aligned=aligned, image_size=cfg.image_size)
    except (OSError, RuntimeError) as exc:
        raise _load_error("encoders.image", exc) from exc


def align_image_model(
    dataset: Dataset, cfg: EncodersConfig, path: Path, progress: bool = True
) -> dict[str, Any]:
    """LiT-align the configured image model on the catalog's image-text pairs and write the tuned
    tensors to ``path`` (+ JSON sidecar); returns the stats recorded in ``meta.json``.

    Trains on catalog content only (item photos and texts, no interactions): no split leakage.
    A model LiT cannot tune, or a catalog with fewer than 2 usable images, raises
    :class:`~kgrank.config.ConfigError` naming ``encoders.align``.
    """
    from kgrank.encoders.align import align, save_aligned

    t0 = time.perf_counter()
    encoder = build_image_encoder(cfg.image)
    images = [None if ref is None else str(dataset.root / ref) for ref in _image_refs(dataset)]
    try:
        result = align(encoder.model, encoder.tokenizer, images, item_text(dataset.items),
                       cfg.align, preprocess=encoder.preprocess,
                       image_batch_size=cfg.image.batch_size, progress=progress)
    except ValueError as exc:
        raise ConfigError(f"encoders.align: cannot align the image model: {exc}") from exc
    save_aligned(encoder.model, path, result, extra={"base_encoder_id": encoder.encoder_id})
    return {
        "file": path.name,
        "seconds": round(time.perf_counter() - t0, 3),
        "final_loss": result.loss_history[-1] if result.loss_history else None,
        "n_pairs": result.n_pairs,
        "n_skipped": result.n_skipped,
    }


def encode_item_texts(
    dataset: Dataset, cfg: EncodersConfig, store: EmbeddingStore, progress: bool = True
) -> tuple[ItemEmbeddings, TextEncoder, list[EncodeFailure]]:
    """Text embeddings of every item (empty texts masked) and the encoder that made them."""
    t0 = time.perf_counter()
    texts = item_text(dataset.items)
    encoder = build_text_encoder(cfg.text)
    keys = [text_hash(t) if t.strip() else None for t in texts]

    def local(batch: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return (encoder.encode(batch, progress=progress), np.ones(len(batch), dtype=bool),
                ["" for _ in batch])

    encode = _ray_encode("text", cfg.text, cfg, progress) if cfg.ray.enabled else local
    emb, ok, reasons, n_enc, n_cached = encode_cached(store, encoder.encoder_id, encoder.dim,
                                                      keys, texts, encode)
    item_ids = [str(i) for i in dataset.items["item_id"]]
    failures = [
        EncodeFailure("text", item_ids[i], None, "no text" if keys[i] is None else reasons[i])
        for i in np.flatnonzero(~ok).tolist()
    ]
    stats = EncodeStats(len(texts), n_enc, n_cached, int((~ok).sum()),
                        time.perf_counter() - t0, cfg.ray.enabled)
    return ItemEmbeddings(emb, ok, encoder.encoder_id, stats), encoder, failures


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _image_refs(dataset: Dataset) -> list[str | None]:
    """The image path of each item as written in the dataset (None when it has none)."""
    if "image" not in dataset.items.columns:
        return [None] * dataset.n_items
    return [v if isinstance(v, str) and v.strip() else None for v in dataset.items["image"]]


def encode_item_images(
    dataset: Dataset,
    cfg: EncodersConfig,
    store: EmbeddingStore,
    progress: bool = True,
    aligned: Path | None = None,
) -> tuple[ItemEmbeddings, Any, list[EncodeFailure]]:
    """Image embeddings of every item (missing/unreadable images masked) and the encoder (with
    the LiT-aligned weights ``aligned`` loaded over it, locally and in the Ray actors)."""
    t0 = time.perf_counter()
    refs = _image_refs(dataset)
    paths: list[str | None] = []
    keys: list[str | None] = []
    early: dict[int, str] = {}  # items that never reach the encoder, and why
    for i, ref in enumerate(tqdm(refs, desc="hash images", unit="img", disable=not progress,
                                 leave=False)):
        if ref is None:
            early[i] = "no image"
            paths.append(None)
            keys.append(None)
            continue
        path = dataset.root / ref
        paths.append(str(path))
        try:
            keys.append(_file_sha256(path))
        except FileNotFoundError:
            early[i] = "file not found"
            keys.append(None)
        except OSError as exc:
            early[i] = f"unreadable file: {type(exc).__name__}: {exc}"
            keys.append(None)
    encoder = build_image_encoder(cfg.image, aligned)

    def local(batch: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        emb, ok = encoder.encode_paths(batch, progress=progress)
        reasons = ["" for _ in batch]
        for j, _path, reason in encoder.failures:
            reasons[j] = reason
        return emb, ok, reasons

    extra = None if aligned is None else {"aligned": str(aligned)}
    encode = _ray_encode("image", cfg.image, cfg, progress, extra) if cfg.ray.enabled else local
    emb, ok, reasons, n_enc, n_cached = encode_cached(store, encoder.encoder_id, encoder.dim,
                                                      keys, paths, encode)
    item_ids = [str(i) for i in dataset.items["item_id"]]
    failures = [
        EncodeFailure("image", item_ids[i], refs[i], early.get(i) or reasons[i])
        for i in np.flatnonzero(~ok).tolist()
    ]
    stats = EncodeStats(len(refs), n_enc, n_cached, int((~ok).sum()),
                        time.perf_counter() - t0, cfg.ray.enabled)
    return ItemEmbeddings(emb, ok, encoder.encoder_id, stats), encoder, failures


def summary_line(emb: ItemEmbeddings) -> str:
    """``encoder <id>, dim D, N items: E encoded, C cached, M missing (S s)``."""
    line = f"encoder {emb.encoder_id}, dim {emb.dim}"
    st = emb.stats
    if st is not None:
        line += (f", {st.n_items} items: {st.n_encoded} encoded, {st.n_cached} cached, "
                 f"{st.n_missing} missing ({st.seconds:.1f} s{', ray' if st.ray else ''})")
    return line


def write_item_embeddings(
    directory: Path,
    item_ids: list[str],
    emb: ItemEmbeddings,
    failures: list[EncodeFailure],
    extra: dict[str, Any] | None = None,
) -> None:
    """``embeddings.safetensors``, ``item_ids.json`` and ``meta.json`` (plus the ``extra`` keys),
    each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"item_emb": np.ascontiguousarray(emb.emb, dtype=np.float32),
               "mask": np.ascontiguousarray(emb.mask, dtype=bool)}
    atomic_write_bytes(directory / EMBEDDINGS_FILE,
                       save(tensors, metadata={"encoder_id": emb.encoder_id}))
    atomic_write_text(directory / "item_ids.json", json.dumps(item_ids) + "\n")
    meta: dict[str, Any] = {"encoder_id": emb.encoder_id, "dim": emb.dim}
    if emb.stats is not None:
        meta.update(asdict(emb.stats))
    meta.update(extra or {})
    meta["failures"] = [{"item_id": f.item_id, "path": f.path, "reason": f.reason}
                        for f in failures]
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2) + "\n")


def load_item_embeddings(directory: Path) -> ItemEmbeddings:
    """Read what :func:`write_item_embeddings` wrote (safetensors + meta.json; no pickle)."""
    tensors = load_file(str(Path(directory) / EMBEDDINGS_FILE))
    meta = json.loads((Path(directory) / "meta.json").read_text(encoding="utf-8"))
    return ItemEmbeddings(tensors["item_emb"], tensors["mask"].astype(bool), meta["encoder_id"])


def evaluate_profile(
    name: str, emb: ItemEmbeddings, split: Split, cfg: RunConfig, progress: bool = True
) -> Tuned | None:
    """An :class:`EmbeddingProfile` over ``emb`` tuned on validation and tested (None without
    a single embedded item)."""
    if not emb.mask.any():
        log.warning("%s: no item has an embedding, not evaluated", name)
        return None

    def make(half_life: float) -> EmbeddingProfile:
        return EmbeddingProfile(emb.emb, half_life)

    return tune_and_test(name, make, {"half_life": cfg.encoders.profile_half_life}, split,
                         cfg.eval, progress=progress)


def run_encoder_stage(
    dataset: Dataset, split: Split, cfg: RunConfig, out_dir: Path, progress: bool = True
) -> EncoderOutputs:
    """Encode every configured modality (through the cache, and Ray when enabled), write the
    embeddings under ``out_dir/<modality>/`` and evaluate a profile recommender on each (the
    image model LiT-aligned on the catalog first with ``encoders.align.enabled``)."""
    enc = cfg.encoders
    store = EmbeddingStore(enc.cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    item_ids = [str(i) for i in dataset.items["item_id"]]
    outputs = EncoderOutputs(None, None, [], None, None, [])
    main = cfg.eval.main_metric
    for modality in dict.fromkeys(enc.modalities):
        extra: dict[str, Any] = {}
        if modality == "text":
            emb, text_encoder, failures = encode_item_texts(dataset, enc, store, progress)
            outputs.text, outputs.text_encoder = emb, text_encoder
        else:
            aligned = None
            if enc.align.enabled:
                aligned = out_dir / modality / ALIGNED_FILE
                extra["align"] = align_image_model(dataset, enc, aligned, progress)
                log.info("image: LiT-aligned on %d pairs (%d skipped), final loss %s, %.1f s",
                         extra["align"]["n_pairs"], extra["align"]["n_skipped"],
                         extra["align"]["final_loss"], extra["align"]["seconds"])
            emb, image_encoder, failures = encode_item_images(dataset, enc, store, progress,
                                                              aligned)
            # queries are scored against the (aligned) photos in this encoder's joint space
            outputs.image, outputs.image_text_encoder = emb, image_encoder.encode_text
        outputs.failures += failures
        write_item_embeddings(out_dir / modality, item_ids, emb, failures, extra)
        tuned = evaluate_profile(RESULT_NAMES[modality], emb, split, cfg, progress)
        score = "n/a"
        if tuned is not None:
            outputs.tuned.append(tuned)
            outputs.results.append(tuned.test)
            score = f"{tuned.test.metrics[main]:.4f} ({tuned.params})"
        log.info("%s: %s; %s test %s=%s", modality, summary_line(emb), RESULT_NAMES[modality],
                 main, score)
    write_metrics_json(out_dir / "metrics.json", outputs.results)
    return outputs
