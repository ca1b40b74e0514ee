"""Build the collaborative knowledge graph of a dataset from its TRAINING split.

What is built (:func:`build_graph`, options in :class:`kgrank.config.GraphBuildConfig`):

- **user-item edges** from ``split.train`` only: one per (user, item) pair with weight
  ``event_weights[event] * 0.5 ** (age_days / recency_half_life_days)`` summed over the pair's
  training events (age measured from the latest training timestamp; no decay when the half-life
  is 0). Validation and test events never enter the graph, so graph models cannot see targets.
- **category tree**: every path ``"A > B > C"`` yields entities ``A``, ``A > B``, ``A > B > C``
  (type ``category``, name = the full path prefix), edges ``item -in_category-> leaf`` and
  ``child -subcategory_of-> parent`` for each level.
- **brands** (type ``brand``): ``item -has_brand-> brand``; missing brands are skipped.
- **price bands** (type ``price_band``, names ``price:q1/5`` ...): global quantile bins over the
  items that have a price (right-closed like :func:`pandas.qcut`); ``item -price_band-> band``.
- **attributes** (type ``attribute:<col>``, names ``<col>=<value>``): ``item -has_<col>-> value``
  for the configured columns, or auto-detected low-cardinality string columns.
- **knowledge triples** of the dataset: a head/tail equal to an item id is that item; otherwise an
  existing category path or brand name is reused, and anything else becomes an ``external``
  entity named by the raw value.
- **item-item relations** mined from training sequences, blind to the order of events that share
  a timestamp (they form one "time group", see
  :func:`kgrank.baselines.history.time_groups_from_end`):

  * ``bought_next``: directed ``a -> b`` for ``a`` in one time group of a user and ``b`` in the
    user's next later time group (the directed part of
    :func:`kgrank.baselines.transition.transition_counts`);
  * ``bought_together``: items of one user in the same session (non-null ``session_id``) or with
    the same timestamp. The relation is symmetric and is stored in BOTH directions (``a -> b``
    and ``b -> a``), so that the per-head neighbour cap applies to every item.

  Time groups and sessions with more than ``MAX_GROUP_ITEMS`` (100) items are left out with a
  warning, and time groups are not used when all training events share one timestamp (sources
  without time): they would only give a quadratic number of meaningless pairs.
  A pair's count is the number of users in whose training history it occurs; pairs with a count
  below ``min_pair_count`` are dropped, and each head item keeps its ``max_item_neighbors``
  strongest partners per relation (ties broken by the smaller tail id). With a binding cap the
  stored ``bought_together`` edges may therefore be asymmetric (an item kept in ``a``'s list may
  not keep ``a`` in its own).

Ids are deterministic and independent of the row order of the events: entities are numbered by
type (category, brand, price_band, attribute:<col> in column order, external) and by sorted name
within a type; relations in the fixed order in_category, subcategory_of, has_brand, price_band,
has_<col>..., the triple relations (sorted), bought_next, bought_together, each listed only when
it has at least one edge. Knowledge edges are de-duplicated and sorted within each relation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from kgrank.baselines.history import time_groups_from_end
from kgrank.config import GraphBuildConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import Split
from kgrank.graph.graph import KnowledgeGraph

CATEGORY = "category"
BRAND = "brand"
PRICE_BAND = "price_band"
EXTERNAL = "external"
ATTRIBUTE_PREFIX = "attribute:"
#: Item columns never auto-detected as attributes (text, ids, or handled by their own relation).
NON_ATTRIBUTE_COLUMNS = frozenset(
    {"item_id", "title", "description", "image", "brand", "categories", "price"}
)
MAX_AUTO_ATTRIBUTE_VALUES = 500
#: Time groups / sessions with more items than this are not mined for item-item pairs.
MAX_GROUP_ITEMS = 100


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def normalize_path(path: str) -> str:
    """``" A >B> C "`` -> ``"A > B > C"`` (levels stripped, empty levels dropped)."""
    return " > ".join(p.strip() for p in str(path).split(">") if p.strip())


def path_prefixes(path: str) -> list[str]:
    """All prefixes of a normalized path, root first: ``A``, ``A > B``, ``A > B > C``."""
    parts = path.split(" > ")
    return [" > ".join(parts[: k + 1]) for k in range(len(parts))]


Ref = tuple[str, np.ndarray]
"""Node references of one edge block: ``("item", item ids)`` or ``(entity type, names)``."""


class _Builder:
    """Collects entities (one name set per type) and edge blocks, then numbers them."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.type_names: list[str] = []
        self.names: dict[str, set[str]] = {}
        self.relation_order: list[str] = []
        self.blocks: dict[str, list[tuple[Ref, Ref]]] = {}

    def add_entities(self, etype: str, names: Iterable[str]) -> None:
        if etype not in self.names:
            self.names[etype] = set()
            self.type_names.append(etype)
        self.names[etype].update(names)

    def has(self, etype: str, name: str) -> bool:
        return name in self.names.get(etype, ())

    def add_edges(self, rel: str, heads: Ref, tails: Ref) -> None:
        if len(heads[1]) == 0:
            return
        if rel not in self.blocks:
            self.blocks[rel] = []
            self.relation_order.append(rel)
        self.blocks[rel].append((heads, tails))

    def finish(self, graph: KnowledgeGraph) -> KnowledgeGraph:
        # Entities: types in creation order (empty types dropped), sorted names within a type.
        type_names = [t for t in self.type_names if self.names[t]]
        entity_names: list[str] = []
        entity_types: list[np.ndarray] = []
        index: dict[str, tuple[int, pd.Index]] = {}
        for t, etype in enumerate(type_names):
            names = sorted(self.names[etype])
            index[etype] = (self.n_items + len(entity_names), pd.Index(names, dtype=object))
            entity_names += names
            entity_types.append(np.full(len(names), t, dtype=np.int64))

        def nodes(ref: Ref) -> np.ndarray:
            if ref[0] == "item":
                return np.asarray(ref[1], dtype=np.int64)
            offset, names = index[ref[0]]
            pos = names.get_indexer(pd.Index(ref[1], dtype=object))
            if (pos < 0).any():  # a bug in this module, not in the data
                raise RuntimeError(f"edge to an unregistered {ref[0]} entity")
            return offset + pos.astype(np.int64)

        rel_names: list[str] = []
        heads, rels, tails = [], [], []
        for rel in self.relation_order:
            head = np.concatenate([nodes(hr) for hr, _ in self.blocks[rel]])
            tail = np.concatenate([nodes(tr) for _, tr in self.blocks[rel]])
            pairs = np.unique(np.stack([head, tail], axis=1), axis=0)  # de-duplicated, sorted
            heads.append(pairs[:, 0])
            tails.append(pairs[:, 1])
            rels.append(np.full(len(pairs), len(rel_names), dtype=np.int64))
            rel_names.append(rel)
        empty = np.zeros(0, dtype=np.int64)
        graph.entity_names = entity_names
        graph.entity_types = np.concatenate(entity_types) if entity_types else empty
        graph.entity_type_names = type_names
        graph.relation_names = rel_names
        graph.kg_head = np.concatenate(heads) if heads else empty
        graph.kg_rel = np.concatenate(rels) if rels else empty.copy()
        graph.kg_tail = np.concatenate(tails) if tails else empty.copy()
        return graph


