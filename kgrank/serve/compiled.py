"""LightGBM trees compiled to native code for the request path (`lleaves`_).

LightGBM's ``Booster.predict`` walks each tree's node arrays per row; on the search path (one
request, ~1,000 candidates, ~100-200 trees) that was a quarter of a request. lleaves compiles
the model text into one native function with LLVM (each tree's splits become branches), which
predicts the same raw scores several times faster on one core. The sum over trees runs in a
different order than LightGBM's, so scores agree to ~1e-12 (float64 rounding), not bit for bit;
the run's evaluation and :meth:`kgrank.serve.searcher.Searcher.score_part` keep LightGBM.

The compiled object is cached on disk, keyed by the model text and the lleaves / llvmlite
versions (compiling takes seconds; loading the cache, milliseconds). When lleaves is missing or
fails, :func:`compile_booster` returns None and the caller keeps LightGBM.

.. _lleaves: https://github.com/siboehm/lleaves
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("kgrank")

CACHE_ENV = "KGRANK_CACHE"
"""Environment variable overriding the cache directory (default ``~/.cache/kgrank``)."""


COMPILE_OPTIONS: dict[str, Any] = {"fcodemodel": "small"}
"""lleaves compile options. LLVM's small code model (the compiled trees are a few MB, far under
its 2 GB limit) predicted the same scores 20-25 % faster than lleaves' default, the large
one (demo 1.51 -> 1.25 ms, Amazon Beauty 3.45 -> 2.65 ms per batch of ~4,000 rows)."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "kgrank"


class CompiledTrees:
    """``predict(x) -> raw scores`` of a LightGBM model text, compiled by lleaves."""

    def __init__(self, model: Any, n_features: int) -> None:
        self._model = model
        self.n_features = n_features

    def predict(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """Raw scores of the rows of ``x`` ``[n, n_features]`` (float64)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected [n, {self.n_features}] features, got {x.shape}")
        if len(x) == 0:
            return np.zeros(0, np.float64)
        return np.asarray(self._model.predict(np.ascontiguousarray(x, np.float64),
                                              n_jobs=threads), np.float64)


def compile_booster(model_text: str, cache: Path | None = None) -> CompiledTrees | None:
    """Compile a LightGBM model text (``Booster.model_to_string(num_iteration=...)``: the trees
    to use, nothing more); None when lleaves is unavailable or cannot compile it."""
    try:
        import lleaves
    except ImportError:
        log.info("lleaves is not installed: LightGBM predicts on the request path")
        return None
    import llvmlite.binding as llvm

    # the object code is built for this CPU with these options: both are part of the key
    versions = (f"lleaves={metadata.version('lleaves')} llvmlite={metadata.version('llvmlite')} "
                f"cpu={llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()} "
                f"options={sorted(COMPILE_OPTIONS.items())}")
    key = hashlib.sha256(f"{versions}\n{model_text}".encode()).hexdigest()[:32]
    cache = cache_dir() if cache is None else cache
    obj = cache / "lleaves" / f"{key}.o"
    try:
        obj.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=obj.parent,
                                         delete=False) as f:
            f.write(model_text)
        try:
            model = lleaves.Model(model_file=f.name)
            n_features = int(model.num_feature())
            if obj.exists():
                model.compile(cache=str(obj), **COMPILE_OPTIONS)
            else:  # compile to a temporary name, then rename: readers never see a partial file
                tmp = obj.with_suffix(f".{os.getpid()}.tmp")
                model.compile(cache=str(tmp), **COMPILE_OPTIONS)
                os.replace(tmp, obj)
        finally:
            os.unlink(f.name)
    except Exception as exc:  # noqa: BLE001 - any failure keeps the LightGBM path
        log.warning("lleaves could not compile the ranker (%s): LightGBM predicts", exc)
        return None
    return CompiledTrees(model, n_features)
