"""Inspect and export a :class:`~kgrank.graph.graph.KnowledgeGraph`.

- :func:`graph_stats` summarizes the graph (node and edge counts, degree distributions, weakly
  connected components) with numpy and :mod:`scipy.sparse.csgraph`, fast enough for full
  datasets; :func:`format_stats` renders it as text for ``kgrank graph stats``.
- :func:`to_networkx` gives a :class:`networkx.MultiDiGraph` for inspection and cross-checks, and
  :func:`to_hetero` a :class:`torch_geometric.data.HeteroData` for PyG models.
- :func:`export_graph` writes ``nodes.parquet`` / ``edges.parquet`` (and ``graph.graphml`` for
  small graphs), each atomically, for tools outside kgrank.

Nodes of the whole graph are numbered users first (``0..n_users-1``), then KG nodes (items, then
entities; see :mod:`kgrank.graph.graph`). Node ids in exports are ``user:<idx>``,
``item:<idx>`` and ``<entity type>:<name>``; user-item edges go user -> item with relation
``interacted`` and their weight, knowledge edges head -> tail with weight 1.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from kgrank.graph.graph import KnowledgeGraph

if TYPE_CHECKING:
    from torch_geometric.data import HeteroData

INTERACTED = "interacted"
GRAPHML_MAX_EDGES = 200_000


def node_types(kg: KnowledgeGraph) -> list[str]:
    """Type names of the whole graph: ``user``, ``item``, then the entity types."""
    return ["user", "item", *kg.entity_type_names]


def _node_type_index(kg: KnowledgeGraph) -> np.ndarray:
    """Type (index into :func:`node_types`) of every node of the whole graph."""
    return np.concatenate([
        np.zeros(kg.n_users, dtype=np.int64),
        np.ones(kg.n_items, dtype=np.int64),
        np.asarray(kg.entity_types, dtype=np.int64) + 2,
    ])


def node_ids(
    kg: KnowledgeGraph,
    user_names: Sequence[str] | None = None,
    item_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per node of the whole graph: ``node_id``, ``type``, ``name``.

    Names of users and items are their int index unless ``user_names`` / ``item_names`` (e.g. the
    dataset's user and item ids) are given; node ids always use the index.
    """
    types = node_types(kg)
    users = [str(u) for u in range(kg.n_users)]
    items = [str(i) for i in range(kg.n_items)]
    ent_types = [types[t + 2] for t in kg.entity_types]
    return pd.DataFrame({
        "node_id": [f"user:{u}" for u in users] + [f"item:{i}" for i in items]
        + [f"{t}:{n}" for t, n in zip(ent_types, kg.entity_names, strict=True)],
        "type": ["user"] * kg.n_users + ["item"] * kg.n_items + ent_types,
        "name": [str(v) for v in (user_names if user_names is not None else users)]
        + [str(v) for v in (item_names if item_names is not None else items)]
        + list(kg.entity_names),
    })


