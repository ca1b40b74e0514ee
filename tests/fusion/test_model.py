"""The fusion towers on random inputs: shapes, unit norms, missing modalities, set pooling."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kgrank.fusion.model import (
    GAP_BUCKETS,
    FusionModel,
    FusionSpec,
    UserBatch,
    gap_bucket,
    modality_dropout,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_USERS, N_ITEMS, DIM = 12, 20, 16


def spec(**kw: object) -> FusionSpec:
    base: dict[str, object] = dict(
        n_users=N_USERS, n_items=N_ITEMS, dim=DIM, hidden=32, temperature=0.1,
        modality_dropout=0.3, graph_item_dim=8, graph_user_dim=8, text_dim=10, image_dim=6,
        query_dim=10, context=True, n_devices=3, n_locations=4, demo_numeric=1,
        demo_cardinalities=(3,), behaviour=True,
    )
    base.update(kw)
    return FusionSpec(**base)  # type: ignore[arg-type]


def model(s: FusionSpec | None = None, seed: int = 0) -> FusionModel:
    s = s or spec()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    text_mask = np.ones(N_ITEMS, bool)
    text_mask[:5] = False
    image_mask = np.ones(N_ITEMS, bool)
    image_mask[3:8] = False
    return FusionModel(
        s,
        graph_item=rng.normal(size=(N_ITEMS, s.graph_item_dim)) if s.graph_item_dim else None,
        graph_user=rng.normal(size=(N_USERS, s.graph_user_dim)) if s.graph_user_dim else None,
        text_item=rng.normal(size=(N_ITEMS, s.text_dim)) if s.text_dim else None,
        text_mask=text_mask if s.text_dim else None,
        image_item=rng.normal(size=(N_ITEMS, s.image_dim)) if s.image_dim else None,
        image_mask=image_mask if s.image_dim else None,
        demo_numeric=rng.normal(size=(N_USERS, s.demo_numeric)).astype(np.float32),
        demo_categorical=rng.integers(0, 3, (N_USERS, len(s.demo_cardinalities))),
    ).eval()


def batch(b: int = 5, n_hist: int = 4, seed: int = 0, query_dim: int = 10) -> UserBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n_hist, generator=g) > 0.3
    mask[0] = False  # an empty history
    users = torch.randint(0, N_USERS, (b,), generator=g)
    users[1] = -1  # an unknown user
    has_query = torch.tensor([i % 2 == 0 for i in range(b)])
    return UserBatch(
        users=users, hist_items=torch.randint(0, N_ITEMS, (b, n_hist), generator=g),
        hist_mask=mask, hist_gap=torch.randint(0, GAP_BUCKETS, (b, n_hist), generator=g),
        context=torch.randint(0, 3, (b, 2), generator=g), time=torch.randn(b, 4, generator=g),
        query=torch.randn(b, query_dim, generator=g) * has_query[:, None], has_query=has_query,
    )


def user_vectors(m: FusionModel, ub: UserBatch) -> torch.Tensor:
    with torch.no_grad():
        return m.users_with_items(ub, m.all_items())


def test_shapes_unit_norms_and_finite_scores() -> None:
    m = model()
    items = m.all_items()
    users = user_vectors(m, batch())
    assert items.shape == (N_ITEMS, DIM) and users.shape == (5, DIM)
    assert torch.allclose(items.norm(dim=1), torch.ones(N_ITEMS), atol=1e-5)
    assert torch.allclose(users.norm(dim=1), torch.ones(5), atol=1e-5)
    scores = m.score(users, items)
    assert scores.shape == (5, N_ITEMS) and torch.isfinite(scores).all()
    assert scores.abs().max() <= 1 / m.spec.temperature + 1e-4


def test_items_without_any_modality_get_finite_distinct_free_embeddings() -> None:
    # items 3 and 4 have neither text nor image; without graph input they have nothing at all
    m = model(spec(graph_item_dim=0, graph_user_dim=0))
    items = m.all_items()
    assert torch.isfinite(items).all()
    assert torch.allclose(items[3], items[4])  # both are the learned "no content" vector
    assert torch.isfinite(m.score(user_vectors(m, batch()), items)).all()
    # a model with no item input at all still scores
    bare = model(spec(graph_item_dim=0, graph_user_dim=0, text_dim=0, image_dim=0))
    assert torch.isfinite(bare.score(user_vectors(bare, batch()), bare.all_items())).all()


def test_absent_modalities_do_not_reach_the_item_embedding() -> None:
    m = model()
    before = m.all_items()
    text = m.get_buffer("text_item")
    text[:5] = 100.0  # items 0..4 have no text: their text rows are never read
    text[10] = 100.0  # item 10 has text: its embedding changes
    after = m.all_items()
    assert torch.equal(before[:5], after[:5])
    assert not torch.allclose(before[10], after[10])


def test_modality_dropout_keeps_one_present_modality() -> None:
    g = torch.Generator().manual_seed(0)
    present = torch.rand(4000, 3, generator=g) > 0.4
    kept = modality_dropout(present, 0.6, g)
    assert not (kept & ~present).any()  # never adds a modality
    assert (kept.any(1) == present.any(1)).all()  # never drops all present ones
    rate = 1 - kept[present].float().mean().item()
    assert 0.3 < rate < 0.6
    assert torch.equal(modality_dropout(present, 0.0, g), present)


def test_training_mode_drops_modalities_eval_mode_does_not() -> None:
    m = model(spec(modality_dropout=0.9))
    ids = torch.arange(N_ITEMS)
    assert torch.equal(m.item_tower(ids), m.item_tower(ids))  # eval: deterministic
    m.train()
    with torch.no_grad():
        a = m.item_tower(ids, torch.Generator().manual_seed(1))
        b = m.item_tower(ids, torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(N_ITEMS), atol=1e-5)


def test_history_is_a_set_and_padding_is_ignored() -> None:
    m = model()
    ub = batch(b=6, n_hist=5)
    base = user_vectors(m, ub)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = UserBatch(ub.users, ub.hist_items[:, perm], ub.hist_mask[:, perm],
                         ub.hist_gap[:, perm], ub.context, ub.time, ub.query, ub.has_query)
    assert torch.allclose(base, user_vectors(m, shuffled), atol=1e-6)
    junk = ub.hist_items.masked_fill(~ub.hist_mask, 7)  # padded slots: any item, any gap
    gaps = ub.hist_gap.masked_fill(~ub.hist_mask, 3)
    padded = UserBatch(ub.users, junk, ub.hist_mask, gaps, ub.context, ub.time, ub.query,
                       ub.has_query)
    assert torch.allclose(base, user_vectors(m, padded), atol=1e-6)


def test_context_and_query_change_the_user_vector() -> None:
    m = model()
    ub = batch()
    base = user_vectors(m, ub)
    other = UserBatch(ub.users, ub.hist_items, ub.hist_mask, ub.hist_gap, ub.context,
                      ub.time + 1.0, ub.query, ub.has_query)
    assert not torch.allclose(base, user_vectors(m, other))
    no_query = UserBatch(ub.users, ub.hist_items, ub.hist_mask, ub.hist_gap, ub.context,
                         ub.time, ub.query, torch.zeros_like(ub.has_query))
    changed = (base - user_vectors(m, no_query)).abs().sum(1) > 1e-6
    assert changed.tolist() == ub.has_query.tolist()


def test_gap_buckets() -> None:
    b = gap_bucket(np.array([0, 1, 2, 60, 3600, 86400, 10**12]))
    assert b.tolist()[:2] == [0, 0]
    assert (b.diff() >= 0).all() and b.max().item() == GAP_BUCKETS - 1


def test_spec_round_trips_through_json() -> None:
    s = spec()
    assert FusionSpec.from_json(s.to_json()) == s
    with pytest.raises(ValueError, match="shape"):
        FusionModel(s, text_item=np.zeros((N_ITEMS + 1, s.text_dim)))
