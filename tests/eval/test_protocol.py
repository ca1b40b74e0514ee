from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kgrank.config import EvalConfig, SplitConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import make_split
from kgrank.eval.protocol import evaluate, grid, tune_and_test

CFG = EvalConfig(ks=[1, 5, 10], bootstrap=100, batch_size=7)


def test_perfect_scorer_and_history_masking(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    target = split.test.set_index("user_idx")["item_idx"]
    hist = split.history("test")

    def oracle(users: np.ndarray) -> torch.Tensor:
        scores = torch.zeros(len(users), split.n_items)
        for row, u in enumerate(users):
            # history items get the highest scores: masking must remove them
            scores[row, hist.loc[hist.user_idx == u, "item_idx"].to_numpy().copy()] = 10.0
            scores[row, target[u]] = 5.0
        return scores

    res = evaluate(oracle, split, "test", CFG, progress=False)
    assert res.n_users == len(target)
    for k in (1, 5, 10):
        assert res.metrics[f"ndcg@{k}"] == 1.0 and res.metrics[f"hr@{k}"] == 1.0
    assert res.group_sizes["same_time"] == split.stats["test_same_time"]
    assert res.flat()["ndcg@10_ci_low"] == 1.0


def test_ties_are_not_broken_by_item_id(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())

    def constant(users: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(users), split.n_items)

    res = evaluate(constant, split, "test", EvalConfig(ks=[1], bootstrap=0), progress=False)
    # With 30 items and ~6 masked, a random tie order hits about 1/24 of the time; an
    # id-ordered one would hit whenever the target has the lowest unmasked id.
    lowest = []
    hist = split.history("test")
    for u, item in zip(split.test.user_idx, split.test.item_idx, strict=True):
        free = sorted(set(range(split.n_items)) - set(hist.loc[hist.user_idx == u, "item_idx"]))
        lowest.append(free[0] == item)
    assert np.mean(lowest) >= 0.2  # id-ordered ties would score at least this
    assert res.metrics["hr@1"] < 0.15


def test_matches_bruteforce_per_user_loop(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    rng = np.random.default_rng(0)
    table = rng.random((split.n_users, split.n_items)).astype(np.float32)

    res = evaluate(lambda u: torch.from_numpy(table[u]), split, "valid", CFG, progress=False)
    hist = split.history("valid")
    ndcg, hits = [], []
    for u in np.unique(split.valid.user_idx):
        s = table[u].copy()
        s[hist.loc[hist.user_idx == u, "item_idx"].to_numpy()] = -np.inf
        rank = list(np.argsort(-s)[:5])
        t = split.valid.loc[split.valid.user_idx == u, "item_idx"].item()
        ndcg.append(1 / np.log2(rank.index(t) + 2) if t in rank else 0.0)
        hits.append(float(t in rank))
    assert abs(res.metrics["ndcg@5"] - np.mean(ndcg)) < 1e-6
    assert abs(res.metrics["hr@5"] - np.mean(hits)) < 1e-6


def test_sampled_negatives_are_labelled_and_easier(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    rng = np.random.default_rng(1)
    table = torch.from_numpy(rng.random((split.n_users, split.n_items)).astype(np.float32))
    full = evaluate(lambda u: table[u], split, "test", CFG, progress=False)
    cfg = CFG.model_copy(update={"sampled_negatives": 5})
    sampled = evaluate(lambda u: table[u], split, "test", cfg, name="m", progress=False)
    assert sampled.sampled and "sampled" in sampled.name
    assert sampled.metrics["hr@5"] >= full.metrics["hr@5"]


class _Recorder:
    fits: list[tuple[int, int]] = []

    def __init__(self, boost: float) -> None:
        self.boost = boost

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> _Recorder:
        self.n_items = n_items
        self.next = history.sort_values("timestamp").groupby("user_idx")["item_idx"].last()
        _Recorder.fits.append((len(history), int(self.boost)))
        return self

    def score(self, users: np.ndarray) -> torch.Tensor:
        scores = torch.rand(len(users), self.n_items, generator=torch.Generator().manual_seed(0))
        nxt = (self.next.reindex(users).fillna(0).to_numpy().astype(int) + 1) % self.n_items
        scores[torch.arange(len(users)), torch.from_numpy(nxt)] += self.boost
        return scores


def test_tune_and_test_tunes_on_validation_only(seq_dataset: Dataset) -> None:
    split = make_split(seq_dataset, SplitConfig())
    _Recorder.fits = []
    tuned = tune_and_test("rec", _Recorder, {"boost": [0.0, 2.0]}, split, CFG, progress=False)
    assert tuned.params == {"boost": 2.0}  # following the ring is right on validation
    n_train, n_valid = len(split.train), len(split.valid)
    # two tuning fits on train only, one final fit on train + valid
    assert _Recorder.fits == [(n_train, 0), (n_train, 2), (n_train + n_valid, 2)]
    assert tuned.test.metrics["ndcg@10"] > 0.5
    assert grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_ranked_topk_breaks_ties_by_the_random_order() -> None:
    from kgrank.eval.protocol import ranked_topk

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 40), generator=gen).float()  # many ties
    scores[:5] = torch.rand(5, 40, generator=gen)  # and some rows without ties
    scores[7, :30] = -torch.inf
    perm = torch.randperm(40, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(40)
    vals, idx = ranked_topk(scores.clone(), 10, perm, inv)
    for row in range(50):
        ref = np.lexsort((inv.numpy(), -scores[row].numpy()))[:10]
        assert idx[row].tolist() == ref.tolist()
        assert vals[row].tolist() == scores[row, ref].tolist()