def edge_arrays(kg: KnowledgeGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All edges over whole-graph node numbers: (src, dst, relation, weight), where relation
    ``0`` is ``interacted`` and ``r + 1`` is ``kg.relation_names[r]``."""
    src = np.concatenate([kg.ui_user, kg.kg_head + kg.n_users]).astype(np.int64)
    dst = np.concatenate([kg.ui_item + kg.n_users, kg.kg_tail + kg.n_users]).astype(np.int64)
    rel = np.concatenate([np.zeros(len(kg.ui_user), np.int64), kg.kg_rel + 1]).astype(np.int64)
    weight = np.concatenate([kg.ui_weight, np.ones(len(kg.kg_head), np.float32)])
    return src, dst, rel, weight.astype(np.float32)


def relation_names(kg: KnowledgeGraph) -> list[str]:
    """Names of :func:`edge_arrays` relations: ``interacted`` then the KG relations."""
    return [INTERACTED, *kg.relation_names]


def to_networkx(
    kg: KnowledgeGraph,
    user_names: Sequence[str] | None = None,
    item_names: Sequence[str] | None = None,
) -> nx.MultiDiGraph:
    """The graph as a MultiDiGraph: nodes with ``type`` and ``name``, edges with ``relation`` and
    ``weight``."""
    nodes = node_ids(kg, user_names, item_names)
    g = nx.MultiDiGraph()
    g.add_nodes_from(
        (nid, {"type": t, "name": n})
        for nid, t, n in zip(nodes["node_id"], nodes["type"], nodes["name"], strict=True)
    )
    src, dst, rel, weight = edge_arrays(kg)
    ids = nodes["node_id"].to_numpy()
    rels = relation_names(kg)
    g.add_edges_from(
        (ids[s], ids[d], {"relation": rels[r], "weight": float(w)})
        for s, d, r, w in zip(src, dst, rel, weight, strict=True)
    )
    return g


def sanitize(name: str) -> str:
    """A PyG-friendly identifier: runs of other characters than ``[A-Za-z0-9]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "x"


def _unique_names(names: Sequence[str], taken: set[str]) -> list[str]:
    out = []
    for name in names:
        base, k = sanitize(name), 2
        cand = base
        while cand in taken:
            cand, k = f"{base}_{k}", k + 1
        taken.add(cand)
        out.append(cand)
    return out


def to_hetero(kg: KnowledgeGraph) -> HeteroData:
    """The graph as ``torch_geometric.data.HeteroData``.

    Node types ``user``, ``item`` and one per entity type (sanitized: ``attribute:colour`` ->
    ``attribute_colour``), each with ``num_nodes``; entity node types also carry ``kg_index``
    (their KG node ids). Edge types are
    ``(src type, relation, dst type)`` with ``edge_index`` in per-type local indices; the
    ``("user", "interacted", "item")`` edges also carry ``edge_weight``.
    """
    import torch  # imported here: the other functions do not need torch
    from torch_geometric.data import HeteroData

    data = HeteroData()
    type_keys = ["user", "item", *_unique_names(kg.entity_type_names, {"user", "item"})]
    data["user"].num_nodes = kg.n_users
    data["item"].num_nodes = kg.n_items
    kg_type = np.concatenate([np.zeros(kg.n_items, np.int64), kg.entity_types + 1])  # 0 = item
    local = np.zeros(kg.n_kg_nodes, dtype=np.int64)
    local[: kg.n_items] = np.arange(kg.n_items)
    for t, key in enumerate(type_keys[2:]):
        members = np.flatnonzero(kg.entity_types == t)
        local[kg.n_items + members] = np.arange(len(members))
        data[key].num_nodes = len(members)
        data[key].kg_index = torch.from_numpy(kg.n_items + members)
    data["user", INTERACTED, "item"].edge_index = torch.from_numpy(
        np.stack([kg.ui_user, kg.ui_item]).astype(np.int64)
    )
    data["user", INTERACTED, "item"].edge_weight = torch.from_numpy(
        kg.ui_weight.astype(np.float32)
    )
    rel_keys = _unique_names(kg.relation_names, {INTERACTED})
    ht, tt = kg_type[kg.kg_head], kg_type[kg.kg_tail]
    combos = np.unique(np.stack([kg.kg_rel, ht, tt], axis=1), axis=0)
    for r, h_type, t_type in combos.tolist():
        rows = (kg.kg_rel == r) & (ht == h_type) & (tt == t_type)
        edge_type = (type_keys[h_type + 1], rel_keys[r], type_keys[t_type + 1])
        data[edge_type].edge_index = torch.from_numpy(
            np.stack([local[kg.kg_head[rows]], local[kg.kg_tail[rows]]]).astype(np.int64)
        )
    return data


def _log2_bucket(degree: np.ndarray) -> np.ndarray:
    """0 for degree 0, else floor(log2(d)) + 1 (bucket k >= 1 holds 2**(k-1) .. 2**k - 1)."""
    out = np.zeros(len(degree), dtype=np.int64)
    pos = degree > 0
    out[pos] = np.floor(np.log2(degree[pos])).astype(np.int64) + 1
    return out


def _bucket_label(k: int) -> str:
    if k <= 1:
        return str(k)
    lo, hi = 2 ** (k - 1), 2**k - 1
    return f"{lo}-{hi}"


def graph_stats(kg: KnowledgeGraph) -> dict[str, Any]:
    """Counts, per-type degree summaries and weakly connected components of the whole graph.

    Degrees count incident edges in both directions (a multi-edge counts once per edge), as
    ``networkx.MultiDiGraph.degree`` does. Components are weak (edge direction ignored); an
    isolated node is a component of its own.
    """
    types = node_types(kg)
    tix = _node_type_index(kg)
    n = len(tix)
    src, dst, rel, _ = edge_arrays(kg)
    rels = relation_names(kg)
    degree = np.bincount(src, minlength=n) + np.bincount(dst, minlength=n)
    degrees: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(types):
        d = degree[tix == t]
        if len(d) == 0:
            continue
        hist = np.bincount(_log2_bucket(d))
        degrees[name] = {
            "min": int(d.min()),
            "median": float(np.median(d)),
            "mean": float(d.mean()),
            "max": int(d.max()),
            "isolated": int((d == 0).sum()),
            "histogram": {_bucket_label(k): int(c) for k, c in enumerate(hist) if c},
        }
    adj = sp.coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    n_comp, labels = connected_components(adj, directed=True, connection="weak")
    sizes = np.bincount(labels, minlength=n_comp) if n else np.zeros(0, dtype=np.int64)
    return {
        "nodes": {t: int(c) for t, c in zip(types, np.bincount(tix, minlength=len(types)),
                                             strict=True)},
        "edges": {r: int(c) for r, c in zip(rels, np.bincount(rel, minlength=len(rels)),
                                            strict=True)},
        "n_nodes": int(n),
        "n_edges": len(src),
        "degrees": degrees,
        "components": {
            "count": int(n_comp),
            "largest": int(sizes.max()) if len(sizes) else 0,
            "largest_share": float(sizes.max() / n) if len(sizes) else 0.0,
            "singletons": int((sizes == 1).sum()),
        },
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same directory, then rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; exports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_graph(
    kg: KnowledgeGraph,
    out_dir: Path,
    graphml: bool | None = None,
    *,
    user_names: Sequence[str] | None = None,
    item_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``nodes.parquet`` (node_id, type, name), ``edges.parquet`` (src, dst, relation,
    weight) and, when ``graphml`` is true (None: when the graph has < 200k edges),
    ``graph.graphml``; each file atomically. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nodes = node_ids(kg, user_names, item_names)
    src, dst, rel, weight = edge_arrays(kg)
    ids = nodes["node_id"].to_numpy()
    edges = pd.DataFrame({
        "src": ids[src],
        "dst": ids[dst],
        "relation": np.asarray(relation_names(kg), dtype=object)[rel],
        "weight": weight,
    })
    written = [out_dir / "nodes.parquet", out_dir / "edges.parquet"]
    _atomic_write(written[0], lambda p: nodes.to_parquet(p, index=False))
    _atomic_write(written[1], lambda p: edges.to_parquet(p, index=False))
    if graphml if graphml is not None else len(edges) < GRAPHML_MAX_EDGES:
        g = to_networkx(kg, user_names, item_names)
        written.append(out_dir / "graph.graphml")
        _atomic_write(written[2], lambda p: nx.write_graphml(g, p))
    return written


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text report of :func:`graph_stats` for the command line."""
    lines: list[str] = []
    nodes, edges = stats["nodes"], stats["edges"]
    width = max([len(k) for k in [*nodes, *edges]] + [12])
    lines.append(f"{'node type':<{width}}  {'nodes':>10}")
    lines += [f"{k:<{width}}  {v:>10,}" for k, v in nodes.items()]
    lines.append(f"{'total':<{width}}  {stats['n_nodes']:>10,}")
    lines.append("")
    lines.append(f"{'relation':<{width}}  {'edges':>10}")
    lines += [f"{k:<{width}}  {v:>10,}" for k, v in edges.items()]
    lines.append(f"{'total':<{width}}  {stats['n_edges']:>10,}")
    lines.append("")
    lines.append(
        f"{'degree':<{width}}  {'min':>6} {'median':>8} {'mean':>8} {'max':>8} {'isolated':>9}"
    )
    for k, d in stats["degrees"].items():
        lines.append(f"{k:<{width}}  {d['min']:>6} {d['median']:>8.1f} {d['mean']:>8.2f} "
                     f"{d['max']:>8} {d['isolated']:>9}")
    lines.append("")
    lines.append("degree histogram (log2 buckets: count of nodes)")
    for k, d in stats["degrees"].items():
        hist = "  ".join(f"{b}: {c:,}" for b, c in d["histogram"].items())
        lines.append(f"  {k:<{width}}  {hist}")
    comp = stats["components"]
    lines.append("")
    lines.append(
        f"weakly connected components: {comp['count']:,} (largest {comp['largest']:,} nodes = "
        f"{100 * comp['largest_share']:.1f}%, singletons {comp['singletons']:,})"
    )
    return "\n".join(lines)
