"""Fusion training: causal histories, no leakage, learning, save / reload, modality subsets."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kgrank.config import EvalConfig, FusionConfig, SplitConfig
from kgrank.data.dataset import Dataset
from kgrank.data.demo import DemoConfig, generate_demo
from kgrank.data.split import Split, make_split
from kgrank.eval.protocol import evaluate
from kgrank.features.context import ContextVocab, Demographics
from kgrank.features.requests import Requests, requests_for_targets
from kgrank.fusion.train import (
    MODALITIES,
    EventIndex,
    FusionInputs,
    FusionResult,
    QueryCache,
    request_features,
    sampled_softmax_loss,
    train_fusion,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_sequences  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EVAL = EvalConfig(ks=[10], main_metric="ndcg@10", bootstrap=0)
SMALL = FusionConfig(dim=16, hidden=32, history_len=4, epochs=2, batch_size=256, negatives=64,
                     lr=5e-3, temperature=0.1)
QUERY_DIM = 12


def encode_query(texts: Sequence[str | None]) -> np.ndarray:
    """A deterministic stand-in for the text encoder: a hashed bag of words."""
    out = np.zeros((len(texts), QUERY_DIM), np.float32)
    for row, text in enumerate(texts):
        for word in (text or "").split():
            out[row, sum(map(ord, word)) % QUERY_DIM] += 1.0
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return generate_demo(tmp_path_factory.mktemp("fusion") / "shop",
                         DemoConfig(n_users=120, n_items=80, seed=0))


@pytest.fixture(scope="module")
def shop_split(shop: Dataset) -> Split:
    return make_split(shop, SplitConfig(positive_events=["click", "cart", "purchase"]))


def shop_inputs(shop: Dataset, seed: int = 0) -> FusionInputs:
    rng = np.random.default_rng(seed)
    text_mask = np.ones(shop.n_items, bool)
    text_mask[::7] = False  # some items have no text
    image_mask = rng.random(shop.n_items) > 0.5
    image_mask[::7] = False  # ... and no image either
    return FusionInputs(
        graph_user=rng.normal(size=(shop.n_users, 8)).astype(np.float32),
        graph_item=None,
        text_item=rng.normal(size=(shop.n_items, 10)).astype(np.float32),
        text_mask=text_mask,
        image_item=rng.normal(size=(shop.n_items, 6)).astype(np.float32),
        image_mask=image_mask,
        encode_query=encode_query,
        demographics=Demographics.from_users(shop.users),
    )


@pytest.fixture(scope="module")
def trained(shop: Dataset, shop_split: Split) -> FusionResult:
    return train_fusion(shop_split, shop_inputs(shop), SMALL, EVAL, None, progress=False)


def history_frame(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    users, items, times = zip(*rows, strict=True)
    return pd.DataFrame({"user_idx": users, "item_idx": items,
                         "timestamp": pd.to_datetime(list(times), utc=True, format="ISO8601")})


def one_request(user: int, time: str, query: str | None = None) -> Requests:
    return Requests(np.array([user]), np.array([pd.Timestamp(time).value // 10**9]),
                    np.array(["mobile"], object), np.array([None], object),
                    np.array([query], object))


# ---------------------------------------------------------------- causal windows


def test_event_index_windows_are_causal_and_ignore_row_order() -> None:
    rows = [(0, 5, "2024-01-02"), (0, 3, "2024-01-01"), (0, 9, "2024-01-02"),
            (0, 7, "2024-01-03"), (1, 2, "2024-01-01"), (0, 3, "2024-01-04")]  # repeat of 3
    index = EventIndex(history_frame(rows))
    assert index.items.tolist() == [3, 5, 9, 7, 2]  # (user, time, item) order, first of a pair
    t = pd.Timestamp("2024-01-02", tz="UTC").value // 10**9
    users, times = np.array([0, 0, 1, -1, 0]), np.array([t, t, t, t, t - 10**6])
    lo, hi = index.bounds(users, times, strict=True)
    assert (hi - lo).tolist() == [1, 1, 1, 0, 0]  # strictly before: only item 3 for user 0
    lo, hi = index.bounds(users, times, strict=False)
    assert (hi - lo).tolist() == [3, 3, 1, 0, 0]  # at or before: 3, 5 and 9
    shuffled = EventIndex(history_frame(rows[::-1]))
    assert shuffled.items.tolist() == index.items.tolist()


def test_future_events_do_not_change_user_vectors(trained: FusionResult,
                                                 shop_split: Split) -> None:
    requests = requests_for_targets(shop_split.valid)
    history = shop_split.history("valid")
    base = trained.user_vectors(requests, history)
    later = pd.Timestamp(int(requests.timestamp.max()) + 3600, unit="s", tz="UTC")
    future = pd.DataFrame({"user_idx": requests.user_idx, "item_idx": np.arange(len(requests))
                           % shop_split.n_items, "timestamp": later})
    leaked = pd.concat([history, future], ignore_index=True)
    assert np.array_equal(base, trained.user_vectors(requests, leaked))
    # ... while an event at the request time itself counts (the split's convention)
    now = future.assign(timestamp=pd.to_datetime(requests.timestamp, unit="s", utc=True))
    moved = trained.user_vectors(requests, pd.concat([history, now], ignore_index=True))
    assert not np.allclose(base, moved)


def test_order_of_same_time_events_does_not_matter(trained: FusionResult) -> None:
    # user 3 has five events at one time and history_len = 4: the window cuts the group
    rows = [(3, i, "2024-03-01 10:00") for i in (11, 4, 27, 8, 19)] + [(3, 2, "2024-02-01")]
    request = one_request(3, "2024-03-02", "blue shampoo")
    base = trained.user_vectors(request, history_frame(rows))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(rows))
        perm = trained.user_vectors(request, history_frame([rows[i] for i in order]))
        assert np.array_equal(base, perm)


def test_same_time_history_leaves_out_only_the_event_itself() -> None:
    rows = [(0, 1, "2024-01-01"), (0, 5, "2024-01-02"), (0, 3, "2024-01-02"),
            (0, 9, "2024-01-02"), (0, 2, "2024-01-03")]
    frame = history_frame(rows).assign(event="click")
    index = EventIndex(frame)
    assert index.position(np.array([0, 0, 1]), index.times[[2, 2, 2]],
                          np.array([9, 4, 9])).tolist() == [3, -1, -1]
    requests = Requests.from_events(frame)
    vocab, queries = ContextVocab(), QueryCache(None, 0)
    for n_hist, expected in ((3, [[], [1], [1], [1], [3, 5, 9]]),
                             (2, [[], [1], [1], [1], [5, 9]])):
        strict = request_features(requests, index, vocab, queries, n_hist, strict=True)
        own = request_features(requests, index, vocab, queries, n_hist, strict=False,
                               exclude_own=True)
        ub = strict.batch(np.arange(5), torch.device("cpu"))
        assert [sorted(ub.hist_items[r][ub.hist_mask[r]].tolist()) for r in range(5)] == expected
        ub = own.batch(np.arange(5), torch.device("cpu"))
        got = [sorted(ub.hist_items[r][ub.hist_mask[r]].tolist()) for r in range(5)]
        if n_hist == 3:
            assert got == [[], [1, 3, 9], [1, 5, 9], [1, 3, 5], [3, 5, 9]]
        else:  # the last two of the others, ordered by (time, item)
            assert got == [[], [3, 9], [5, 9], [3, 5], [5, 9]]
    with pytest.raises(ValueError, match="exclude_own"):
        request_features(requests, index, vocab, queries, 2, strict=True, exclude_own=True)


# ---------------------------------------------------------------- training


def test_loss_masks_accidental_hits_and_applies_log_q() -> None:
    users = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    cand = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    pos = torch.tensor([0, 1, 0])
    cand_ids = torch.cat([pos, torch.tensor([0, 2])])  # row 0's positive is also row 2's
    log_q = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    loss = sampled_softmax_loss(users, cand, cand_ids, pos, log_q, 0.5)
    logits = users @ cand.T / 0.5 - log_q[cand_ids]
    expected = []
    for b in range(3):
        keep = [c for c in range(5) if c == b or cand_ids[c] != pos[b]]
        expected.append(-torch.log_softmax(logits[b, keep], 0)[keep.index(b)])
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_training_learns_a_sequence_dataset(tmp_path: Path) -> None:
    ds = make_sequences(tmp_path, n_users=150, n_items=30, seed=1)
    split = make_split(ds, SplitConfig())
    rng = np.random.default_rng(0)
    inputs = FusionInputs(text_item=rng.normal(size=(ds.n_items, 16)).astype(np.float32))
    cfg = SMALL.model_copy(update={"epochs": 12, "patience": 12, "batch_size": 128,
                                   "negatives": 32, "modality_dropout": 0.0})
    result = train_fusion(split, inputs, cfg, EVAL, None, progress=False)
    losses = [h.loss for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_valid is not None and result.best_valid > 0.4  # random: ~0.1
    test = evaluate(result.scorer(requests_for_targets(split.test), split.history("test")),
                    split, "test", EVAL, progress=False)
    assert test.metrics["ndcg@10"] > 0.4
    assert result.best_epoch == 1 + int(np.argmax([h.valid or 0.0 for h in result.history]))


def test_result_shapes_and_items_without_content(trained: FusionResult,
                                                 shop_split: Split) -> None:
    items = trained.item_emb()
    assert items.shape == (shop_split.n_items, SMALL.dim)
    assert np.allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    requests = requests_for_targets(shop_split.test)
    history = shop_split.history("test")
    scores = trained.score_requests(requests, history)
    assert scores.shape == (len(requests), shop_split.n_items)
    bare = shop_inputs(shop_split.dataset).text_mask
    assert bare is not None and torch.isfinite(scores[:, ~bare]).all()  # no text, no image
    users = trained.user_vectors(requests, history)
    assert users.shape == (len(requests), SMALL.dim)
    assert np.allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    score = trained.scorer(requests, history)
    some = requests.user_idx[[2, 0]]
    assert torch.allclose(score(some), scores[[2, 0]], atol=1e-5)
    with pytest.raises(KeyError, match="no request"):
        score(np.array([10**6]))
    assert [h.epoch for h in trained.history] == [1, 2]
    assert trained.best_valid == max(h.valid for h in trained.history if h.valid is not None)


def test_training_is_deterministic(shop: Dataset, shop_split: Split,
                                   trained: FusionResult) -> None:
    again = train_fusion(shop_split, shop_inputs(shop), SMALL, EVAL, None, progress=False)
    assert [h.loss for h in again.history] == [h.loss for h in trained.history]
    assert np.array_equal(again.item_emb(), trained.item_emb())


def test_save_and_reload_reproduce_scores(trained: FusionResult, shop_split: Split,
                                          tmp_path: Path) -> None:
    trained.save(tmp_path / "fusion")
    assert sorted(p.name for p in (tmp_path / "fusion").iterdir()) == [
        "fusion.json", "fusion.safetensors"]
    loaded = FusionResult.load(tmp_path / "fusion")  # cached queries: no encoder needed
    requests = requests_for_targets(shop_split.test)
    history = shop_split.history("test")
    assert torch.equal(loaded.score_requests(requests, history),
                       trained.score_requests(requests, history))
    assert loaded.best_epoch == trained.best_epoch and loaded.vocab == trained.vocab
    fresh = one_request(0, "2024-06-01", "a query never seen")
    with pytest.raises(ValueError, match="no encode_query"):
        loaded.user_vectors(fresh, history)
    loaded = FusionResult.load(tmp_path / "fusion", encode_query=encode_query)
    assert np.array_equal(loaded.user_vectors(fresh, history),
                          trained.user_vectors(fresh, history))


def test_modalities_subset_drops_inputs(shop: Dataset, shop_split: Split,
                                        tmp_path: Path) -> None:
    result = train_fusion(shop_split, shop_inputs(shop), SMALL.model_copy(update={"epochs": 1}),
                          EVAL, None, progress=False, modalities=("text", "behaviour"))
    spec = result.model.spec
    assert spec.item_modalities == ("text",) and spec.graph_user_dim == 0
    assert spec.query_dim == 0 and not spec.context and spec.behaviour
    names = set(result.model.state_dict())
    assert "text_item" in names and not {"image_item", "graph_user"} & names
    assert result.modalities == ("text", "behaviour")
    requests, history = requests_for_targets(shop_split.test), shop_split.history("test")
    loaded = FusionResult.load(result.save(tmp_path / "text-only"))
    assert loaded.modalities == ("text", "behaviour")
    assert torch.equal(loaded.score_requests(requests, history),
                       result.score_requests(requests, history))
    bare = train_fusion(shop_split, shop_inputs(shop), SMALL.model_copy(update={"epochs": 1}),
                        EVAL, None, progress=False, modalities=("context", "query"))
    assert not bare.model.spec.behaviour and bare.model.spec.query_dim == QUERY_DIM
    assert np.isfinite(bare.score_requests(requests, history).numpy()).all()
    same = train_fusion(shop_split, shop_inputs(shop), SMALL.model_copy(update={"epochs": 1}),
                        EVAL, None, progress=False, same_time_history=True)
    assert np.isfinite(same.history[0].loss) and same.best_epoch == 1
    assert FusionResult.load(same.save(tmp_path / "same")).same_time_history
    with pytest.raises(ValueError, match="unknown modalities"):
        train_fusion(shop_split, shop_inputs(shop), SMALL, EVAL, None, progress=False,
                     modalities=("text", "colour"))
    assert set(MODALITIES) == {"graph", "text", "image", "context", "query", "behaviour"}
