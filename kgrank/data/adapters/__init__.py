"""Dataset adapters: convert public source formats into kgrank datasets.

Each adapter reads one source layout (see its module docstring) and writes a validated dataset
directory through :func:`kgrank.data.dataset.write_dataset`, with a README saying what was done.
:func:`import_dataset` dispatches on the format name of :data:`ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kgrank.data.adapters.amazon import import_amazon_5core
from kgrank.data.adapters.hm import import_hm_catalog
from kgrank.data.adapters.kgat import import_kgat
from kgrank.data.adapters.lightgcn import import_lightgcn
from kgrank.data.adapters.movielens import import_movielens_100k
from kgrank.data.adapters.tabular import import_tabular
from kgrank.data.dataset import Dataset

ADAPTERS: dict[str, Callable[..., Dataset]] = {
    "amazon-5core": import_amazon_5core,
    "movielens-100k": import_movielens_100k,
    "lightgcn": import_lightgcn,
    "kgat": import_kgat,
    "hm-catalog": import_hm_catalog,
    "tabular": import_tabular,
}


def import_dataset(
    fmt: str, src: str | Path, dst: str | Path, *, overwrite: bool = False, **options: Any
) -> Dataset:
    """Import ``src`` (a source folder, or for ``tabular`` the interactions file) into ``dst``.

    ``options`` are passed to the adapter (only ``tabular`` takes any: items, users, mapping,
    timestamp_unit). An unknown ``fmt`` raises ValueError listing the formats.
    """
    try:
        adapter = ADAPTERS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown dataset format {fmt!r}; known formats: {', '.join(ADAPTERS)}"
        ) from None
    return adapter(Path(src), Path(dst), overwrite=overwrite, **options)


__all__ = [
    "ADAPTERS",
    "import_amazon_5core",
    "import_dataset",
    "import_hm_catalog",
    "import_kgat",
    "import_lightgcn",
    "import_movielens_100k",
    "import_tabular",
]
