"""Catalog alignment of an open_clip model by LiT: locked-image text tuning.

Zhai, Wang, Mustafa, Steiner, Keysers, Kolesnikov, Beyer: "LiT: Zero-Shot Transfer with
Locked-image text Tuning", CVPR 2022 (arXiv:2111.07991). The image trunk keeps its pretrained
weights (it is *locked*); only the text side and the projections learn to map into the image
representation. Because the trunk never changes, its pooled features are computed once per image
(no grad, eval mode) and cached in memory, so training costs little more than text forward and
backward passes. Likewise the output of the frozen lower text layers is computed once per text
and cached (when it fits in ``TEXT_CACHE_BYTES``), so each step runs only the tuned top layers.

Tuned here: the image projection head (``visual.head``), the top ``train_top_layers``
transformer layers of the text tower, the text projection (``text.proj``, when it has weights)
and the logit scale. Everything else (the image trunk, the token embeddings and the lower text
layers) is left bit-identical.

Loss: the symmetric InfoNCE loss of CLIP. For a batch of ``B`` image-title pairs with
L2-normalised image embeddings ``u_i = g(f(x_i)) / ||g(f(x_i))||`` (``f`` the locked trunk,
``g`` the projection head), L2-normalised text embeddings ``v_i`` and the learned temperature
``t = exp(s)`` (``s`` the logit scale, clamped to ``t <= 100`` as in CLIP)::

    L = 1/(2B) * sum_i [ -log( exp(t u_i.v_i) / sum_j exp(t u_i.v_j) )     (image -> text)
                         -log( exp(t v_i.u_i) / sum_j exp(t v_i.u_j) ) ]   (text -> image)

Optimisation: AdamW (``AlignConfig.lr``; weight decay ``WEIGHT_DECAY`` on matrices only), linear
warm-up over the first ``WARMUP_SHARE`` of the steps then cosine decay to zero, gradient norm
clipped to ``CLIP_GRAD_NORM``. The model stays in eval mode (no dropout), so a run is
deterministic for a given seed.

Supported models: an open_clip ``CustomTextCLIP`` whose image tower is a timm trunk with a
projection head (``visual.trunk`` + ``visual.head``, e.g. the offline EfficientNet-Lite0 model of
:mod:`kgrank.encoders.image`) and whose text tower is a Hugging Face encoder (``text.transformer``,
``text.proj``). Other towers raise a ``ValueError``.

Pairs whose image is missing or unreadable are masked out of the training (and reported in
:attr:`AlignResult.failures`); they never stop a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kgrank.config import AlignConfig
from kgrank.io import atomic_write_bytes, atomic_write_text

FORMAT = "kgrank-lit-align/1"
MAX_LOGIT_SCALE = math.log(100.0)
WEIGHT_DECAY = 0.01
WARMUP_SHARE = 0.1
CLIP_GRAD_NORM = 1.0
TEXT_CACHE_BYTES = 1 << 30  # cache frozen text-layer outputs up to this size, else recompute

Failure = tuple[int, str | None, str]
Tokenizer = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LockedFeatures:
    """Pooled features of the locked image trunk, one row per input image.

    ``features`` is [n, C] float32 on the CPU with zero rows where ``mask`` is False (missing or
    unreadable image; the reason is in ``failures`` as ``(index, path, reason)``).
    """

    features: torch.Tensor
    mask: np.ndarray
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray) -> LockedFeatures:
        """The rows ``index`` (failures renumbered to the new positions)."""
        idx = np.asarray(index, dtype=np.int64)
        pos = {int(old): new for new, old in enumerate(idx)}
        failures = [(pos[i], p, r) for i, p, r in self.failures if i in pos]
        return LockedFeatures(self.features[torch.from_numpy(idx)], self.mask[idx], failures)


@dataclass
class AlignResult:
    """Outcome of :func:`align`: loss per epoch, timings, what was tuned and what was skipped."""

    loss_history: list[float]
    seconds: float
    feature_seconds: float
    n_pairs: int
    n_skipped: int
    failures: list[Failure]
    tuned: list[str]
    n_tuned_params: int
    config: dict[str, Any]


def _check_model(model: nn.Module) -> None:
    visual = getattr(model, "visual", None)
    text = getattr(model, "text", None)
    if visual is None or not hasattr(visual, "trunk") or not hasattr(visual, "head"):
        raise ValueError(
            "LiT alignment needs an open_clip image tower with a timm trunk and a projection "
            "head (model.visual.trunk / model.visual.head)"
        )
    if text is None or not hasattr(text, "transformer") or not hasattr(text, "proj"):
        raise ValueError(
            "LiT alignment needs an open_clip Hugging Face text tower "
            "(model.text.transformer / model.text.proj)"
        )
    if not isinstance(getattr(model, "logit_scale", None), nn.Parameter):
        raise ValueError("the model has no logit_scale parameter")


def _visual(model: nn.Module) -> Any:
    return model.visual


def _text(model: nn.Module) -> Any:
    return model.text


def text_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of the model's Hugging Face text tower, bottom first."""
    _check_model(model)
    text = _text(model)
    transformer = text.transformer
    encoder = getattr(transformer, "encoder", transformer)
    attr = "layer"
    model_type = getattr(getattr(text, "config", None), "model_type", None)
    try:
        from open_clip.hf_configs import arch_dict

        attr = str(arch_dict[model_type]["config_names"]["layer_attr"])
    except (ImportError, KeyError):
        attr = "layer"
    layers = getattr(encoder, attr, None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the transformer layers ({attr!r}) of the text tower")
    return layers


def tuned_parameter_names(model: nn.Module, train_top_layers: int) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters LiT tunes, in model order."""
    layers = text_layers(model)
    if not 0 <= train_top_layers <= len(layers):
        raise ValueError(
            f"train_top_layers must be in [0, {len(layers)}] for this text tower, "
            f"got {train_top_layers}"
        )
    chosen: set[int] = {id(p) for p in _visual(model).head.parameters()}
    chosen |= {id(p) for p in _text(model).proj.parameters()}
    top = list(layers)[len(layers) - train_top_layers :]
    for layer in top:
        chosen |= {id(p) for p in layer.parameters()}
    chosen.add(id(model.logit_scale))
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    if any(n.startswith("visual.trunk.") for n in names):
        raise ValueError("the projection head shares parameters with the locked image trunk")
    return names


def locked_image_features(
    model: nn.Module,
    preprocess: Callable[[Any], torch.Tensor],
    images: Sequence[str | Path | None],
    batch_size: int = 32,
    progress: bool = False,
) -> LockedFeatures:
    """Pooled features of the locked trunk (``model.visual.trunk``) for image files.

    Missing/unreadable images give a zero row, mask False and a failure entry; never an error.
    """
    from kgrank.encoders.image import _load_rgb

    _check_model(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    trunk: nn.Module = _visual(model).trunk
    device = next(trunk.parameters()).device
    was_training = trunk.training
    trunk.eval()
    n = len(images)
    feats: torch.Tensor | None = None
    mask = np.zeros(n, dtype=bool)
    failures: list[Failure] = []
    batches: Any = range(math.ceil(n / batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="locked image features", unit="batch")
    try:
        with torch.no_grad():
            for b in batches:
                idx: list[int] = []
                tensors: list[torch.Tensor] = []
                for i in range(b * batch_size, min(n, (b + 1) * batch_size)):
                    path = images[i]
                    img, reason = _load_rgb(path)
                    if img is not None:
                        try:
                            tensors.append(preprocess(img))
                            idx.append(i)
                            continue
                        except Exception as exc:  # a decodable file the transform rejects
                            reason = f"preprocess failed: {type(exc).__name__}: {exc}"
                    failures.append((i, None if path is None else str(path), reason))
                if not idx:
                    continue
                out = trunk(torch.stack(tensors).to(device)).float().cpu()
                if out.ndim != 2:
                    raise ValueError(
                        f"the trunk returns {tuple(out.shape)}, not pooled [batch, C] features"
                    )
                if feats is None:
                    feats = torch.zeros(n, out.shape[1], dtype=torch.float32)
                feats[idx] = out
                mask[idx] = True
    finally:
        trunk.train(was_training)
    if feats is None:  # no readable image at all: learn the width from a probe
        feats = torch.zeros(n, _trunk_width(model), dtype=torch.float32)
    return LockedFeatures(feats, mask, failures)


def _trunk_width(model: nn.Module) -> int:
    head: nn.Module = _visual(model).head
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    trunk: Any = _visual(model).trunk
    return int(trunk.num_features)


def embed_images(model: nn.Module, features: LockedFeatures | torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings [n, d] (CPU float32) from locked trunk features.

    Equal to ``model.encode_image(x, normalize=True)`` for the images the features came from;
    masked rows of a :class:`LockedFeatures` stay zero.
    """
    _check_model(model)
    head: nn.Module = _visual(model).head
    feats = features.features if isinstance(features, LockedFeatures) else features
    device = next(model.parameters()).device
    with torch.no_grad():
        out = F.normalize(head(feats.to(device)).float(), dim=-1).cpu()
    if isinstance(features, LockedFeatures):
        out[torch.from_numpy(~features.mask)] = 0.0
    return out


def _trim(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing all-padding columns (the HF tower masks padding, so outputs are equal)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :width]


def _pad_id(model: nn.Module) -> int:
    config = getattr(_text(model), "config", None)
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def embed_texts(
    model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str | None], batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised text embeddings [n, d] (CPU float32); None is encoded as ""."""
    _check_model(model)
    clean = [t if isinstance(t, str) else "" for t in texts]
    device = next(model.parameters()).device
    pad = _pad_id(model)
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        if not clean:
            head: nn.Module = _visual(model).head
            width = int(head(torch.zeros(1, _trunk_width(model), device=device)).shape[-1])
            return torch.zeros(0, width, dtype=torch.float32)
        for start in range(0, len(clean), batch_size):
            tokens = _trim(tokenizer(clean[start : start + batch_size]), pad).to(device)
            feats = _text(model)(tokens)
            chunks.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(chunks)


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of matched rows; inputs are L2-normalised [B, d]."""
    logits = logit_scale.exp() * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class _GivenStates(nn.Module):
    """Stands in for the text embeddings module: returns the hidden states it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.states is None:
            raise RuntimeError("no cached hidden states were given")
        return self.states


def _embeddings_attr(model: nn.Module) -> str:
    model_type = getattr(getattr(_text(model), "config", None), "model_type", None)
    try:
        from open_clip.hf_configs import arch_dict

        return str(arch_dict[model_type]["config_names"]["token_embeddings_attr"])
    except (ImportError, KeyError):
        return "embeddings"


@contextmanager
def _text_tower_part(
    model: nn.Module, layers: Sequence[nn.Module], embeddings: nn.Module | None
) -> Iterator[None]:
    """Run the text tower with only ``layers`` (and ``embeddings`` instead of its own)."""
    transformer = _text(model).transformer
    encoder = getattr(transformer, "encoder", transformer)
    full = text_layers(model)
    layer_attr = next(k for k, v in encoder.named_children() if v is full)
    emb_attr = _embeddings_attr(model)
    own_embeddings = getattr(transformer, emb_attr)
    try:
        setattr(encoder, layer_attr, nn.ModuleList(layers))
        if embeddings is not None:
            setattr(transformer, emb_attr, embeddings)
        yield
    finally:
        setattr(encoder, layer_attr, full)
        setattr(transformer, emb_attr, own_embeddings)


class _TextRunner:
    """Text embeddings of the training texts for the tuned part of the text tower.

    The frozen lower layers (and token embeddings) run once per text under no_grad; their output
    is cached and each training step runs only the top ``k`` layers, pooling and projection.
    Without room for the cache (or without a recognisable BERT-style tower) every step runs the
    whole tower, with the same result.
    """

    def __init__(
        self, model: nn.Module, tokens: torch.Tensor, k: int, batch_size: int, progress: bool
    ) -> None:
        self.model = model
        self.pad = _pad_id(model)
        self.tokens = _trim(tokens, self.pad)
        self.device = next(model.parameters()).device
        layers = list(text_layers(model))
        self.top = layers[len(layers) - k :]
        self.cache: torch.Tensor | None = None
        transformer = _text(model).transformer
        hidden = int(getattr(getattr(_text(model), "config", None), "hidden_size", 0) or 0)
        size = self.tokens.numel() * hidden * 4
        if (
            not hidden
            or size > TEXT_CACHE_BYTES
            or not hasattr(transformer, _embeddings_attr(model))
        ):
            return
        cache = torch.zeros(*self.tokens.shape, hidden, dtype=torch.float32)
        starts: Any = range(0, len(self.tokens), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="frozen text layers", unit="batch")
        bottom = layers[: len(layers) - k]
        with torch.no_grad(), _text_tower_part(model, bottom, None):
            for start in starts:
                tok = _trim(self.tokens[start : start + batch_size], self.pad).to(self.device)
                mask = (tok != self.pad).long()
                out = transformer(input_ids=tok, attention_mask=mask).last_hidden_state
                cache[start : start + len(tok), : tok.shape[1]] = out.float().cpu()
        self.cache = cache

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings of the texts ``idx`` (with grad for the tuned part)."""
        tok = _trim(self.tokens[idx], self.pad)
        text = _text(self.model)
        if self.cache is None:
            out: torch.Tensor = text(tok.to(self.device))
            return out
        stub = _GivenStates()
        stub.states = self.cache[idx, : tok.shape[1]].to(self.device)
        with _text_tower_part(self.model, self.top, stub):
            out = text(tok.to(self.device))
        return out


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, round(WARMUP_SHARE * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def align(
    model: nn.Module,
    tokenizer: Tokenizer,
    images: Sequence[str | Path | None] | LockedFeatures,
    texts: Sequence[str],
    cfg: AlignConfig,
    *,
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    image_batch_size: int = 32,
    progress: bool = True,
) -> AlignResult:
    """LiT-tune ``model`` in place on image-text pairs (``images[i]`` matches ``texts[i]``).

    ``images`` are image paths (then ``preprocess`` is required and the locked trunk features
    are computed first) or precomputed :class:`LockedFeatures`. Pairs without a usable image are
    skipped. ``cfg.enabled`` is not consulted: calling this function is the decision to align.
    Returns the mean loss per epoch and what was tuned; ``requires_grad`` flags and train/eval
    modes of the model are restored afterwards.
    """
    _check_model(model)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    t0 = time.perf_counter()
    if isinstance(images, LockedFeatures):
        feats = images
    else:
        if preprocess is None:
            raise ValueError("pass preprocess to compute the locked features of image paths")
        feats = locked_image_features(model, preprocess, images, image_batch_size, progress)
    feature_seconds = time.perf_counter() - t0
    valid = np.flatnonzero(feats.mask)
    if len(valid) < 2:
        raise ValueError(
            f"need at least 2 pairs with a usable image to contrast, got {len(valid)} "
            f"({len(feats.failures)} images missing or unreadable)"
        )
    names = tuned_parameter_names(model, cfg.train_top_layers)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    clean = [t if isinstance(t, str) else "" for t in texts]
    tokens = tokenizer([clean[i] for i in valid])
    image_feats = feats.features[torch.from_numpy(valid)]

    saved_grad = {n: p.requires_grad for n, p in params.items()}
    saved_modes = {m: m.training for m in model.modules()}
    decay = [params[n] for n in names if params[n].ndim >= 2]
    no_decay = [params[n] for n in names if params[n].ndim < 2]
    n_batches = sum(1 for s in range(0, len(valid), cfg.batch_size) if len(valid) - s >= 2)
    total = n_batches * cfg.epochs
    history: list[float] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        model.eval()
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": WEIGHT_DECAY},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, total)
        )
        logit_scale: nn.Parameter = model.logit_scale  # type: ignore[assignment]
        head: nn.Module = _visual(model).head
        text = _TextRunner(model, tokens, cfg.train_top_layers, 256, progress)
        epochs: Any = range(cfg.epochs)
        bar: Any = None
        if progress:
            from tqdm import tqdm

            epochs = bar = tqdm(epochs, desc="LiT align", unit="epoch")
        for _ in epochs:
            order = torch.randperm(len(valid), generator=gen)
            losses: list[float] = []
            for start in range(0, len(valid), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                if len(idx) < 2:
                    continue
                img = F.normalize(head(image_feats[idx].to(device)), dim=-1)
                txt = F.normalize(text(idx), dim=-1)
                loss = clip_loss(img, txt, logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([params[n] for n in names], CLIP_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)))
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1]:.4f}", scale=f"{logit_scale.exp().item():.1f}")
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_grad[n])
            p.grad = None
        for m, mode in saved_modes.items():
            m.training = mode
    return AlignResult(
        loss_history=history,
        seconds=time.perf_counter() - t0,
        feature_seconds=feature_seconds,
        n_pairs=len(valid),
        n_skipped=len(feats) - len(valid),
        failures=list(feats.failures),
        tuned=names,
        n_tuned_params=sum(params[n].numel() for n in names),
        config=cfg.model_dump(),
    )


