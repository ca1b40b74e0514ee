"""Tests for kgrank.data.demo: the synthetic shop, its determinism and its ground-truth oracle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kgrank.data.dataset import Dataset, load_dataset
from kgrank.data.demo import (
    COLOURS,
    CONFIG_FILE,
    DEPARTMENTS,
    PARAMS_FILE,
    PATTERNS,
    TERMS,
    DemoConfig,
    DemoOracle,
    generate_demo,
    has_oracle,
    oracle_requests,
    tokenize,
)

SMALL = DemoConfig(n_users=300, n_items=200, seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return generate_demo(tmp_path_factory.mktemp("demo") / "shop", SMALL)


@pytest.fixture(scope="module")
def oracle(demo: Dataset) -> DemoOracle:
    return DemoOracle.load(demo.root)


@pytest.fixture(scope="module")
def clicks(demo: Dataset) -> pd.DataFrame:
    inter = demo.interactions
    return inter[inter["event"] == "click"].reset_index(drop=True)


@pytest.fixture(scope="module")
def requests(demo: Dataset) -> pd.DataFrame:
    return oracle_requests(demo.interactions)


def percentile_ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Share of items scored above the target item (ties count half); 0 = ranked first."""
    t = scores[np.arange(len(target)), target][:, None]
    return ((scores > t).sum(axis=1) + 0.5 * ((scores == t).sum(axis=1) - 1)) / scores.shape[1]


# -- the dataset ----------------------------------------------------------------------------------


def test_dataset_loads_with_configured_counts(demo: Dataset) -> None:
    ds = load_dataset(demo.root)
    assert ds.fingerprint == demo.fingerprint
    assert ds.n_users == SMALL.n_users and ds.n_items == SMALL.n_items
    assert list(ds.users["user_id"][:3]) == ["u00001", "u00002", "u00003"]
    assert list(ds.items["item_id"][:3]) == ["i00001", "i00002", "i00003"]
    assert set(ds.users.columns) >= {"user_id", "age", "region"}
    assert set(ds.items.columns) >= {"item_id", "title", "description", "categories", "brand",
                                     "price", "image", "colour", "material", "pattern",
                                     "department"}
    inter = ds.interactions
    assert set(inter["event"]) == {"view", "click", "cart", "purchase"}
    assert (inter["weight"] == 1.0).all()
    assert inter["user_idx"].nunique() == SMALL.n_users
    meta = json.loads((demo.root / CONFIG_FILE).read_text())
    assert set(ds.users["region"]) <= set(meta["cities"])
    assert set(inter["location"]) == set(meta["cities"])
    assert set(inter["device"]) == {"mobile", "desktop", "app"}
    # Sessions per user: >= 3, mean close to the configured one.
    per_user = inter.groupby("user_idx")["session_id"].nunique()
    assert per_user.min() >= 3
    assert abs(per_user.mean() - SMALL.sessions_per_user) < 0.25
    ts = inter["timestamp"]
    assert ts.min() >= pd.Timestamp("2024-01-01", tz="UTC")
    assert ts.max() < pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=SMALL.n_days + 2)
    assert ds.triples is not None
    assert set(ds.triples["relation"]) == {"made_of", "belongs_to", "popular_in", "complements"}
    item_heads = ds.triples.loc[ds.triples["relation"] == "made_of", "head"]
    assert set(item_heads) == set(ds.items["item_id"])
    assert {p for cats in ds.items["categories"] for p in cats} <= set(meta["leaves"])
    comp = ds.triples[ds.triples["relation"] == "complements"]
    assert set(comp["head"]) | set(comp["tail"]) <= set(meta["leaves"])
    regional = ds.triples[ds.triples["relation"] == "popular_in"]
    assert len(regional) == round(SMALL.regional_brand_share * SMALL.n_brands)
    assert set(regional["tail"]) <= set(meta["cities"])
    assert (demo.root / "README.md").read_text().startswith("# kgrank demo shop")


