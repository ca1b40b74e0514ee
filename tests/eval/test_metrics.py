"""Tests for kgrank.eval.metrics: hand-computed cases and agreement with sklearn/torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

import kgrank.eval.metrics as metrics_mod
from kgrank.eval.metrics import (
    METRIC_NAMES,
    bootstrap_ci,
    item_coverage,
    metrics_from_hits,
    paired_bootstrap_ci,
    topk_hits,
)

L2 = math.log2


def _hits(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _random_problem(
    n_users: int = 50, n_items: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tie-free positive scores and 1-5 relevant items per user."""
    gen = torch.Generator().manual_seed(seed)
    # A random permutation per row guarantees distinct scores; all scores are > 0
    # because torchmetrics' reciprocal rank ignores relevant items with preds <= 0.
    perms = torch.stack([torch.randperm(n_items, generator=gen) for _ in range(n_users)])
    scores = (perms.to(torch.float32) + 1.0) / n_items
    targets = torch.zeros(n_users, n_items, dtype=torch.bool)
    n_rel = torch.randint(1, 6, (n_users,), generator=gen)
    for u in range(n_users):  # building the fixture only
        items = torch.randperm(n_items, generator=gen)[: int(n_rel[u])]
        targets[u, items] = True
    return scores, targets


# --------------------------------------------------------------------------- hand cases


def test_output_keys_and_types() -> None:
    out = metrics_from_hits(_hits([[1, 0], [0, 1]]), torch.tensor([1, 2]), [1, 2])
    assert set(out) == {f"{m}@{k}" for m in METRIC_NAMES for k in (1, 2)}
    assert METRIC_NAMES == ("ndcg", "recall", "hr", "precision", "mrr")
    for value in out.values():
        assert value.shape == (2,)
        assert value.dtype == torch.float32


def test_hand_computed_batch() -> None:
    hits = _hits(
        [
            [1, 0, 1, 0],  # user 0: 2 relevant, both in the top 4 (ranks 1 and 3)
            [0, 0, 1, 0],  # user 1: 1 relevant at rank 3
            [0, 0, 0, 0],  # user 2: 3 relevant, no hit
            [1, 1, 0, 1],  # user 3: 5 relevant (> k), hits at ranks 1, 2, 4
        ]
    )
    n_rel = torch.tensor([2, 1, 3, 5])
    out = metrics_from_hits(hits, n_rel, [1, 2, 3, 4])

    idcg2 = 1 + 1 / L2(3)
    idcg3 = 1 + 1 / L2(3) + 1 / L2(4)
    idcg4 = 1 + 1 / L2(3) + 1 / L2(4) + 1 / L2(5)
    expected = {
        # user 0
        (0, "ndcg@1"): 1.0,
        (0, "ndcg@2"): 1 / idcg2,
        (0, "ndcg@3"): (1 + 1 / L2(4)) / idcg2,
        (0, "ndcg@4"): (1 + 1 / L2(4)) / idcg2,
        (0, "recall@1"): 1 / 2,
        (0, "recall@2"): 1 / 2,
        (0, "recall@3"): 2 / 2,
        (0, "recall@4"): 2 / 2,
        (0, "hr@1"): 1.0,
        (0, "hr@4"): 1.0,
        (0, "precision@1"): 1 / 1,
        (0, "precision@2"): 1 / 2,
        (0, "precision@3"): 2 / 3,
        (0, "precision@4"): 2 / 4,
        (0, "mrr@1"): 1.0,
        (0, "mrr@4"): 1.0,
        # user 1: single relevant item at rank 3
        (1, "ndcg@2"): 0.0,
        (1, "ndcg@3"): (1 / L2(4)) / 1,
        (1, "ndcg@4"): (1 / L2(4)) / 1,
        (1, "recall@2"): 0.0,
        (1, "recall@3"): 1.0,
        (1, "hr@2"): 0.0,
        (1, "hr@3"): 1.0,
        (1, "precision@3"): 1 / 3,
        (1, "precision@4"): 1 / 4,
        (1, "mrr@2"): 0.0,
        (1, "mrr@3"): 1 / 3,
        (1, "mrr@4"): 1 / 3,
        # user 3: n_relevant = 5 > k, so IDCG@k is truncated at k
        (3, "ndcg@1"): 1.0,
        (3, "ndcg@2"): (1 + 1 / L2(3)) / idcg2,
        (3, "ndcg@3"): (1 + 1 / L2(3)) / idcg3,
        (3, "ndcg@4"): (1 + 1 / L2(3) + 1 / L2(5)) / idcg4,
        (3, "recall@3"): 2 / 5,
        (3, "recall@4"): 3 / 5,
        (3, "precision@4"): 3 / 4,
        (3, "hr@1"): 1.0,
        (3, "mrr@4"): 1.0,
    }
    for (user, key), value in expected.items():
        assert out[key][user].item() == pytest.approx(value, abs=1e-6), (user, key)

    # user 2 has no hit: every metric is exactly zero at every cut-off
    for key, tensor in out.items():
        assert tensor[2].item() == 0.0, key


