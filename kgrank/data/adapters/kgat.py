"""KGAT data folder -> kgrank dataset (interactions, items with Freebase ids, optional KG triples).

Source format (xiangwang1223/knowledge_graph_attention_network, ``Data/<name>/``):

- ``train.txt`` / ``test.txt``: ``user item item ...`` lines, as in LightGCN (parsed by
  :mod:`kgrank.data.adapters.lightgcn`).
- ``user_list.txt``: ``org_id remap_id``; ``item_list.txt``: ``org_id remap_id freebase_id``.
- ``entity_list.txt`` (optional): ``org_id remap_id`` for every KG entity (org_id = Freebase id;
  some names contain spaces, the remap id is the last token).
- ``relation_list.txt`` (optional): ``org_id remap_id`` (org_id = Freebase relation URI).
- ``kg_final.txt`` (optional): ``head_entity relation tail_entity`` remap ids, one fact per line.
  Entities ``0 .. n_items-1`` are the items (entity id = item remap id).

Triples: a head / tail entity below ``n_items`` becomes that item's ``item_id``; any other entity
becomes its ``org_id`` from ``entity_list.txt`` when that name is non-empty, unique and not an item
id, else ``e<id>``. The relation is its ``org_id`` from ``relation_list.txt`` (``r<id>`` when there is
no relation list).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.adapters.lightgcn import (
    load_lightgcn,
    parse_int_rows,
    read_id_list,
    read_text_lines,
    split_readme,
)
from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import DatasetError


def _entity_names(src: Path, n_entities: int, n_items: int, notes: list[str]) -> np.ndarray:
    """Name of every entity id 0..n_entities-1 (object array); ids < n_items are item ids."""
    names = np.char.add("e", np.arange(n_entities).astype(str)).astype(object)
    names[:n_items] = np.arange(n_items).astype(str)
    item_ids = set(names[:n_items])
    path = src / "entity_list.txt"
    if not path.is_file() or n_entities <= n_items:
        if n_entities > n_items:
            notes.append(f"no entity_list.txt: the {n_entities - n_items:,} non-item entities are "
                         "named e<id>.")
        return names
    lst = read_id_list(path)
    lst = lst[(lst["remap_id"] >= n_items) & (lst["remap_id"] < n_entities)]
    org = lst["org_id"].astype(object)
    usable = (org.str.len() > 0) & ~org.duplicated(keep=False) & ~org.isin(item_ids)
    usable &= ~org.isin(set(names[n_items:]))  # never shadow another entity's e<id> name
    names[lst["remap_id"].to_numpy()[usable.to_numpy()]] = org[usable].to_numpy()
    fallback = (n_entities - n_items) - int(usable.sum())
    notes.append(
        f"non-item entities are named by their org_id from entity_list.txt; {fallback:,} of "
        f"{n_entities - n_items:,} (missing, empty, duplicate or item-id-like names) are e<id>."
    )
    return names


def _relation_names(src: Path, relations: np.ndarray, kg_path: Path) -> np.ndarray:
    path = src / "relation_list.txt"
    if not path.is_file():
        return np.char.add("r", relations.astype(str)).astype(object)
    lst = read_id_list(path)
    known = lst["remap_id"].to_numpy()
    pos = np.searchsorted(known, relations)
    pos_c = np.minimum(pos, max(len(known) - 1, 0))
    ok = (pos < len(known)) & (known[pos_c] == relations) if len(known) else np.zeros(
        len(relations), dtype=bool
    )
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DatasetError(kg_path, f"relation {int(relations[row])} is not in {path.name}",
                           row=row, column="relation")
    empty = (lst["org_id"].str.len() == 0).to_numpy()
    org = np.where(empty, np.char.add("r", known.astype(str)), lst["org_id"].to_numpy(dtype=object))
    return org[pos].astype(object)


def load_triples(src: Path, n_items: int, notes: list[str]) -> pd.DataFrame:
    """Read ``kg_final.txt`` into a head / relation / tail table (file order, duplicates kept).

    ``n_items`` is 1 + the largest item remap id: entity ids below it are items.
    """
    path = src / "kg_final.txt"
    lines = read_text_lines(path)
    values, counts, starts = parse_int_rows(path, lines, ("head", "relation", "tail"))
    blank = np.flatnonzero(counts == 0)
    if len(blank):
        raise DatasetError(path, "blank line", row=int(blank[0]))
    hrt = values.reshape(-1, 3)
    n_entities = max(int(hrt[:, [0, 2]].max()) + 1 if len(hrt) else 0, n_items)
    names = _entity_names(src, n_entities, n_items, notes)
    triples = pd.DataFrame({
        "head": names[hrt[:, 0]],
        "relation": _relation_names(src, hrt[:, 1], path),
        "tail": names[hrt[:, 2]],
    })
    n_dup = int(triples.duplicated().sum())
    notes.append(f"triples: the {len(triples):,} lines of kg_final.txt in file order"
                 + (f" ({n_dup:,} duplicate facts kept)." if n_dup else "."))
    return triples


def import_kgat(src: Path, dst: Path, *, overwrite: bool = False) -> Dataset:
    """Import a KGAT data folder; adds ``triples.parquet`` when ``kg_final.txt`` exists."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    data = load_lightgcn(src)
    extra: list[str] = []
    triples = None
    if (src / "kg_final.txt").is_file():
        n_items = int(data.items["item_id"].astype(np.int64).max()) + 1 if len(data.items) else 0
        triples = load_triples(src, n_items, extra)
    else:
        extra.append("no kg_final.txt in the source: the dataset has NO knowledge-graph triples "
                     "(items keep their freebase_id, if listed, to link a KG later).")
    readme = split_readme("KGAT-format split", src, data, extra)
    return write_dataset(
        dst, data.items, data.interactions, users=data.users, triples=triples,
        overwrite=overwrite, readme=readme,
    )
