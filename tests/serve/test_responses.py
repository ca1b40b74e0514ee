"""Answers serialised by the rankers are what FastAPI sends for the response model."""

from __future__ import annotations

import json
import math

from fastapi import FastAPI
from fastapi.testclient import TestClient

from kgrank.serve.responses import answering, search_json, search_out
from kgrank.serve.schemas import SearchOut
from kgrank.serve.searcher import Hit, SearchArgs, SearchResult


def _result() -> SearchResult:
    why = {"graph": 0.1234, "behaviour": -0.0312, "bias": 1.5}
    hits = [Hit("B001", 1.0 / 3.0, "Rosé \"gloss\" ✓", "img/B001.jpg", 12.5, why, ["graph"]),
            Hit("B002", -2e-7, None, None, None, {}, []),
            Hit("B003", 1e21, "x", None, 0.1, {"graph": math.pi}, ["graph", "text"])]
    return SearchResult(hits, True, 997, {"candidates": 0.0071234567, "ltr": 1e-7}, 4)


def test_ranker_answers_equal_fastapis_serialisation() -> None:
    res = _result()
    app = FastAPI()

    @app.get("/out", response_model=SearchOut)
    def out() -> SearchOut:
        return search_out(res)

    with TestClient(app) as client:
        expected = client.get("/out").json()
    got = json.loads(search_json(res))
    assert got == expected
    assert got["results"][0]["image_url"] == "/items/B001/image"
    assert got["results"][1]["image_url"] is None and got["cold_start"] is False
    assert got["timings_ms"] == {"candidates": 7.123, "ltr": 0.0}
    assert SearchOut.model_validate_json(search_json(res)) == search_out(res)


def test_answering_wraps_a_batch_function() -> None:
    seen: list[list[SearchArgs]] = []

    def search_many(batch: list[SearchArgs]) -> list[SearchResult]:
        seen.append(list(batch))
        return [_result() for _ in batch]

    answers = answering(search_many)([SearchArgs(), SearchArgs(k=3)])
    assert len(seen) == 1 and len(answers) == 2
    assert all(json.loads(a)["n_candidates"] == 997 for a in answers)