def test_float_n_relevant_matches_long() -> None:
    hits = _hits([[1, 0, 1, 0], [0, 1, 0, 0]])
    a = metrics_from_hits(hits, torch.tensor([2, 3]), [2, 4])
    b = metrics_from_hits(hits, torch.tensor([2.0, 3.0]), [2, 4])
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_cutoff_beyond_list_length_treats_missing_ranks_as_misses() -> None:
    # Catalog of 3 items, k = 5 (list clipped to 3 items by topk_hits).
    hits = _hits([[0, 1, 1], [0, 0, 0]])
    out = metrics_from_hits(hits, torch.tensor([2, 1]), [5])
    assert out["ndcg@5"][0].item() == pytest.approx(
        (1 / L2(3) + 1 / L2(4)) / (1 + 1 / L2(3)), abs=1e-6
    )
    assert out["recall@5"][0].item() == pytest.approx(1.0)
    assert out["precision@5"][0].item() == pytest.approx(2 / 5)
    assert out["mrr@5"][0].item() == pytest.approx(1 / 2)
    assert out["hr@5"][0].item() == 1.0
    for key, value in out.items():
        assert value[1].item() == 0.0, key


def test_zero_relevant_raises() -> None:
    with pytest.raises(ValueError):
        metrics_from_hits(_hits([[1, 0], [0, 0]]), torch.tensor([1, 0]), [1, 2])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        metrics_from_hits(_hits([[1, 0]]), torch.tensor([1]), [0])
    with pytest.raises(ValueError):
        metrics_from_hits(_hits([[1, 0]]), torch.tensor([1, 1]), [1])
    with pytest.raises(TypeError):
        metrics_from_hits(torch.tensor([[1, 0]]), torch.tensor([1]), [1])


# ----------------------------------------------------------------- reference libraries


KS = [1, 5, 10, 20, 200]


def _our_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    _, hits = topk_hits(scores, targets, max(KS))
    return metrics_from_hits(hits, targets.sum(dim=1), KS)


def test_ndcg_matches_sklearn() -> None:
    scores, targets = _random_problem()
    ours = _our_metrics(scores, targets)
    y_true = targets.numpy().astype(np.float64)
    y_score = scores.numpy().astype(np.float64)
    for k in KS:
        expected = np.array(
            [ndcg_score(y_true[u : u + 1], y_score[u : u + 1], k=k) for u in range(len(y_true))]
        )
        np.testing.assert_allclose(ours[f"ndcg@{k}"].numpy(), expected, atol=1e-5, rtol=0)
        # the batch average as well
        assert ours[f"ndcg@{k}"].mean().item() == pytest.approx(
            ndcg_score(y_true, y_score, k=k), abs=1e-5
        )


def test_metrics_match_torchmetrics() -> None:
    scores, targets = _random_problem(seed=1)
    ours = _our_metrics(scores, targets)
    reference = {
        "ndcg": retrieval_normalized_dcg,
        "recall": retrieval_recall,
        "hr": retrieval_hit_rate,
        "precision": retrieval_precision,
        "mrr": retrieval_reciprocal_rank,
    }
    assert set(reference) == set(METRIC_NAMES)
    for k in KS:
        for name, fn in reference.items():
            expected = torch.stack(
                [fn(scores[u], targets[u], top_k=k) for u in range(scores.shape[0])]
            ).to(torch.float32)
            torch.testing.assert_close(
                ours[f"{name}@{k}"], expected, atol=1e-5, rtol=0, msg=f"{name}@{k}"
            )


# -------------------------------------------------------------------------- topk_hits


def test_topk_hits_basic_and_masking() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.7, 0.2],
            [0.3, 0.95, 0.5, 0.4, 0.6],
        ]
    )
    targets = _hits([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]])
    masked = scores.clone()
    masked[0, 0] = float("-inf")  # user 0's best item is excluded (e.g. a training item)
    masked[1, 1] = float("-inf")
    idx, hits = topk_hits(masked, targets, 3)
    assert idx.dtype == torch.long and hits.dtype == torch.bool
    assert idx.tolist() == [[2, 3, 4], [4, 2, 3]]
    assert hits.tolist() == [[False, True, False], [False, True, False]]
    assert not (idx[0] == 0).any() and not (idx[1] == 1).any()
    torch.testing.assert_close(hits, torch.gather(targets, 1, idx))


