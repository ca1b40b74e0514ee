"""The searcher's per-request fast path against the ranking stage's own path: the same
candidates, scores, ranks and feature table, bit for bit; LightGBM on one thread gives the
model's scores and explanations; concurrent searches give the sequential answers."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgrank.export import load
from kgrank.features.requests import Requests, requests_for_targets
from kgrank.fusion.inputs import EventIndex
from kgrank.serve import compiled as compiled_mod
from kgrank.serve.compiled import compile_booster
from kgrank.serve.searcher import (
    PART,
    Context,
    Filters,
    SearchArgs,
    Searcher,
    users_index,
)
from tests.export.tiny import TinyExport, tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)  # made once per session (cached in tests.export.tiny)


@pytest.fixture(scope="module")
def searcher(tiny: TinyExport) -> Searcher:
    return Searcher(load(tiny.export_dir))


def _requests(searcher: Searcher, n: int) -> list[Requests]:
    """Test requests replayed one by one, varied: cold users, new and missing queries, earlier
    times (part of the history not yet seen), unknown context."""
    reqs = requests_for_targets(searcher.split.test)
    users = searcher.dataset.users["user_id"].to_numpy()
    out = []
    for j, r in enumerate(np.random.default_rng(3).permutation(len(reqs))[:n]):
        user = "nobody-ever" if j % 7 == 0 else str(users[reqs.user_idx[r]])
        query = ("red linen shirt" if j % 5 == 0 else None if j % 5 == 1 else reqs.query[r])
        t = int(reqs.timestamp[r]) - (86_400 * 20 if j % 3 == 0 else 0)
        device = None if j % 4 == 0 else reqs.device[r]
        out.append(searcher.requests(user, query, Context(t, device, reqs.location[r])))
    return out


def test_fast_path_equals_the_stage_path(searcher: Searcher) -> None:
    assert searcher.fast is not None
    requests = _requests(searcher, 60)
    assert {int(r.user_idx[0]) < 0 for r in requests} == {True, False}
    for req in requests:
        ref = searcher.stage.build_part(PART, req)
        got = searcher.fast.build(req)
        a, b = ref.candidates, got.candidates
        assert np.array_equal(a.items, b.items)
        assert list(a.scores) == list(b.scores) and list(a.ranks) == list(b.ranks)
        for name in a.scores:
            assert np.array_equal(a.scores[name], b.scores[name], equal_nan=True), name
        for name in a.ranks:
            assert np.array_equal(a.ranks[name], b.ranks[name]), name
        assert np.array_equal(a.n_sources_hit, b.n_sources_hit)
        xa, na, fa, ca, ia = searcher.stage.table(ref, np.array([0]))
        xb, nb, fb, cb, ib = searcher.stage.table(got, np.array([0]))
        assert na == nb and fa == fb
        assert np.array_equal(ia, ib) and np.array_equal(ca, cb)
        assert np.array_equal(xa, xb, equal_nan=True)


def test_search_ranks_as_through_the_stage(searcher: Searcher) -> None:
    fast = searcher.fast
    known = next(iter(searcher.user_row))
    bodies = [("nobody-ever", "blue", Context()),
              (known, "shoes", Context(device=searcher.devices[0])), (known, None, Context())]
    try:
        quick = [searcher.search(u, q, c, k=8) for u, q, c in bodies]
        searcher.fast = None  # the stage's build_part for the same requests
        slow = [searcher.search(u, q, c, k=8) for u, q, c in bodies]
    finally:
        searcher.fast = fast
    for a, b in zip(quick, slow, strict=True):
        assert [h.item_id for h in a.hits] == [h.item_id for h in b.hits]
        assert [h.score for h in a.hits] == [h.score for h in b.hits]
        assert [h.why for h in a.hits] == [h.why for h in b.hits]
        assert a.n_candidates == b.n_candidates


def _concat(requests: list[Requests]) -> Requests:
    return Requests(*(np.concatenate([getattr(r, f) for r in requests])
                      for f in ("user_idx", "timestamp", "device", "location", "query")))


def test_fast_path_of_a_batch_equals_the_stage_path(searcher: Searcher) -> None:
    assert searcher.fast is not None
    requests, seen = [], set()
    for r in _requests(searcher, 14):  # the stage path takes one request per user
        if int(r.user_idx[0]) not in seen:
            seen.add(int(r.user_idx[0]))
            requests.append(r)
    batch = _concat(requests)
    assert len(batch) >= 8 and (batch.user_idx < 0).sum() == 1
    ref = searcher.stage.build_part(PART, batch)
    got = searcher.fast.build(batch)
    assert np.array_equal(ref.candidates.items, got.candidates.items)
    for name in ref.candidates.scores:
        assert np.array_equal(ref.candidates.scores[name], got.candidates.scores[name],
                              equal_nan=True), name
    rows = np.arange(len(batch))
    xa, na, _, ca, ia = searcher.stage.table(ref, rows)
    xb, nb, _, cb, ib = searcher.stage.table(got, rows)
    assert na == nb and np.array_equal(ia, ib) and np.array_equal(ca, cb)
    assert np.array_equal(xa, xb, equal_nan=True)


def test_search_many_answers_as_one_search_per_request(searcher: Searcher) -> None:
    users = [*list(searcher.user_row)[:7], "nobody-ever"]
    queries = [None, "shoes", "red linen shirt", None, "blue cotton"]
    batch = [SearchArgs(users[i % len(users)], queries[i % len(queries)],
                        Context(device=searcher.devices[i % len(searcher.devices)]), k=4 + i,
                        filters=Filters(min_price=1.0) if i == 3 else None,
                        explain=i != 2)
             for i in range(11)]
    together = searcher.search_many(batch)
    assert [r.batch_size for r in together] == [11] * 11
    for a, res in zip(batch, together, strict=True):
        alone = searcher.search_many([a])[0]
        assert alone.batch_size == 1
        assert [h.item_id for h in res.hits] == [h.item_id for h in alone.hits]
        assert np.allclose([h.score for h in res.hits], [h.score for h in alone.hits],
                           rtol=0, atol=1e-9)
        assert [h.reasons for h in res.hits] == [h.reasons for h in alone.hits]
        assert res.user_known == alone.user_known and res.n_candidates == alone.n_candidates
        assert len(res.hits) <= a.k


def test_compiled_trees_predict_as_lightgbm(searcher: Searcher) -> None:
    assert searcher.compiled is not None  # lleaves is a dependency
    data = searcher.fast.build(_concat(_requests(searcher, 6))) if searcher.fast else None
    assert data is not None
    x, names, *_ = searcher.stage.table(data, np.arange(6))
    x = x[:, searcher.feature_columns(names)]
    want = searcher.ltr.predict(x)
    got = searcher.predict(x)
    assert np.allclose(got, want, rtol=0, atol=1e-9)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-want, kind="stable").tolist()


def test_compiled_trees_are_cached_and_optional(tmp_path: Path, searcher: Searcher,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    booster = searcher.ltr.booster
    text = booster.model_to_string(num_iteration=searcher.ltr.best_iteration)
    first = compile_booster(text, tmp_path)
    assert first is not None
    cached = list((tmp_path / "lleaves").glob("*.o"))
    assert len(cached) == 1
    again = compile_booster(text, tmp_path)  # loads the object file
    assert again is not None and list((tmp_path / "lleaves").glob("*.o")) == cached
    x = np.random.default_rng(0).normal(size=(50, first.n_features))
    assert np.array_equal(first.predict(x), again.predict(x))
    with pytest.raises(ValueError, match="features"):
        first.predict(x[:, :3])
    monkeypatch.setitem(sys.modules, "lleaves", None)  # not installed: LightGBM is kept
    assert compile_booster(text, tmp_path) is None


def test_compile_options_are_part_of_the_cache_key(tmp_path: Path, searcher: Searcher,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    text = searcher.ltr.booster.model_to_string(num_iteration=searcher.ltr.best_iteration)
    small = compile_booster(text, tmp_path)
    monkeypatch.setattr(compiled_mod, "COMPILE_OPTIONS", {})  # lleaves' defaults
    large = compile_booster(text, tmp_path)
    assert small is not None and large is not None
    assert len(list((tmp_path / "lleaves").glob("*.o"))) == 2  # one object per option set
    x = np.random.default_rng(1).normal(size=(200, small.n_features))
    assert np.allclose(small.predict(x), large.predict(x), rtol=0, atol=1e-12)


def test_single_thread_lightgbm_matches_the_model(searcher: Searcher) -> None:
    data = searcher.fast.build(_requests(searcher, 1)[0]) if searcher.fast else None
    assert data is not None
    x, names, *_ = searcher.stage.table(data, np.array([0]))
    x = x[:, searcher.feature_columns(names)]
    compiled, searcher.compiled = searcher.compiled, None
    try:
        assert np.array_equal(searcher.predict(x), searcher.ltr.predict(x))
    finally:
        searcher.compiled = compiled
    got, fams = searcher.explain(x[:5])
    want, want_fams = searcher.ltr.explain(x[:5])
    assert fams == want_fams and np.array_equal(got, want)
    assert np.allclose(got.sum(1), searcher.predict(x[:5]), atol=1e-9)


def test_users_index_of_one_user_is_the_index_of_the_users_events(searcher: Searcher) -> None:
    history: pd.DataFrame = searcher.history
    full = EventIndex(history)
    for user in [-1, *np.unique(history["user_idx"].to_numpy())[:25].tolist()]:
        own = EventIndex(history[history["user_idx"] == user])
        got = users_index(full, np.array([user], np.int64))
        for attr in ("users", "items", "times", "keys"):
            assert np.array_equal(getattr(got, attr), getattr(own, attr)), (user, attr)
        assert (got.t0, got.span) == (own.t0, own.span)


def test_users_index_is_the_index_of_the_users_events(searcher: Searcher) -> None:
    history: pd.DataFrame = searcher.history
    full = EventIndex(history)
    users = np.unique(history["user_idx"].to_numpy())
    for pick in ([users[3], users[0], -1, users[3]], list(users[5:17]), [-1], []):
        own = EventIndex(history[history["user_idx"].isin(pick)])
        got = users_index(full, np.asarray(pick, np.int64))
        for attr in ("users", "items", "times", "keys"):
            assert np.array_equal(getattr(got, attr), getattr(own, attr)), (pick, attr)
        assert (got.t0, got.span) == (own.t0, own.span)


def test_stage_path_fusion_is_stable_across_requests(searcher: Searcher) -> None:
    """Per-request history frames are built and dropped one after another, so a new frame can
    get a dropped frame's id(); the fusion tower's index must follow the frame, not the id."""
    fusion = searcher.stage.inputs.fusion
    requests = [r for r in _requests(searcher, 40) if r.user_idx[0] >= 0]
    first = [fusion.user_vectors(r, searcher.stage._own_history(PART, searcher.history,
                                                                 r.user_idx))
             for r in requests]
    for r, want in zip(requests, first, strict=True):
        assert np.array_equal(fusion.vectors_at(r, searcher.fast.events), want)
        own = searcher.stage._own_history(PART, searcher.history, r.user_idx)
        assert np.array_equal(fusion.user_vectors(r, own), want)


def test_concurrent_searches_answer_as_sequential_ones(searcher: Searcher) -> None:
    users = list(searcher.user_row)[:12] + ["nobody-ever"]
    queries = [None, "shoes", "red linen shirt", "blue cotton", "warm coat x"]
    bodies = [(users[i % len(users)], queries[i % len(queries)]) for i in range(40)]

    def one(body: tuple[str, str | None]) -> list[tuple[str, float, dict[str, float]]]:
        res = searcher.search(body[0], body[1], Context(), k=6)
        return [(h.item_id, h.score, h.why) for h in res.hits]

    sequential = [one(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, bodies * 3))
    assert concurrent == sequential * 3