def test_every_user_has_three_distinct_clicked_items(demo: Dataset, clicks: pd.DataFrame) -> None:
    per_user = clicks.groupby("user_idx")["item_idx"]
    assert per_user.size().min() >= 3
    # A clicked item is never clicked again by the same user: leave-last-out targets are new.
    assert (per_user.nunique() == per_user.size()).all()
    positives = demo.interactions[demo.interactions["event"].isin(["click", "cart", "purchase"])]
    clicked = set(zip(clicks["user_idx"], clicks["item_idx"], strict=True))
    assert set(zip(positives["user_idx"], positives["item_idx"], strict=True)) == clicked


def test_sessions_are_well_formed(demo: Dataset) -> None:
    inter = demo.interactions
    views = inter[inter["event"] == "view"]
    size = views.groupby("session_id").size()
    assert (size == SMALL.list_length).all()
    assert sorted(views["position"].unique()) == list(range(SMALL.list_length))
    assert (views.groupby("session_id")["timestamp"].nunique() == 1).all()
    assert (views.groupby("session_id")["item_idx"].nunique() == SMALL.list_length).all()
    per_session = inter.groupby("session_id")
    assert (per_session["query"].nunique(dropna=False) == 1).all()
    assert (per_session["device"].nunique() == 1).all()
    assert (per_session["location"].nunique() == 1).all()
    n_clicks = inter[inter["event"] == "click"].groupby("session_id").size()
    assert n_clicks.index.equals(size.index) and n_clicks.between(1, 2).all()
    search_share = per_session["query"].first().notna().mean()
    assert 0.3 < search_share < 0.5
    # Positive events carry a shown position and come after the views, in funnel order.
    shown = set(zip(views["session_id"], views["item_idx"], views["position"], strict=True))
    pos_events = inter[inter["event"] != "view"]
    assert set(zip(pos_events["session_id"], pos_events["item_idx"], pos_events["position"],
                   strict=True)) <= shown
    start = views.groupby("session_id")["timestamp"].first()
    assert (pos_events["timestamp"].to_numpy() > start[pos_events["session_id"]].to_numpy()).all()
    for _, events in pos_events.groupby(["session_id", "item_idx"]):
        order = events.sort_values("timestamp")["event"].tolist()
        assert order in (["click"], ["click", "cart"], ["click", "cart", "purchase"])
        assert events["timestamp"].is_unique
    # Sessions of a user do not overlap.
    first = inter.groupby("session_id").agg(u=("user_idx", "first"), t0=("timestamp", "min"),
                                            t1=("timestamp", "max")).sort_values(["u", "t0"])
    same_user = first["u"].to_numpy()[1:] == first["u"].to_numpy()[:-1]
    assert (first["t0"].to_numpy()[1:][same_user] > first["t1"].to_numpy()[:-1][same_user]).all()


def test_images_decode_and_missing_images_are_none(demo: Dataset) -> None:
    images = demo.items["image"]
    present = images.notna()
    assert 0.85 < present.mean() < 1.0
    for rel in images[present]:
        path = demo.root / rel
        assert path.is_file()
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "PNG"
            assert img.size == (SMALL.image_size, SMALL.image_size)
            assert img.mode == "RGB"
    raw = pq.read_table(demo.root / "items.parquet").column("image").to_pylist()
    assert [v is None for v in raw] == (~present).tolist()
    assert any(v is None for v in raw)
    on_disk = {p.name for p in (demo.root / "images").iterdir()}
    assert on_disk == {Path(rel).name for rel in images[present]}


def test_images_show_colour_and_pattern(demo: Dataset) -> None:
    rgb = dict(COLOURS)
    items = demo.items[demo.items["image"].notna()]

    def main_colours(rel: str) -> set[tuple[int, ...]]:
        with Image.open(demo.root / rel) as img:
            px = pd.Series(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))
        counts = px.value_counts()
        return set(counts[counts > 30].index)

    background, outline = (232, 232, 232), (90, 90, 90)
    for _, item in items.head(40).iterrows():
        found = main_colours(item["image"])
        assert {background, rgb[item["colour"]]} <= found
        # A solid item shows only its fill colour (and outline); a patterned one adds ink.
        assert len(found - {background, outline}) == (1 if item["pattern"] == "solid" else 2)


