"""Helpers shared by the benchmark scripts: where the real data lives, and importing it once."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from kgrank.data.adapters import import_dataset
from kgrank.data.dataset import Dataset, load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KGRANK_SHARED", REPO.parent / "shared" / "datasets"))
DATA = REPO / "runs" / "data"


def dataset(fmt: str, source: str, name: str) -> Dataset:
    """Load ``runs/data/<name>``, importing it from ``../shared/datasets/<source>`` if missing."""
    dst = DATA / name
    if not dst.exists():
        import_dataset(fmt, SHARED / source, dst)
    return load_dataset(dst)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
