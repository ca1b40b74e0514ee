from __future__ import annotations

import numpy as np
import pytest
import torch

from kgrank.ranking.candidates import (
    NON_CANDIDATE_SCORE,
    Candidates,
    candidate_recall,
    full_scores,
    generate_candidates,
)


def _table(matrix: np.ndarray):
    """A source that looks rows up in a fixed [R, n_items] matrix."""
    tensor = torch.as_tensor(matrix, dtype=torch.float32)
    return lambda rows: tensor[torch.as_tensor(rows)]


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    items = np.array([i for x in lists for i in x], dtype=np.int64)
    return offsets, items


def _hand() -> Candidates:
    a = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]], dtype=np.float32)
    b = np.array([[0.1, 0.2, 9, 8, 0.3, 0.4], [9, 8, 0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    e = np.arange(12, dtype=np.float32).reshape(2, 6)
    return generate_candidates({"a": _table(a), "b": _table(b)}, np.arange(2),
                               _csr([[0], []]), n=2, progress=False, extra={"e": _table(e)})


def test_union_dedupe_and_order_on_a_hand_example() -> None:
    c = _hand()
    assert c.items.shape == (2, 4) and c.n == 2 and c.sources == ["a", "b"]
    # row 0: a's top-2 without the excluded item 0 is {1, 2}; b's is {2, 3}
    assert set(c.items[0, :3]) == {1, 2, 3} and c.items[0, 3] == -1
    assert set(c.items[0, :2]) == {1, 2} and c.items[0, 2] == 3  # best rank 0 first
    assert set(c.items[1]) == {5, 0, 4, 1} and set(c.items[1, :2]) == {5, 0}
    got = {(r, int(i)): (c.ranks["a"][r, j], c.ranks["b"][r, j], c.n_sources_hit[r, j],
                         c.scores["a"][r, j], c.scores["b"][r, j], c.scores["e"][r, j])
           for r in range(2) for j, i in enumerate(c.items[r]) if i >= 0}
    assert got[(0, 1)] == (0, 2, 1, 4, np.float32(0.2), 1)
    assert got[(0, 2)] == (1, 0, 2, 3, 9, 2)
    assert got[(0, 3)] == (2, 1, 1, 2, 8, 3)
    assert got[(1, 4)] == (1, 2, 1, 4, np.float32(0.3), 10)
    # padding
    assert not c.valid[0, 3] and c.n_sources_hit[0, 3] == 0
    assert c.scores["a"][0, 3] == 0 and c.scores["e"][0, 3] == 0 and c.ranks["b"][0, 3] == 2
    assert "e" not in c.ranks and c.items.dtype == np.int64
    assert c.scores["a"].dtype == np.float32 and c.ranks["a"].dtype == np.int16


def test_random_sources_history_gather_and_batching() -> None:
    rng = np.random.default_rng(0)
    n_rows, n_items, n = 37, 50, 6
    mats = {"int": rng.integers(0, 4, (n_rows, n_items)).astype(np.float32),  # many ties
            "gauss": rng.normal(size=(n_rows, n_items)).astype(np.float32)}
    sparse = rng.normal(size=(n_rows, n_items)).astype(np.float32)
    sparse[:, 3:] = -np.inf  # proposes at most 3 items
    mats["sparse"] = sparse
    # proposes nothing at all, and nothing in the first batch of 8 (skipped there, not with a
    # batch of 100: the same candidates either way)
    mats["none"] = np.where(rng.random((n_rows, n_items)) < 0.5, -np.inf, np.nan).astype(
        np.float32)
    late = rng.normal(size=(n_rows, n_items)).astype(np.float32)
    late[:8] = -np.inf
    mats["late"] = late
    history = [list(rng.choice(n_items, rng.integers(0, 10), replace=False)) for _ in range(n_rows)]
    src = {k: _table(v) for k, v in mats.items()}
    c = generate_candidates(src, np.arange(n_rows), _csr(history), n, batch_size=8,
                            progress=False)
    again = generate_candidates(src, np.arange(n_rows), _csr(history), n, batch_size=100,
                                progress=False)
    np.testing.assert_array_equal(c.items, again.items)  # batch size does not matter
    for r in range(n_rows):
        items = c.items[r][c.valid[r]]
        assert len(set(items)) == len(items)
        assert not set(items) & set(history[r])
        allowed = np.setdiff1d(np.arange(n_items), history[r])
        proposed: set[int] = set()
        for name, mat in mats.items():
            np.testing.assert_array_equal(
                c.scores[name][r][c.valid[r]],
                np.where(np.isfinite(mat[r, items]), mat[r, items], np.nan),
            )
            in_top = c.ranks[name][r][c.valid[r]] < n
            mine = items[in_top]
            proposed |= set(mine.tolist())
            finite = allowed[np.isfinite(mat[r, allowed])]
            assert len(mine) == min(n, len(finite))
            # the top-n is a true top-n: nothing outside beats its worst member
            if len(mine):
                worst = mat[r, mine].min()
                assert (mat[r, np.setdiff1d(finite, mine)] <= worst).all()
            # ranks follow the source's scores
            order = np.argsort(c.ranks[name][r][c.valid[r]][in_top])
            assert (np.diff(mat[r, mine[order]]) <= 0).all()
        assert proposed == set(items.tolist())
        hits = sum((c.ranks[s][r][c.valid[r]] < n).astype(int) for s in mats)
        np.testing.assert_array_equal(c.n_sources_hit[r][c.valid[r]], hits)
        best = np.min([c.ranks[s][r][c.valid[r]] for s in mats], axis=0)
        assert (np.diff(best) >= 0).all()  # ordered by best rank


def test_ties_are_not_broken_by_item_id() -> None:
    const = lambda rows: torch.zeros(len(rows), 1000)  # noqa: E731
    c = generate_candidates({"c": const}, np.arange(3), None, n=10, progress=False)
    assert c.items.shape == (3, 10)
    assert sorted(c.items[0]) != list(range(10))
    assert list(c.items[0]) != sorted(c.items[0])  # ranks among ties do not follow ids either
    other = generate_candidates({"c": const}, np.arange(3), None, n=10, progress=False, seed=1)
    assert set(other.items[0]) != set(c.items[0])


def test_recall() -> None:
    c = _hand()
    targets = np.array([3, 0])  # row 0: only b has it (rank 1); row 1: only b (rank 0)
    assert c.hits(targets).tolist() == [True, True] and c.recall(targets) == 1.0
    assert c.recall(np.array([0, 2])) == 0.0  # excluded / not proposed
    assert c.recall_by_source(targets) == {"a": 0.0, "b": 1.0, "union": 1.0}
    assert c.recall_by_source(targets, at=1) == {"a": 0.0, "b": 0.5, "union": 0.5}
    assert c.recall_by_source(np.array([1, -1])) == {"a": 0.5, "b": 0.0, "union": 0.5}
    assert candidate_recall(c, targets, [1, 2, 50]) == {
        "a@1": 0.0, "b@1": 0.5, "union@1": 0.5, "a@2": 0.0, "b@2": 1.0, "union@2": 1.0}
    assert c.labels(targets).sum() == 2
    with pytest.raises(ValueError, match="cut-off"):
        c.recall_by_source(targets, at=3)


def test_full_scores_ranks_candidates_first_in_their_order() -> None:
    rng = np.random.default_rng(1)
    c = _hand()
    s = rng.normal(size=c.items.shape) * 100
    s[0, 3] = np.nan  # padding: ignored
    full = full_scores(c, s, n_items=6)
    assert full.shape == (2, 6) and full.dtype == torch.float32
    for r in range(2):
        items = c.items[r][c.valid[r]]
        others = np.setdiff1d(np.arange(6), items)
        assert (full[r, others] == NON_CANDIDATE_SCORE).all()
        assert full[r, items].min() > full[r, others].max() if len(others) else True
        by_model = items[np.argsort(-s[r][c.valid[r]])]
        by_full = torch.argsort(full[r], descending=True)[: len(items)].numpy()
        np.testing.assert_array_equal(by_full, by_model)
    sub = full_scores(c, s, n_items=6, rows=np.array([1]))
    torch.testing.assert_close(sub, full[1:])
    bad = s.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        full_scores(c, bad, n_items=6)


def test_bad_inputs() -> None:
    src = {"a": lambda rows: torch.zeros(len(rows), 5)}
    with pytest.raises(ValueError, match="offsets"):
        generate_candidates(src, np.arange(3), _csr([[1], [2]]), n=2, progress=False)
    with pytest.raises(ValueError, match="shape"):
        generate_candidates({"a": lambda rows: torch.zeros(len(rows) + 1, 5)}, np.arange(3),
                            None, n=2, progress=False)
    with pytest.raises(ValueError, match="share"):
        generate_candidates(src, np.arange(3), None, n=2, progress=False, extra=src)