def _item_ref(items: np.ndarray) -> Ref:
    return ("item", np.asarray(items, dtype=np.int64))


def _names(values: Iterable[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=object)


def _ui_edges(
    train: pd.DataFrame, cfg: GraphBuildConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(train) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    events = train["event"].astype(str)
    missing = sorted(set(events.unique()) - set(cfg.event_weights))
    if missing:
        raise ValueError(
            f"graph.build.event_weights has no weight for event type(s) {missing} "
            f"(configured: {sorted(cfg.event_weights)})"
        )
    weight = events.map(cfg.event_weights).to_numpy(dtype=np.float64)
    if cfg.recency_half_life_days > 0:
        ts = train["timestamp"]
        age_days = (ts.max() - ts).dt.total_seconds().to_numpy(dtype=np.float64) / 86400.0
        weight = weight * np.power(0.5, age_days / cfg.recency_half_life_days)
    frame = pd.DataFrame({
        "u": train["user_idx"].to_numpy(dtype=np.int64),
        "i": train["item_idx"].to_numpy(dtype=np.int64),
        "w": weight,
    })
    summed = frame.groupby(["u", "i"], sort=True)["w"].sum()
    return (
        summed.index.get_level_values("u").to_numpy(dtype=np.int64),
        summed.index.get_level_values("i").to_numpy(dtype=np.int64),
        summed.to_numpy(dtype=np.float32),
    )


def _add_categories(b: _Builder, items: pd.DataFrame) -> None:
    if "categories" not in items:
        return
    exploded = items["categories"].explode()
    exploded = exploded[exploded.map(lambda v: not _is_missing(v))]
    raw = exploded.astype(str)
    norm_of = {p: normalize_path(p) for p in pd.unique(raw)}
    leaf = raw.map(norm_of)
    keep = leaf.str.len() > 0
    leaf = leaf[keep]
    paths = sorted(set(leaf))
    nodes = {q for p in paths for q in path_prefixes(p)}
    b.add_entities(CATEGORY, nodes)
    b.add_edges("in_category", _item_ref(leaf.index.to_numpy()), (CATEGORY, _names(leaf)))
    child = sorted(p for p in nodes if " > " in p)
    parent = [p.rsplit(" > ", 1)[0] for p in child]
    b.add_edges("subcategory_of", (CATEGORY, _names(child)), (CATEGORY, _names(parent)))


def _add_brands(b: _Builder, items: pd.DataFrame) -> None:
    if "brand" not in items:
        return
    brand = items["brand"]
    ok = ~brand.map(_is_missing).to_numpy(dtype=bool)
    names = brand[ok].astype(str).tolist()
    b.add_entities(BRAND, names)
    b.add_edges("has_brand", _item_ref(np.flatnonzero(ok)), (BRAND, _names(names)))


def price_band_of(price: pd.Series, bands: int) -> np.ndarray:
    """0-based quantile band of each price (-1 where missing); bins are right-closed."""
    values = pd.to_numeric(price, errors="coerce").to_numpy(dtype=np.float64)
    band = np.full(len(values), -1, dtype=np.int64)
    ok = np.isfinite(values)
    if bands <= 0 or not ok.any():
        return band
    edges = np.quantile(values[ok], np.linspace(0.0, 1.0, bands + 1))
    band[ok] = np.searchsorted(edges[1:-1], values[ok], side="left")
    return band


def _add_price_bands(b: _Builder, items: pd.DataFrame, bands: int) -> None:
    if bands <= 0 or "price" not in items:
        return
    band = price_band_of(items["price"], bands)
    ok = np.flatnonzero(band >= 0)
    names = [f"price:q{int(k) + 1}/{bands}" for k in band[ok]]
    b.add_entities(PRICE_BAND, names)
    b.add_edges("price_band", _item_ref(ok), (PRICE_BAND, _names(names)))


def attribute_columns(items: pd.DataFrame, cfg: GraphBuildConfig) -> list[str]:
    """Configured attribute columns, or the auto-detected low-cardinality string columns."""
    if cfg.attributes is not None:
        absent = [c for c in cfg.attributes if c not in items.columns]
        if absent:
            raise ValueError(
                f"graph.build.attributes: item column(s) {absent} not in the items table "
                f"(columns: {list(items.columns)})"
            )
        return list(cfg.attributes)
    limit = min(MAX_AUTO_ATTRIBUTE_VALUES, len(items) / 2)
    found = []
    for col in items.columns:
        if col in NON_ATTRIBUTE_COLUMNS:
            continue
        if pd.api.types.infer_dtype(items[col], skipna=True) != "string":
            continue
        n = items[col].nunique(dropna=True)
        if 2 <= n <= limit:
            found.append(str(col))
    return found


def _add_attributes(b: _Builder, items: pd.DataFrame, cfg: GraphBuildConfig) -> None:
    for col in attribute_columns(items, cfg):
        values = items[col].explode()  # list-valued columns give one node per element
        values = values[~values.map(_is_missing).to_numpy(dtype=bool)]
        names = [f"{col}={v}" for v in values]
        etype = f"{ATTRIBUTE_PREFIX}{col}"
        b.add_entities(etype, names)
        b.add_edges(f"has_{col}", _item_ref(values.index.to_numpy()), (etype, _names(names)))


def _add_triples(b: _Builder, dataset: Dataset) -> None:
    triples = dataset.triples
    if triples is None or len(triples) == 0:
        return
    item_of = {str(v): i for i, v in enumerate(dataset.items["item_id"])}

    resolved: dict[str, tuple[str, str | int]] = {}
    for v in pd.unique(pd.concat([triples["head"], triples["tail"]]).astype(str)):
        path = normalize_path(v)
        if v in item_of:
            resolved[v] = ("item", item_of[v])
        elif path and b.has(CATEGORY, path):
            resolved[v] = (CATEGORY, path)
        elif b.has(BRAND, v):
            resolved[v] = (BRAND, v)
        else:
            resolved[v] = (EXTERNAL, v)
    b.add_entities(EXTERNAL, [str(n) for t, n in resolved.values() if t == EXTERNAL])
    frame = pd.DataFrame({"rel": triples["relation"].astype(str).to_numpy()})
    for end in ("head", "tail"):
        refs = triples[end].astype(str).map(resolved)
        frame[f"{end}_type"] = [r[0] for r in refs]
        frame[end] = [r[1] for r in refs]
    for (rel, head_type, tail_type), rows in frame.groupby(
        ["rel", "head_type", "tail_type"], sort=True
    ):
        heads = rows["head"].to_numpy(dtype=np.int64 if head_type == "item" else object)
        tails = rows["tail"].to_numpy(dtype=np.int64 if tail_type == "item" else object)
        b.add_edges(str(rel), (str(head_type), heads), (str(tail_type), tails))


def _top_pairs(
    a: np.ndarray, b: np.ndarray, count: np.ndarray, min_count: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with count >= min_count, at most k per head (strongest, then smaller tail)."""
    keep = count >= min_count
    a, b, count = a[keep], b[keep], count[keep]
    order = np.lexsort((b, -count, a))
    a, b = a[order], b[order]
    if k > 0 and len(a):
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        sizes = np.diff(np.r_[starts, len(a)])
        rank = np.arange(len(a)) - np.repeat(starts, sizes)
        a, b = a[rank < k], b[rank < k]
    return a, b


def _count_pairs(pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, number of distinct users) of the rows (u, i_a, i_b), self-pairs dropped."""
    pairs = pairs[pairs["i_a"] != pairs["i_b"]].drop_duplicates(["u", "i_a", "i_b"])
    counts = pairs.groupby(["i_a", "i_b"], sort=True).size()
    return (
        counts.index.get_level_values("i_a").to_numpy(dtype=np.int64),
        counts.index.get_level_values("i_b").to_numpy(dtype=np.int64),
        counts.to_numpy(dtype=np.int64),
    )


def _drop_large_groups(members: pd.DataFrame, relation: str, what: str) -> pd.DataFrame:
    """Members of groups (u, k) with at most MAX_GROUP_ITEMS items; warns about the others."""
    size = members.groupby(["u", "k"])["i"].transform("size").to_numpy()
    large = size > MAX_GROUP_ITEMS
    if large.any():
        n_groups = len(members[large].drop_duplicates(["u", "k"]))
        warnings.warn(
            f"{relation}: {n_groups} {what} with more than {MAX_GROUP_ITEMS} items "
            f"({int(large.sum())} events) left out of item-item pairs (bulk events, not baskets)",
            stacklevel=3,
        )
    return members[~large]


def item_item_pairs(
    train: pd.DataFrame, relation: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counted item pairs (a, b, users) of ``bought_next`` or ``bought_together`` (both
    directions) from training events; independent of the order of same-timestamp events.

    Time groups and sessions with more than :data:`MAX_GROUP_ITEMS` items are left out (with a
    warning), and when all training events share one timestamp (a source without time, e.g. the
    LightGCN / KGAT files) time groups are not used at all: both would only produce a quadratic
    number of meaningless pairs.
    """
    frame = pd.DataFrame({
        "u": train["user_idx"].to_numpy(dtype=np.int64),
        "i": train["item_idx"].to_numpy(dtype=np.int64),
        "k": time_groups_from_end(train) if len(train) else np.zeros(0, dtype=np.int64),
    })
    timeless = train["timestamp"].nunique() <= 1
    if relation == "bought_next":
        if timeless:
            return _count_pairs(pd.DataFrame({"u": [], "i_a": [], "i_b": []}, dtype=np.int64))
        frame = _drop_large_groups(frame, relation, "time groups")
        # Group k + 1 (earlier) -> group k (later) of the same user.
        earlier = frame.assign(k=frame["k"] - 1)
        pairs = earlier.merge(frame, on=["u", "k"], suffixes=("_a", "_b"))
        return _count_pairs(pairs)
    if relation != "bought_together":
        raise ValueError(f"unknown item-item relation {relation!r}")
    groups = [] if timeless else [_drop_large_groups(frame, relation, "time groups")]
    if "session_id" in train:  # same user and session; time groups have keys k >= 0
        sess = train["session_id"]
        ok = ~sess.isna().to_numpy(dtype=bool)
        codes, _ = pd.factorize(sess[ok].astype(str))
        sessions = frame[ok].assign(k=-1 - codes.astype(np.int64))  # keys < 0
        groups.append(_drop_large_groups(sessions, relation, "sessions"))
    if not groups:
        return _count_pairs(pd.DataFrame({"u": [], "i_a": [], "i_b": []}, dtype=np.int64))
    members = pd.concat(groups, ignore_index=True)
    pairs = members.merge(members, on=["u", "k"], suffixes=("_a", "_b"))
    return _count_pairs(pairs)


def build_graph(dataset: Dataset, split: Split, cfg: GraphBuildConfig) -> KnowledgeGraph:
    """The knowledge graph of ``dataset`` with interactions and item-item relations from
    ``split.train`` only (see the module docstring for every node and edge type)."""
    train = split.train
    items = dataset.items.reset_index(drop=True)  # row i = item i
    ui_user, ui_item, ui_weight = _ui_edges(train, cfg)
    graph = KnowledgeGraph(dataset.n_users, dataset.n_items, ui_user, ui_item, ui_weight)
    b = _Builder(dataset.n_items)
    if cfg.categories:
        _add_categories(b, items)
    if cfg.brands:
        _add_brands(b, items)
    _add_price_bands(b, items, cfg.price_bands)
    _add_attributes(b, items, cfg)
    if cfg.triples:
        _add_triples(b, dataset)
    for relation, enabled in (("bought_next", cfg.bought_next),
                              ("bought_together", cfg.bought_together)):
        if not enabled or len(train) == 0:
            continue
        a, c, count = item_item_pairs(train, relation)
        a, c = _top_pairs(a, c, count, cfg.min_pair_count, cfg.max_item_neighbors)
        b.add_edges(relation, _item_ref(a), _item_ref(c))
    return b.finish(graph)


def graph_summary(kg: KnowledgeGraph) -> dict[str, object]:
    """Node counts per type, edge counts per relation and the number of user-item edges."""
    nodes: dict[str, int] = {"user": kg.n_users, "item": kg.n_items}
    type_counts = np.bincount(kg.entity_types, minlength=len(kg.entity_type_names))
    nodes.update({t: int(n) for t, n in zip(kg.entity_type_names, type_counts, strict=True)})
    rel_counts = np.bincount(kg.kg_rel, minlength=kg.n_relations)
    return {
        "nodes": nodes,
        "edges": {r: int(n) for r, n in zip(kg.relation_names, rel_counts, strict=True)},
        "ui_edges": len(kg.ui_user),
        "kg_edges": len(kg.kg_head),
        "entities": kg.n_entities,
    }
