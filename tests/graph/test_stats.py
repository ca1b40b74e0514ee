"""Graph statistics against networkx, the PyG view, and the exports."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from kgrank.config import GraphBuildConfig, SplitConfig
from kgrank.data.split import make_split
from kgrank.graph.build import build_graph
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.stats import (
    export_graph,
    format_stats,
    graph_stats,
    to_hetero,
    to_networkx,
)
from tests.graph.test_build import write_tiny


@pytest.fixture(params=["full", "interactions_only"])
def tiny_kg(request: pytest.FixtureRequest, tmp_path: Path) -> KnowledgeGraph:
    ds = write_tiny(tmp_path / "tiny")
    split = make_split(ds, SplitConfig())
    if request.param == "full":
        cfg = GraphBuildConfig(price_bands=2)
    else:  # many components: users and items joined by train events only
        cfg = GraphBuildConfig(categories=False, brands=False, price_bands=0, attributes=[],
                               triples=False, bought_next=False, bought_together=False)
    return build_graph(ds, split, cfg)


def test_stats_match_networkx(tiny_kg: KnowledgeGraph) -> None:
    kg = tiny_kg
    g = to_networkx(kg)
    stats = graph_stats(kg)
    types = Counter(t for _, t in g.nodes(data="type"))
    assert stats["nodes"] == dict(types)
    assert stats["n_nodes"] == g.number_of_nodes() == kg.n_users + kg.n_kg_nodes
    relations = Counter(r for _, _, r in g.edges(data="relation"))
    assert stats["edges"] == dict(relations)
    assert stats["n_edges"] == g.number_of_edges() == len(kg.ui_user) + len(kg.kg_head)
    assert stats["components"]["count"] == nx.number_weakly_connected_components(g)
    largest = max(len(c) for c in nx.weakly_connected_components(g))
    assert stats["components"]["largest"] == largest
    singletons = sum(len(c) == 1 for c in nx.weakly_connected_components(g))
    assert stats["components"]["singletons"] == singletons
    for node_type, summary in stats["degrees"].items():
        deg = np.array([d for n, d in g.degree() if g.nodes[n]["type"] == node_type])
        assert summary["min"] == deg.min() and summary["max"] == deg.max()
        assert summary["mean"] == pytest.approx(deg.mean())
        assert summary["median"] == pytest.approx(np.median(deg))
        assert summary["isolated"] == int((deg == 0).sum())
        assert sum(summary["histogram"].values()) == len(deg)
    # i6 is in no edge at all.
    assert g.degree("item:6") == 0 and stats["degrees"]["item"]["isolated"] >= 1
    text = format_stats(stats)
    for name in [*stats["nodes"], *stats["edges"], "weakly connected components"]:
        assert name in text


def test_tiny_networkx_view_has_typed_nodes_and_weighted_edges(tmp_path: Path) -> None:
    ds = write_tiny(tmp_path / "tiny")
    kg = build_graph(ds, make_split(ds, SplitConfig()), GraphBuildConfig(price_bands=2))
    g = to_networkx(kg, item_names=list(ds.items["item_id"]))
    assert g.nodes["category:Beauty > Hair"]["type"] == "category"
    assert g.nodes["attribute:colour:colour=red"]["type"] == "attribute:colour"
    assert g.nodes["item:2"]["name"] == "i2"
    assert g.has_edge("brand:Acme", "external:France")
    assert g.has_edge("category:Beauty > Hair > Shampoo", "category:Beauty > Hair")
    (attrs,) = g.get_edge_data("user:0", "item:0").values()
    assert attrs == {"relation": "interacted", "weight": 2.0}
    # Components of the full tiny graph: everything joined, plus the isolated item i6.
    assert nx.number_weakly_connected_components(g) == 2
    assert graph_stats(kg)["components"] == {
        "count": 2, "largest": g.number_of_nodes() - 1,
        "largest_share": pytest.approx((g.number_of_nodes() - 1) / g.number_of_nodes()),
        "singletons": 1,
    }


def test_histogram_buckets(tmp_path: Path) -> None:
    # Star: user 0 with 5 items, users 1-2 with one item each, item 6 and user 3 isolated.
    kg = KnowledgeGraph(4, 7, np.array([0, 0, 0, 0, 0, 1, 2]),
                        np.array([0, 1, 2, 3, 4, 5, 5]), np.ones(7, dtype=np.float32))
    stats = graph_stats(kg)
    assert stats["degrees"]["user"]["histogram"] == {"0": 1, "1": 2, "4-7": 1}
    assert stats["degrees"]["item"]["histogram"] == {"0": 1, "1": 5, "2-3": 1}
    assert stats["components"]["count"] == nx.number_weakly_connected_components(to_networkx(kg))


def test_to_hetero_counts_and_shapes(tiny_kg: KnowledgeGraph) -> None:
    kg = tiny_kg
    data = to_hetero(kg)
    stats = graph_stats(kg)
    assert data["user"].num_nodes == kg.n_users and data["item"].num_nodes == kg.n_items
    for etype, count in stats["nodes"].items():
        key = etype.replace(":", "_")
        assert data[key].num_nodes == count
    ui = data["user", "interacted", "item"]
    assert tuple(ui.edge_index.shape) == (2, len(kg.ui_user))
    assert tuple(ui.edge_weight.shape) == (len(kg.ui_user),)
    per_relation: Counter[str] = Counter()
    for src, rel, dst in data.edge_types:
        ei = data[src, rel, dst].edge_index
        assert ei.shape[0] == 2 and ei.dtype.is_floating_point is False
        assert int(ei[0].max()) < data[src].num_nodes and int(ei[1].max()) < data[dst].num_nodes
        per_relation[rel] += ei.shape[1]
    assert dict(per_relation) == stats["edges"]


def test_hetero_types_of_tiny_triples(tmp_path: Path) -> None:
    ds = write_tiny(tmp_path / "tiny")
    kg = build_graph(ds, make_split(ds, SplitConfig()), GraphBuildConfig(price_bands=2))
    data = to_hetero(kg)
    assert set(data.node_types) == {"user", "item", "category", "brand", "price_band",
                                    "attribute_colour", "external"}
    assert ("brand", "made_in", "external") in data.edge_types
    assert ("item", "made_in", "external") in data.edge_types
    assert ("external", "sourced_from", "external") in data.edge_types
    assert ("item", "has_colour", "attribute_colour") in data.edge_types
    assert ("category", "related_to", "category") in data.edge_types
    made_in = data["brand", "made_in", "external"].edge_index
    assert made_in.shape == (2, 1)
    assert kg.entity_names[int(data["external"].kg_index[made_in[1, 0]]) - kg.n_items] == "France"


def test_export_round_trip(tiny_kg: KnowledgeGraph, tmp_path: Path) -> None:
    kg = tiny_kg
    out = tmp_path / "export"
    written = export_graph(kg, out)
    assert [p.name for p in written] == ["nodes.parquet", "edges.parquet", "graph.graphml"]
    assert sorted(p.name for p in out.iterdir()) == ["edges.parquet", "graph.graphml",
                                                     "nodes.parquet"]  # no temp files left
    stats = graph_stats(kg)
    nodes = pd.read_parquet(out / "nodes.parquet")
    edges = pd.read_parquet(out / "edges.parquet")
    assert list(nodes.columns) == ["node_id", "type", "name"]
    assert list(edges.columns) == ["src", "dst", "relation", "weight"]
    assert nodes["node_id"].is_unique
    assert nodes["type"].value_counts().to_dict() == stats["nodes"]
    assert edges["relation"].value_counts().to_dict() == stats["edges"]
    assert set(edges["src"]) | set(edges["dst"]) <= set(nodes["node_id"])
    ui = edges[edges["relation"] == "interacted"]
    assert ui["weight"].sum() == pytest.approx(float(kg.ui_weight.sum()))
    g = nx.read_graphml(out / "graph.graphml", force_multigraph=True)
    assert g.number_of_nodes() == stats["n_nodes"]
    assert g.number_of_edges() == stats["n_edges"]
    assert Counter(r for _, _, r in g.edges(data="relation")) == Counter(stats["edges"])
    assert nx.number_weakly_connected_components(g) == stats["components"]["count"]
    # graphml=False skips it; exporting again replaces the files in place.
    again = tmp_path / "again"
    assert [p.name for p in export_graph(kg, again, graphml=False)] == ["nodes.parquet",
                                                                       "edges.parquet"]
    assert not (again / "graph.graphml").exists()
    export_graph(kg, again, graphml=False)
    assert len(pd.read_parquet(again / "edges.parquet")) == stats["n_edges"]