def test_text_never_mentions_pattern(demo: Dataset) -> None:
    items = demo.items
    assert set(items["pattern"]) <= set(PATTERNS)
    assert set(items["department"]) <= set(DEPARTMENTS)
    for text in pd.concat([items["title"], items["description"].dropna()]):
        assert not set(tokenize(text)) & set(PATTERNS), text
    assert 0.8 < items["description"].notna().mean() < 0.98
    assert all(len(c) == 1 and len(c[0].split(" > ")) == 3 for c in items["categories"])
    assert (items["price"] > 0).all()
    for title, brand, material in zip(items["title"], items["brand"], items["material"],
                                      strict=True):
        assert title.startswith(brand + " ") and material in title.lower()


# -- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_fingerprint(tmp_path: Path, demo: Dataset) -> None:
    again = generate_demo(tmp_path / "again", SMALL)
    assert again.fingerprint == demo.fingerprint
    for rel in ("images/i00001.png", PARAMS_FILE, CONFIG_FILE):
        if (demo.root / rel).exists():
            assert (again.root / rel).read_bytes() == (demo.root / rel).read_bytes()
    other = generate_demo(tmp_path / "other", DemoConfig(n_users=300, n_items=200, seed=1))
    assert other.fingerprint != demo.fingerprint
    with pytest.raises(FileExistsError):
        generate_demo(tmp_path / "again", SMALL)
    replaced = generate_demo(tmp_path / "again", DemoConfig(n_users=300, n_items=200, seed=1),
                             overwrite=True)
    assert replaced.fingerprint == other.fingerprint


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sessions_per_user"):
        generate_demo(tmp_path / "x", DemoConfig(n_users=10, n_items=50, sessions_per_user=2.0))
    assert not (tmp_path / "x").exists()


# -- the oracle -----------------------------------------------------------------------------------


def test_oracle_files_and_shape(demo: Dataset, oracle: DemoOracle, requests: pd.DataFrame,
                                tmp_path: Path) -> None:
    assert has_oracle(demo.root)
    assert not has_oracle(tmp_path)
    with pytest.raises(FileNotFoundError):
        DemoOracle.load(tmp_path)
    meta = json.loads((demo.root / CONFIG_FILE).read_text())
    assert set(meta["weights"]) == set(TERMS)
    assert meta["weights"]["query"] == SMALL.w_query
    assert oracle.n_items == demo.n_items and oracle.n_users == demo.n_users
    scores = oracle.score(requests.iloc[:50])
    assert scores.shape == (50, demo.n_items) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    # Deterministic and row-independent (chunking does not matter).
    again = oracle.score(requests.iloc[:50], chunk=7)
    assert np.array_equal(scores, again)
    with pytest.raises(ValueError, match="unknown terms"):
        oracle.score(requests.iloc[:1], without=("colourr",))


def test_oracle_requests_previous_item(demo: Dataset, clicks: pd.DataFrame,
                                       requests: pd.DataFrame) -> None:
    assert list(requests.columns) == ["user_idx", "timestamp", "device", "location", "query",
                                      "prev_item_idx"]
    assert len(requests) == len(clicks)
    assert np.array_equal(requests["user_idx"].to_numpy(), clicks["user_idx"].to_numpy())
    # The user's first click has no previous item; every later click has one, a clicked item.
    first = clicks.groupby("user_idx")["timestamp"].transform("min") == clicks["timestamp"]
    assert (requests.loc[first.to_numpy(), "prev_item_idx"] == -1).all()
    later = requests.loc[~first.to_numpy()]
    assert (later["prev_item_idx"] >= 0).all()
    clicked = set(zip(clicks["user_idx"], clicks["item_idx"], strict=True))
    assert set(zip(later["user_idx"], later["prev_item_idx"], strict=True)) <= clicked


