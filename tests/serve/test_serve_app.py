"""The serving API: search with explanations, cold start, filters, similar items, health,
OpenAPI, and a corpus of bad requests that get 4xx with a clear message."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kgrank.export import load
from kgrank.serve.app import create_app
from kgrank.serve.searcher import Context, Searcher
from tests.export.tiny import TinyExport, tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)  # made once per session (cached in tests.export.tiny)

FAMILIES = {"graph", "text", "image", "behaviour", "context", "query", "fusion", "bias"}


@pytest.fixture(scope="module")
def searcher(tiny: TinyExport) -> Searcher:
    return Searcher(load(tiny.export_dir))


@pytest.fixture(scope="module")
def client(searcher: Searcher) -> Iterator[TestClient]:
    with TestClient(create_app(searcher)) as c:
        yield c


def test_search_ranks_with_explanations(client: TestClient, searcher: Searcher) -> None:
    meta = client.get("/meta").json()
    user = meta["users"][0]
    body = {"user_id": user, "query": "running shoes", "k": 5,
            "context": {"device": meta["devices"][0], "location": meta["locations"][0],
                        "time": "2024-03-01T20:00:00Z"}}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["user_known"] and not out["cold_start"] and len(out["results"]) == 5
    scores = [h["score"] for h in out["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in out["results"]:
        assert set(hit["why"]) <= FAMILIES and "bias" in hit["why"]
        assert sum(hit["why"].values()) == pytest.approx(hit["score"], abs=1e-3)
        assert set(hit["reasons"]) <= FAMILIES - {"bias"}
    assert set(out["timings_ms"]) == {"query_embed", "candidates", "features", "ltr", "explain"}
    # the same request twice: the same ranking (the query embedding now comes from the cache)
    again = client.post("/search", json=body).json()
    assert [h["item_id"] for h in again["results"]] == [h["item_id"] for h in out["results"]]
    assert searcher.query_text is not None and searcher.query_text.hits > 0


def test_cold_start_filters_similar_health(client: TestClient, searcher: Searcher) -> None:
    r = client.post("/search", json={"user_id": "nobody-ever", "query": "blue", "k": 3})
    assert r.status_code == 200 and r.json()["cold_start"] and len(r.json()["results"]) == 3
    r = client.post("/search", json={"k": 4})  # no user, no query: context only
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    r = client.post("/search", json={"k": 50, "filters": {"max_price": 30.0}})
    assert r.status_code == 200
    assert all(h["price"] is None or h["price"] <= 30.0 for h in r.json()["results"])
    item = searcher.item_ids[0]
    sim = client.get(f"/items/{item}/similar", params={"k": 4}).json()
    assert len(sim["results"]) == 4 and item not in [h["item_id"] for h in sim["results"]]
    assert client.get("/items/nope/similar").status_code == 404
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["items"] == 120
    with_image = next(i for i, p in zip(searcher.item_ids, searcher.images, strict=True) if p)
    img = client.get(f"/items/{with_image}/image")
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/items/{item_id}/similar", "/healthz"} <= set(paths)
    assert "<input" in client.get("/").text
    # the in-process API agrees with the HTTP one
    res = searcher.search("nobody-ever", "blue", Context(), k=3)
    assert not res.user_known and len(res.hits) == 3


BAD: list[tuple[Any, str]] = [
    ({"k": 0}, "k:"),
    ({"k": -5}, "k:"),
    ({"k": 1001}, "k:"),
    ({"k": 10**12}, "k:"),
    ({"k": "ten"}, "k:"),
    ({"k": 2.5}, "k:"),
    ({"query": "x" * 513}, "query:"),
    ({"query": 42}, "query:"),
    ({"user_id": 7}, "user_id:"),
    ({"user_id": ""}, "user_id:"),
    ({"context": {"device": "toaster"}}, "context.device: unknown device"),
    ({"context": {"location": "Atlantis"}}, "context.location: unknown location"),
    ({"context": {"time": "yesterday-ish"}}, "context.time:"),
    ({"context": {"weather": "rain"}}, "context.weather:"),
    ({"context": "mobile"}, "context:"),
    ({"filters": {"min_price": -1}}, "filters.min_price:"),
    ({"filters": {"min_price": 50, "max_price": 10}}, "filters.min_price:"),
    ({"unknown": 1}, "unknown:"),
    ({"explain_method": "lime"}, "explain_method:"),
    ([1, 2, 3], "body"),
    ("not an object", "body"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_requests_get_a_clear_422(client: TestClient, body: Any, message: str) -> None:
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"], r.json()
    assert client.get("/healthz").status_code == 200  # and the server keeps answering


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"k": 5', b"\xff\xfe"])
def test_malformed_json(client: TestClient, raw: bytes) -> None:
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["error"]
    ok = client.post("/search", json={"k": 2})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_known_queries_are_pinned_and_not_encoded_again(searcher: Searcher) -> None:
    enc = searcher.query_text
    fusion_queries = searcher.stage.inputs.fusion.queries  # type: ignore[union-attr]
    assert enc is not None and len(enc.pinned) > 0  # the run's training queries
    assert set(enc.pinned) <= set(fusion_queries.texts)  # (earlier tests added new ones there)
    known = fusion_queries.texts[0]
    misses = enc.misses
    res = searcher.search(None, known, Context(), k=3)
    assert len(res.hits) == 3 and enc.misses == misses  # served from the pinned table
    # the pinned vector is the text encoder's own output for that query
    with enc.uncached():
        fresh = enc([known])[0]
    assert np.allclose(enc.pinned[known], fresh, atol=1e-5)
    assert enc.misses == misses + 1 and known not in enc.cache  # uncached() restored the cache
    if searcher.query_image is not None:  # the image model's text tower: pinned at start-up
        assert set(searcher.query_image.pinned) == set(enc.pinned)


def test_searcher_limits_native_thread_pools(searcher: Searcher) -> None:
    from threadpoolctl import threadpool_info

    assert searcher.threads == 1
    pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
    assert pools and all(p["num_threads"] == 1 for p in pools)


def test_both_explanation_methods_sum_to_the_score(client: TestClient, searcher: Searcher
                                                   ) -> None:
    body = {"user_id": searcher.dataset.users["user_id"].iloc[3], "k": 6}
    out = {m: client.post("/search", json={**body, "explain_method": m}).json()
           for m in ("path", "shap")}
    path, shap = out["path"]["results"], out["shap"]["results"]
    assert [h["item_id"] for h in path] == [h["item_id"] for h in shap]  # same ranking
    for a, b in zip(path, shap, strict=True):
        assert sum(a["why"].values()) == pytest.approx(a["score"], abs=1e-3)
        assert sum(b["why"].values()) == pytest.approx(b["score"], abs=1e-3)
        assert set(a["why"]) == set(b["why"])


def test_concurrent_requests_are_batched_and_answered_as_alone(searcher: Searcher) -> None:
    users = list(searcher.user_row)[:6] + ["nobody-ever"]
    bodies = [{"user_id": users[i % len(users)], "k": 3 + i % 4,
               **({"query": ["shoes", "red linen shirt"][i % 2]} if i % 3 else {})}
              for i in range(24)]
    # a long wait makes the batches fill: 8 clients at a time
    with TestClient(create_app(searcher, max_batch=8, max_wait_ms=50)) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: c.post("/search", json=b), bodies))
        batcher = c.app.state.batcher  # type: ignore[attr-defined]
        assert batcher.items == len(bodies) and batcher.batches < len(bodies)
    assert all(a.status_code == 200 for a in answers)
    assert max(a.json()["batch_size"] for a in answers) > 1
    for body, answer in zip(bodies, answers, strict=True):
        alone = searcher.search(body["user_id"], body.get("query"), Context(), k=body["k"])
        got = answer.json()["results"]
        assert [h["item_id"] for h in got] == [h.item_id for h in alone.hits]
        assert [h["score"] for h in got] == pytest.approx([h.score for h in alone.hits],
                                                          abs=1e-9)