def retrieval_metrics(
    text_emb: np.ndarray | torch.Tensor,
    image_emb: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 10),
) -> dict[str, float]:
    """Text -> image retrieval with one relevant image per text (row ``i`` matches row ``i``).

    Rank of the relevant image = 1 + number of OTHER gallery images scoring >= it (ties count
    against the model, so constant embeddings score no better than chance). Returns
    ``recall@k`` for each k, ``mrr``, ``median_rank`` and ``n``.
    """
    t = np.asarray(text_emb, dtype=np.float32)
    g = np.asarray(image_emb, dtype=np.float32)
    if t.ndim != 2 or g.ndim != 2 or t.shape != g.shape:
        raise ValueError(f"need matching [n, d] arrays, got {t.shape} and {g.shape}")
    n = len(t)
    ranks = np.zeros(n, dtype=np.int64)
    chunk = 1024
    for start in range(0, n, chunk):
        s = t[start : start + chunk] @ g.T
        rows = np.arange(len(s))
        true = s[rows, start + rows]
        ge = (s >= true[:, None]).sum(axis=1) - 1  # minus the relevant image itself
        ranks[start : start + len(s)] = ge + 1
    out: dict[str, float] = {f"recall@{k}": float(np.mean(ranks <= k)) if n else 0.0 for k in ks}
    out["mrr"] = float(np.mean(1.0 / ranks)) if n else 0.0
    out["median_rank"] = float(np.median(ranks)) if n else 0.0
    out["n"] = float(n)
    return out


