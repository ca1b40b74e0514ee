"""Graph construction: exact nodes and edges on a tiny shop, no leakage of held-out events,
order-blindness within a timestamp, weights, and a timed build on Amazon Beauty."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgrank.config import GraphBuildConfig, SplitConfig
from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.split import Split, make_split
from kgrank.graph.build import build_graph, graph_summary, price_band_of
from kgrank.graph.graph import KnowledgeGraph

BEAUTY = Path(__file__).resolve().parents[3] / "shared/datasets/amazon-beauty-2014-5core"
DAY0 = pd.Timestamp("2024-01-01", tz="UTC")

# (user, item, day, event, weight, session). Leave-last-out holds out, per user, the last event
# (test) and the one before (valid) when the user has >= 3 positives; views are not positives.
EVENTS = [
    ("u0", "i0", 0, "purchase", 1.0, "s1"),
    ("u0", "i1", 0, "purchase", 1.0, "s1"),  # same time as i0
    ("u0", "i2", 1, "click", 1.0, "s1"),  # same session, later time
    ("u0", "i3", 2, "purchase", 1.0, "s2"),
    ("u0", "i5", 5, "purchase", 1.0, "s3"),  # valid
    ("u0", "i4", 6, "purchase", 1.0, "s4"),  # test
    ("u1", "i2", 0, "view", 1.0, "s5"),  # not a positive event
    ("u1", "i1", 1, "cart", 1.0, "s5"),
    ("u1", "i0", 2, "click", 1.0, "s6"),
    ("u1", "i2", 2, "purchase", 1.0, "s6"),  # same time and session as i0
    ("u1", "i4", 3, "purchase", 1.0, "s7"),  # valid
    ("u1", "i5", 4, "purchase", 1.0, "s7"),  # test
    ("u2", "i3", 0, "purchase", 1.0, None),
    ("u2", "i4", 0, "purchase", 1.0, None),  # same time, no session
    ("u2", "i5", 1, "purchase", 1.0, None),  # valid
    ("u2", "i0", 2, "purchase", 1.0, None),  # test
    ("u3", "i1", 0, "rating", 4.0, None),
    ("u3", "i5", 3, "purchase", 1.0, None),  # test (only two positives: no valid)
]

ITEMS = pd.DataFrame({
    "item_id": [f"i{j}" for j in range(7)],
    "title": [f"item {j}" for j in range(7)],
    "categories": [
        ["Beauty > Hair > Shampoo"],
        ["Beauty > Hair > Conditioner"],
        ["Beauty > Skin > Face", "Home>Bath"],  # two paths, one without spaces
        ["Beauty > Skin > Face"],
        ["Home > Bath > Towel"],
        [],
        [],  # i6: nothing at all, never bought -> an isolated node
    ],
    "brand": ["Acme", "Acme", "Bee", None, "Cee", "Bee", None],
    "price": [1.0, 2.0, 3.0, 4.0, np.nan, 10.0, np.nan],
    "colour": ["red", "blue", "red", None, "green", "blue", None],
    "sku": [f"sku-{j}" for j in range(7)],  # all distinct: not an attribute
    "material": ["cotton"] * 6 + [None],  # one value: not auto-detected
    "weight_g": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # numeric: not auto-detected
})

TRIPLES = pd.DataFrame(
    [
        ("i0", "complements", "i1"),
        ("Acme", "made_in", "France"),  # brand -> external
        ("i2", "made_in", "France"),  # item -> the same external
        ("Beauty > Hair", "related_to", "Home > Bath"),  # category -> category
        ("Bee", "owned_by", "Acme"),  # brand -> brand
        ("Wool", "sourced_from", "France"),  # external -> external
    ],
    columns=["head", "relation", "tail"],
)

TINY_CFG = GraphBuildConfig(price_bands=2, max_item_neighbors=0)


def interactions(rows: list[tuple[str, str, int, str, float, str | None]] = EVENTS) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "day", "event", "weight",
                                        "session_id"])
    frame["timestamp"] = DAY0 + pd.to_timedelta(frame.pop("day"), unit="D")
    return frame


def write_tiny(root: Path, inter: pd.DataFrame | None = None) -> Dataset:
    """The tiny shop: 4 users, 7 items (i6 isolated), sessions, triples with externals."""
    return write_dataset(
        root, ITEMS, interactions() if inter is None else inter,
        users=pd.DataFrame({"user_id": ["u0", "u1", "u2", "u3"]}), triples=TRIPLES,
    )


@pytest.fixture
def tiny(tmp_path: Path) -> Dataset:
    return write_tiny(tmp_path / "tiny")


def node_name(kg: KnowledgeGraph, ds: Dataset, node: int) -> str:
    if node < kg.n_items:
        return str(ds.items["item_id"].iloc[node])
    return kg.entity_names[node - kg.n_items]


def edges(kg: KnowledgeGraph, ds: Dataset) -> dict[str, set[tuple[str, str]]]:
    """Relation name -> set of (head name, tail name)."""
    out: dict[str, set[tuple[str, str]]] = {r: set() for r in kg.relation_names}
    for h, r, t in zip(kg.kg_head, kg.kg_rel, kg.kg_tail, strict=True):
        out[kg.relation_names[r]].add((node_name(kg, ds, h), node_name(kg, ds, t)))
    return out


def entities(kg: KnowledgeGraph) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in kg.entity_type_names}
    for name, t in zip(kg.entity_names, kg.entity_types, strict=True):
        out[kg.entity_type_names[t]].append(name)
    return out


def ui_edges(kg: KnowledgeGraph) -> dict[tuple[int, int], float]:
    return {(int(u), int(i)): float(w)
            for u, i, w in zip(kg.ui_user, kg.ui_item, kg.ui_weight, strict=True)}


def both(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return pairs | {(b, a) for a, b in pairs}


def assert_same_graph(a: KnowledgeGraph, b: KnowledgeGraph) -> None:
    assert (a.n_users, a.n_items) == (b.n_users, b.n_items)
    for f in ("ui_user", "ui_item", "ui_weight", "entity_types", "kg_head", "kg_rel", "kg_tail"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.entity_names == b.entity_names
    assert a.entity_type_names == b.entity_type_names
    assert a.relation_names == b.relation_names


# ------------------------------------------------------------------------------ exact graph


def test_tiny_graph_exact_nodes_and_edges(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig())
    kg = build_graph(tiny, split, TINY_CFG)
    assert (kg.n_users, kg.n_items) == (4, 7)
    assert kg.entity_type_names == ["category", "brand", "price_band", "attribute:colour",
                                    "external"]
    assert entities(kg) == {
        "category": ["Beauty", "Beauty > Hair", "Beauty > Hair > Conditioner",
                     "Beauty > Hair > Shampoo", "Beauty > Skin", "Beauty > Skin > Face", "Home",
                     "Home > Bath", "Home > Bath > Towel"],
        "brand": ["Acme", "Bee", "Cee"],
        "price_band": ["price:q1/2", "price:q2/2"],
        "attribute:colour": ["colour=blue", "colour=green", "colour=red"],
        "external": ["France", "Wool"],
    }
    assert kg.relation_names == [
        "in_category", "subcategory_of", "has_brand", "price_band", "has_colour",
        "complements", "made_in", "owned_by", "related_to", "sourced_from",
        "bought_next", "bought_together",
    ]
    e = edges(kg, tiny)
    assert e["in_category"] == {
        ("i0", "Beauty > Hair > Shampoo"), ("i1", "Beauty > Hair > Conditioner"),
        ("i2", "Beauty > Skin > Face"), ("i2", "Home > Bath"), ("i3", "Beauty > Skin > Face"),
        ("i4", "Home > Bath > Towel"),
    }
    assert e["subcategory_of"] == {
        ("Beauty > Hair", "Beauty"), ("Beauty > Hair > Shampoo", "Beauty > Hair"),
        ("Beauty > Hair > Conditioner", "Beauty > Hair"), ("Beauty > Skin", "Beauty"),
        ("Beauty > Skin > Face", "Beauty > Skin"), ("Home > Bath", "Home"),
        ("Home > Bath > Towel", "Home > Bath"),
    }
    assert e["has_brand"] == {("i0", "Acme"), ("i1", "Acme"), ("i2", "Bee"), ("i4", "Cee"),
                              ("i5", "Bee")}
    # Prices 1, 2, 3, 4, 10 (i4, i6 missing): median 3, bins (.., 3] and (3, ..].
    assert e["price_band"] == {("i0", "price:q1/2"), ("i1", "price:q1/2"),
                               ("i2", "price:q1/2"), ("i3", "price:q2/2"), ("i5", "price:q2/2")}
    assert e["has_colour"] == {("i0", "colour=red"), ("i1", "colour=blue"), ("i2", "colour=red"),
                               ("i4", "colour=green"), ("i5", "colour=blue")}
    assert e["complements"] == {("i0", "i1")}
    assert e["made_in"] == {("Acme", "France"), ("i2", "France")}
    assert e["owned_by"] == {("Bee", "Acme")}
    assert e["related_to"] == {("Beauty > Hair", "Home > Bath")}
    assert e["sourced_from"] == {("Wool", "France")}
    # Train: u0 {i0,i1}@0 -> i2@1 -> i3@2; u1 i1@1 -> {i0,i2}@2; u2 {i3,i4}@0; u3 i1@0.
    assert e["bought_next"] == {("i0", "i2"), ("i1", "i2"), ("i2", "i3"), ("i1", "i0")}
    # Same time or same session: u0 {i0,i1} (time), {i0,i1,i2} (session s1); u1 {i0,i2};
    # u2 {i3,i4} (time, no session). Stored in both directions.
    assert e["bought_together"] == both({("i0", "i1"), ("i0", "i2"), ("i1", "i2"),
                                         ("i3", "i4")})
    # Entity types index into entity_type_names; nodes are KG node ids.
    assert kg.entity_types.dtype == np.int64 and kg.kg_head.dtype == np.int64
    assert kg.kg_head.max() < kg.n_kg_nodes and kg.kg_tail.max() < kg.n_kg_nodes
    assert len(kg.kg_head) == len(kg.kg_rel) == len(kg.kg_tail)
    summary = graph_summary(kg)
    assert summary["nodes"] == {"user": 4, "item": 7, "category": 9, "brand": 3,
                                "price_band": 2, "attribute:colour": 3, "external": 2}
    assert summary["edges"] == {r: len(p) for r, p in e.items()}
    assert summary["ui_edges"] == 10 and summary["kg_edges"] == len(kg.kg_head)


def test_bought_next_directed_and_bought_together_symmetric(tiny: Dataset) -> None:
    kg = build_graph(tiny, make_split(tiny, SplitConfig()), TINY_CFG)
    e = edges(kg, tiny)
    nxt, tog = e["bought_next"], e["bought_together"]
    assert not any((b, a) in nxt for a, b in nxt)  # directed, never both ways here
    assert ("i0", "i1") not in nxt and ("i1", "i0") in nxt  # same time: no order; u1: i1 first
    assert ("i3", "i4") not in nxt and ("i4", "i3") not in nxt  # u2: same timestamp
    assert tog == {(b, a) for a, b in tog}  # symmetric
    assert all(a != b for a, b in nxt | tog)


def test_event_order_within_a_timestamp_does_not_matter(tmp_path: Path) -> None:
    base = interactions()
    kg0 = None
    for seed in range(4):
        perm = np.random.default_rng(seed).permutation(len(base))
        ds = write_tiny(tmp_path / f"perm{seed}", base.iloc[perm].reset_index(drop=True))
        split = make_split(ds, SplitConfig())
        kg = build_graph(ds, split, GraphBuildConfig(price_bands=2, max_item_neighbors=1))
        if kg0 is None:
            kg0 = kg
        else:
            assert_same_graph(kg0, kg)


def test_pair_count_threshold_and_neighbour_cap(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig())
    e = edges(build_graph(tiny, split, GraphBuildConfig(min_pair_count=2)), tiny)
    assert e["bought_next"] == {("i1", "i2")}  # u0 and u1
    assert e["bought_together"] == both({("i0", "i2")})  # u0 (session) and u1 (time)
    e = edges(build_graph(tiny, split, GraphBuildConfig(max_item_neighbors=1)), tiny)
    # Strongest partner per head; ties go to the smaller item id.
    assert e["bought_next"] == {("i0", "i2"), ("i1", "i2"), ("i2", "i3")}
    assert e["bought_together"] == {("i0", "i2"), ("i1", "i0"), ("i2", "i0"), ("i3", "i4"),
                                    ("i4", "i3")}


def test_switches_and_explicit_attributes(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig())
    kg = build_graph(tiny, split, GraphBuildConfig(
        categories=False, brands=False, price_bands=0, attributes=["material", "colour"],
        triples=False, bought_next=False, bought_together=False,
    ))
    assert kg.entity_type_names == ["attribute:material", "attribute:colour"]
    assert kg.relation_names == ["has_material", "has_colour"]
    assert entities(kg)["attribute:material"] == ["material=cotton"]
    assert len(edges(kg, tiny)["has_material"]) == 6
    with pytest.raises(ValueError, match="nope"):
        build_graph(tiny, split, GraphBuildConfig(attributes=["colour", "nope"]))
    # Without categories and brands, triples naming them become external entities.
    kg = build_graph(tiny, split, GraphBuildConfig(categories=False, brands=False))
    assert {"Acme", "Bee", "Beauty > Hair", "Home > Bath", "France", "Wool"} == set(
        entities(kg)["external"])


def test_minimal_items_table(seq_dataset: Dataset) -> None:
    # Only item_id and title, no sessions or triples: interactions and item-item edges only.
    everything = SplitConfig(method="random", valid_ratio=0.0, test_ratio=0.0)
    kg = build_graph(seq_dataset, make_split(seq_dataset, everything), GraphBuildConfig())
    assert kg.entity_names == [] and kg.entity_type_names == []
    assert kg.relation_names == ["bought_next", "bought_together"]
    e = edges(kg, seq_dataset)
    ring = sum(int(b[1:]) == (int(a[1:]) + 1) % 30 for a, b in e["bought_next"])
    assert ring >= 0.8 * len(e["bought_next"])
    # Every 5th user buys its last two ring items on the same day.
    assert all(int(b[1:]) - int(a[1:]) in (1, -1, 29, -29) for a, b in e["bought_together"])


# ------------------------------------------------------------------------------ no leakage


def test_no_validation_or_test_event_in_the_graph(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig())
    kg = build_graph(tiny, split, TINY_CFG)
    ui = set(ui_edges(kg))
    held_out = pd.concat([split.valid, split.test])
    assert len(held_out) == 7
    for u, i in zip(held_out["user_idx"], held_out["item_idx"], strict=True):
        assert (int(u), int(i)) not in ui
    assert ui == set(zip(split.train["user_idx"].tolist(), split.train["item_idx"].tolist(),
                         strict=True))
    # u0 buys i5 then i4, u1 i4 then i5, u2 i5 then i0 -- all held out: no such item edges.
    e = edges(kg, tiny)
    for rel in ("bought_next", "bought_together"):
        assert not any("i5" in pair for pair in e[rel])
        assert ("i4", "i5") not in e[rel] and ("i5", "i4") not in e[rel]
    # The same events in the training part would give those edges.
    every = pd.concat([split.train, split.valid, split.test], ignore_index=True)
    leaky = Split(tiny, "all", every, split.valid.iloc[:0], split.test.iloc[:0])
    e_all = edges(build_graph(tiny, leaky, TINY_CFG), tiny)
    assert {("i5", "i4"), ("i4", "i5"), ("i5", "i0")} <= e_all["bought_next"]


def test_time_cut_split_uses_train_only(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig(method="time_cut", valid_start="2024-01-03",
                                         test_start="2024-01-05"))
    kg = build_graph(tiny, split, TINY_CFG)
    assert len(kg.ui_user) == len(split.train)
    day2 = DAY0 + pd.Timedelta(days=2)
    assert (split.train["timestamp"] < day2).all()
    e = edges(kg, tiny)
    # u0 {i0,i1}@0 -> i2@1 and u2 {i3,i4}@0 -> i5@1; nothing from day 2 on.
    assert e["bought_next"] == {("i0", "i2"), ("i1", "i2"), ("i3", "i5"), ("i4", "i5")}


# ------------------------------------------------------------------------------ weights


def test_event_weights_and_recency_decay(tiny: Dataset) -> None:
    split = make_split(tiny, SplitConfig())
    item = {f"i{j}": j for j in range(7)}
    w = ui_edges(build_graph(tiny, split, GraphBuildConfig()))
    assert w[(0, item["i0"])] == 2.0  # purchase
    assert w[(0, item["i2"])] == 1.0  # click
    assert w[(1, item["i1"])] == 1.5  # cart
    assert w[(3, item["i1"])] == 1.0  # rating (weight column is the rating, not used)
    cfg = GraphBuildConfig(event_weights={"click": 1.0, "cart": 3.0, "purchase": 4.0,
                                          "rating": 0.5},
                           recency_half_life_days=1.0)
    w = ui_edges(build_graph(tiny, split, cfg))
    # The latest training event is on day 2; ages in days are 2 - day.
    assert w[(0, item["i0"])] == pytest.approx(4.0 * 0.25)  # purchase, day 0
    assert w[(0, item["i2"])] == pytest.approx(1.0 * 0.5)  # click, day 1
    assert w[(0, item["i3"])] == pytest.approx(4.0)  # purchase, day 2
    assert w[(1, item["i1"])] == pytest.approx(3.0 * 0.5)  # cart, day 1
    assert w[(3, item["i1"])] == pytest.approx(0.5 * 0.25)  # rating, day 0
    assert build_graph(tiny, split, cfg).ui_weight.dtype == np.float32
    with pytest.raises(ValueError, match="purchase"):
        build_graph(tiny, split, GraphBuildConfig(event_weights={"click": 1.0}))


def test_repeated_pairs_are_summed(tiny: Dataset) -> None:
    inter = tiny.interactions
    rows = inter[(inter["user_id"] == "u0") & inter["item_id"].isin(["i0", "i3"])]
    train = pd.concat([rows, rows.iloc[[0]]], ignore_index=True)  # i0 twice
    empty = train.iloc[:0]
    kg = build_graph(tiny, Split(tiny, "manual", train, empty, empty),
                     GraphBuildConfig(recency_half_life_days=2.0))
    assert ui_edges(kg) == pytest.approx({(0, 0): 2 * 2.0 * 0.5, (0, 3): 2.0})


def test_price_bands_are_right_closed_quantiles() -> None:
    price = pd.Series([1.0, 2.0, 3.0, 4.0, np.nan, 10.0])
    assert price_band_of(price, 2).tolist() == [0, 0, 0, 1, -1, 1]
    expected = pd.qcut(price, 4, labels=False).fillna(-1).astype(int).tolist()
    assert price_band_of(price, 4).tolist() == expected
    assert price_band_of(pd.Series([5.0, 5.0]), 3).tolist() == [0, 0]
    assert price_band_of(price, 0).tolist() == [-1] * 6


# ------------------------------------------------------------------------------ real data


def test_amazon_beauty_build_is_fast_and_sane(tmp_path: Path) -> None:
    from kgrank.data.adapters import import_dataset

    assert BEAUTY.is_dir(), f"Amazon Beauty not found at {BEAUTY}"
    ds = import_dataset("amazon-5core", BEAUTY, tmp_path / "beauty")
    split = make_split(ds, SplitConfig())
    start = time.perf_counter()
    kg = build_graph(ds, split, GraphBuildConfig())
    seconds = time.perf_counter() - start
    summary = graph_summary(kg)
    print(f"Amazon Beauty graph built in {seconds:.2f} s: {summary}")
    assert seconds < 20.0
    nodes, rel = summary["nodes"], summary["edges"]
    assert isinstance(nodes, dict) and isinstance(rel, dict)
    assert nodes["item"] == 12_101 and nodes["user"] == 22_363
    assert 1_900 <= nodes["brand"] <= 2_200
    assert nodes["category"] >= 230
    assert rel["bought_next"] > 0 and rel["bought_together"] > 0
    assert rel["in_category"] >= 12_000
    assert summary["ui_edges"] == len(split.train)
    ui = pd.MultiIndex.from_arrays([kg.ui_user, kg.ui_item])
    for part in (split.valid, split.test):
        assert not ui.isin(pd.MultiIndex.from_arrays([part["user_idx"], part["item_idx"]])).any()
    # Item-item edges stay under the cap per head item and relation.
    heads = pd.DataFrame({"h": kg.kg_head, "r": kg.kg_rel})
    item_rels = [kg.relation_names.index(r) for r in ("bought_next", "bought_together")]
    assert heads[heads["r"].isin(item_rels)].groupby(["r", "h"]).size().max() <= 20


def test_bulk_groups_and_timeless_sources_give_no_quadratic_pairs(tmp_path: Path) -> None:
    # u0 "buys" 101 items at one time (a bulk import) and then i0 + i1 together on a later day;
    # u1 buys i2 and i3 in one session on two days.
    rows = [("u0", f"i{j}", 0, "purchase", 1.0, None) for j in range(2, 103)]
    rows += [("u0", "i0", 1, "purchase", 1.0, None), ("u0", "i1", 1, "purchase", 1.0, None),
             ("u1", "i2", 0, "purchase", 1.0, "s"), ("u1", "i3", 1, "purchase", 1.0, "s")]
    inter = interactions(rows)
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(103)]})
    ds = write_dataset(tmp_path / "bulk", items, inter)
    everything = SplitConfig(method="random", valid_ratio=0.0, test_ratio=0.0)
    split = make_split(ds, everything)
    with pytest.warns(UserWarning, match="1 time groups with more than 100 items"):
        e = edges(build_graph(ds, split, GraphBuildConfig(max_item_neighbors=0)), ds)
    assert e["bought_together"] == both({("i0", "i1"), ("i2", "i3")})
    assert e["bought_next"] == {("i2", "i3")}  # nothing from the bulk group to i0 / i1
    # Without time information (one timestamp for everything) only sessions give pairs.
    ds = write_dataset(tmp_path / "timeless", items, inter.assign(timestamp=DAY0))
    e = edges(build_graph(ds, make_split(ds, everything), GraphBuildConfig()), ds)
    assert "bought_next" not in e
    assert e["bought_together"] == both({("i2", "i3")})