def test_oracle_ranks_clicked_items_far_better_than_random_and_popularity(
    demo: Dataset, oracle: DemoOracle, clicks: pd.DataFrame, requests: pd.DataFrame
) -> None:
    target = clicks["item_idx"].to_numpy()
    ranks = percentile_ranks(oracle.score(requests), target)
    popularity = np.bincount(target, minlength=demo.n_items).astype(np.float64)
    pop_ranks = percentile_ranks(np.tile(popularity, (len(target), 1)), target)
    assert ranks.mean() < 0.1
    assert ranks.mean() < 0.5 * pop_ranks.mean()


def test_every_term_matters(oracle: DemoOracle, clicks: pd.DataFrame,
                            requests: pd.DataFrame) -> None:
    target = clicks["item_idx"].to_numpy()
    full = percentile_ranks(oracle.score(requests), target).mean()
    for term in TERMS:
        ablated = percentile_ranks(oracle.score(requests, without=(term,)), target).mean()
        assert ablated > full + 0.001, term


def test_query_term_matters(oracle: DemoOracle, clicks: pd.DataFrame,
                            requests: pd.DataFrame) -> None:
    search = requests["query"].notna().to_numpy()
    assert search.sum() > 100
    target = clicks["item_idx"].to_numpy()[search]
    with_query = percentile_ranks(oracle.score(requests[search]), target)
    no_query = requests[search].assign(query=None)
    without = percentile_ranks(oracle.score(no_query), target)
    assert with_query.mean() < without.mean() - 0.01
    # Query words the catalog does not know still count in the share of matched tokens.
    req = requests[search].iloc[:5]
    s = oracle.score(req)
    diluted = oracle.score(req.assign(query=req["query"] + " zzzunknown"))
    assert (diluted <= s + 1e-5).all() and (diluted < s - 1e-5).any()


def test_context_terms_matter(oracle: DemoOracle, clicks: pd.DataFrame,
                              requests: pd.DataFrame) -> None:
    target = clicks["item_idx"].to_numpy()
    night, _ = oracle.encode_context(requests["timestamp"], requests["device"].tolist(),
                                     requests["location"].tolist())
    assert night.sum() > 30
    full = percentile_ranks(oracle.score(requests[night]), target[night])
    no_shift = DemoOracle(oracle.params, {**oracle.meta, "night_price_shift": 0.0})
    shifted = percentile_ranks(no_shift.score(requests[night]), target[night])
    assert full.mean() < shifted.mean()
    # An unknown city switches off the regional term only.
    req = requests.iloc[:20]
    moved = oracle.score(req.assign(location="Atlantis"))
    assert np.array_equal(moved, oracle.score(req, without=("regional",)))


def test_position_bias(demo: Dataset) -> None:
    inter = demo.interactions
    views = inter.loc[inter["event"] == "view", "position"].value_counts()
    clicks = inter.loc[inter["event"] == "click", "position"].value_counts()
    ctr = (clicks / views).fillna(0.0)
    assert ctr[0] > 2 * ctr[SMALL.list_length - 1]
    assert ctr[0] > ctr[4] > ctr[SMALL.list_length - 1]


def test_funnel_rates(demo: Dataset) -> None:
    counts = demo.interactions["event"].value_counts()
    assert 0.2 < counts["cart"] / counts["click"] < 0.7
    assert 0.3 < counts["purchase"] / counts["cart"] < 0.7


def test_cart_rate_follows_the_oracle_score(demo: Dataset, oracle: DemoOracle,
                                            clicks: pd.DataFrame, requests: pd.DataFrame) -> None:
    """The generator's P(cart | click) = sigmoid(s - a) holds with the oracle's s."""
    s = oracle.score(requests)[np.arange(len(clicks)), clicks["item_idx"].to_numpy()]
    expected = 1.0 / (1.0 + np.exp(-(s.astype(np.float64) - SMALL.cart_offset)))
    carts = demo.interactions[demo.interactions["event"] == "cart"]
    carted = set(zip(carts["session_id"], carts["item_idx"], strict=True))
    observed = np.array([(sid, i) in carted for sid, i in zip(clicks["session_id"],
                                                              clicks["item_idx"], strict=True)])
    high = s > np.median(s)
    for part in (high, ~high):
        assert abs(observed[part].mean() - expected[part].mean()) < 0.06
    assert observed[high].mean() > observed[~high].mean() + 0.1