def zero_shot_accuracy(
    image_emb: np.ndarray | torch.Tensor,
    class_text_emb: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray,
) -> float:
    """Share of images whose most similar class prompt embedding is their label's."""
    x = np.asarray(image_emb, dtype=np.float32)
    c = np.asarray(class_text_emb, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1] or len(y) != len(x):
        raise ValueError(
            f"shapes do not match: images {x.shape}, classes {c.shape}, labels {y.shape}"
        )
    if len(x) == 0:
        return 0.0
    if y.min() < 0 or y.max() >= len(c):
        raise ValueError(f"labels must be in [0, {len(c)})")
    return float(np.mean((x @ c.T).argmax(axis=1) == y))


def base_fingerprint(model: nn.Module, tuned: Sequence[str]) -> str:
    """sha256 of every state tensor LiT does NOT tune (names, dtypes, shapes and bytes)."""
    skip = set(tuned)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in skip:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an aligned-weights file: ``x.safetensors`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def save_aligned(
    model: nn.Module,
    path: str | Path,
    result: AlignResult,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ONLY the tuned tensors to ``path`` (safetensors) plus a JSON sidecar.

    The sidecar records the format, the tuned names, the sha256 of the tensor file, a
    fingerprint of all untuned weights (so they cannot be loaded onto another trunk), the
    alignment config, loss history and ``extra``. Both files are written atomically.
    """
    from safetensors.torch import save

    path = Path(path)
    params = dict(model.named_parameters())
    missing = [n for n in result.tuned if n not in params]
    if missing:
        raise ValueError(f"the model has no parameters {missing[:5]}")
    tensors = {n: params[n].detach().cpu().contiguous().clone() for n in result.tuned}
    data = save(tensors, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "base_fingerprint": base_fingerprint(model, result.tuned),
        "tuned": list(result.tuned),
        "n_tuned_params": result.n_tuned_params,
        "config": result.config,
        "loss_history": result.loss_history,
        "n_pairs": result.n_pairs,
        "n_skipped": result.n_skipped,
        "seconds": round(result.seconds, 3),
        "extra": extra or {},
    }
    atomic_write_bytes(path, data)
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_aligned(model: nn.Module, path: str | Path, check_base: bool = True) -> dict[str, Any]:
    """Load tensors written by :func:`save_aligned` into ``model`` (in place); returns the sidecar.

    Verifies the sidecar's tensor hash, that every tensor exists in the model with the same
    shape, and (``check_base``) that the model's untuned weights match those it was aligned on.
    """
    from safetensors.torch import load

    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aligned weights not found: {path}")
    if not side.is_file():
        raise FileNotFoundError(f"the JSON sidecar of {path} is missing: {side}")
    data = path.read_bytes()
    meta: dict[str, Any] = json.loads(side.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{side}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise ValueError(f"{path} does not match the sha256 recorded in {side}")
    tensors = load(data)
    if sorted(tensors) != sorted(meta.get("tuned", [])):
        raise ValueError(f"{path}: tensor names differ from the sidecar's 'tuned' list")
    params = dict(model.named_parameters())
    errors = [
        f"{n}: not in the model"
        if n not in params
        else f"{n}: shape {tuple(t.shape)} != model {tuple(params[n].shape)}"
        for n, t in tensors.items()
        if n not in params or tuple(params[n].shape) != tuple(t.shape)
    ]
    if errors:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(errors[:5]))
    if check_base and base_fingerprint(model, list(tensors)) != meta.get("base_fingerprint"):
        raise ValueError(
            f"{path} was aligned on other base weights (image trunk / frozen text layers) than "
            "this model's"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return meta