def test_topk_hits_masked_items_never_in_topk_random() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(20, 100, generator=gen)
    mask = torch.rand(20, 100, generator=gen) < 0.3
    targets = torch.rand(20, 100, generator=gen) < 0.1
    scores[mask] = float("-inf")
    idx, hits = topk_hits(scores, targets, 50)  # every row keeps > 50 unmasked items
    assert (~mask).sum(dim=1).min().item() > 50
    assert not torch.gather(mask, 1, idx).any()
    torch.testing.assert_close(hits, torch.gather(targets, 1, idx))
    # sorted by decreasing score
    picked = torch.gather(scores, 1, idx)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


def test_topk_hits_clips_k_and_never_counts_masked_positions() -> None:
    scores = torch.tensor([[0.1, float("-inf"), 0.3]])
    targets = _hits([[1, 1, 0]])  # item 1 is relevant but masked
    idx, hits = topk_hits(scores, targets, 10)
    assert idx.shape == (1, 3) and hits.shape == (1, 3)
    assert idx.tolist() == [[2, 0, 1]]
    assert hits.tolist() == [[False, True, False]]


def test_topk_hits_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        topk_hits(torch.tensor([[0.1, float("nan")]]), _hits([[1, 0]]), 1)
    with pytest.raises(ValueError):
        topk_hits(torch.rand(2, 3), torch.zeros(2, 4, dtype=torch.bool), 1)
    with pytest.raises(ValueError):
        topk_hits(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0)
    with pytest.raises(TypeError):
        topk_hits(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 1)


# ------------------------------------------------------------------------ bootstrap_ci


def test_bootstrap_deterministic_and_mean() -> None:
    rng = np.random.default_rng(0)
    values = rng.random(500)
    a = bootstrap_ci(values, n_boot=300, seed=7)
    b = bootstrap_ci(values, n_boot=300, seed=7)
    c = bootstrap_ci(values, n_boot=300, seed=8)
    assert a == b
    assert a[1:] != c[1:]
    mean, low, high = a
    assert mean == pytest.approx(float(values.mean()), abs=1e-12)
    assert low < mean < high
    # percentile CI of the mean is close to the normal-theory interval
    half_width = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.25)
    # torch input gives the same answer as numpy input
    assert bootstrap_ci(torch.from_numpy(values).float(), n_boot=300, seed=7) == pytest.approx(
        bootstrap_ci(values.astype(np.float32), n_boot=300, seed=7)
    )


def test_bootstrap_chunking_does_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(1).random(1000)
    whole = bootstrap_ci(values, n_boot=200, seed=3)
    monkeypatch.setattr(metrics_mod, "_BOOT_CHUNK_ELEMENTS", 7 * 1000 + 13)  # 7 rows per chunk
    assert bootstrap_ci(values, n_boot=200, seed=3) == whole


def test_bootstrap_constant_values_give_zero_width() -> None:
    mean, low, high = bootstrap_ci(torch.full((100,), 0.25), n_boot=200)
    assert mean == low == high == 0.25


def test_bootstrap_zero_boot_gives_nan() -> None:
    mean, low, high = bootstrap_ci(np.array([0.0, 1.0, 1.0, 0.0]), n_boot=0)
    assert mean == 0.5
    assert math.isnan(low) and math.isnan(high)


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0]), alpha=0.0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0]), n_boot=-1)


# ----------------------------------------------------------------------- item_coverage


def test_paired_ci_is_tighter_than_marginal_for_a_consistent_small_drop() -> None:
    rng = np.random.default_rng(0)
    full = rng.random(2000)
    ablated = full - 0.01 + rng.normal(0, 0.002, 2000)  # every user a little worse
    delta, low, high = paired_bootstrap_ci(ablated, full, n_boot=300)
    assert delta == pytest.approx(float((ablated - full).mean()))
    assert low <= delta <= high < 0  # the drop is beyond its paired CI ...
    _, f_low, f_high = bootstrap_ci(full, n_boot=300)
    _, _, a_high = bootstrap_ci(ablated, n_boot=300)
    assert a_high > f_low  # ... although the two marginal CIs overlap
    assert high - low < (f_high - f_low) / 10


def test_paired_ci_of_identical_models_is_zero_and_lengths_must_match() -> None:
    vals = np.random.default_rng(1).random(100)
    assert paired_bootstrap_ci(vals, vals.copy(), n_boot=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci(vals, vals[:-1])


def test_item_coverage_hand_case() -> None:
    topk_idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert item_coverage(topk_idx, 5) == pytest.approx(3 / 5)
    assert item_coverage(torch.tensor([[4, 3, 2, 1, 0]]), 5) == 1.0
    with pytest.raises(ValueError):
        item_coverage(torch.tensor([[0, 5]]), 5)
