"""BPR sampling, training, early stopping, checkpoints and the test-time graph."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kgrank.config import EvalConfig, GraphTrainConfig, SplitConfig
from kgrank.data.split import Split, make_split
from kgrank.eval.protocol import Scorer, evaluate
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.sampling import BPRSampler
from kgrank.graph.train import (
    ModelName,
    build_model,
    inference_graph,
    load_state,
    propagate,
    save_embeddings,
    scorer,
    train_graph_model,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_sequences  # noqa: E402

EVAL = EvalConfig(ks=[10], bootstrap=0)


def train_graph(split: Split) -> KnowledgeGraph:
    tr = split.train
    return KnowledgeGraph(split.n_users, split.n_items, tr.user_idx.to_numpy(),
                          tr.item_idx.to_numpy(), np.ones(len(tr), np.float32))


# ---------------------------------------------------------------- sampler


def test_sampler_negatives_positives_users_and_determinism() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 40
    users = rng.integers(0, n_users - 5, 600)  # the last 5 users have no item
    items = rng.integers(0, n_items, 600)
    users = np.concatenate([users, np.full(n_items, 7)])  # user 7 owns ... all but one item
    items = np.concatenate([items, np.arange(n_items)])
    keep = ~((users == 7) & (items == 13))
    users, items = users[keep], items[keep]
    sampler = BPRSampler(users, items, n_users, n_items)
    pos_set = set(zip(users.tolist(), items.tolist(), strict=True))
    u, i, j = sampler.sample(np.random.default_rng(1), 20000)
    assert u.dtype == i.dtype == j.dtype == np.int64
    assert all((a, b) in pos_set for a, b in zip(u.tolist(), i.tolist(), strict=True))
    assert not any((a, b) in pos_set for a, b in zip(u.tolist(), j.tolist(), strict=True))
    assert set(j[u == 7].tolist()) == {13}  # the only negative of user 7
    active = np.unique(users)
    counts = np.bincount(u, minlength=n_users)
    assert set(np.flatnonzero(counts).tolist()) == set(active.tolist())  # all, and only, these
    assert counts[active].max() < 1.6 * counts[active].min()  # ~uniform over users (~444 each)
    # positive uniform among the user's items: user 7 has 39 items, ~1/39 each
    pos7 = np.bincount(i[u == 7], minlength=n_items)
    assert pos7[13] == 0 and (pos7[np.arange(n_items) != 13] > 0).all()
    # one epoch = number of (de-duplicated) training pairs
    assert len(sampler.sample(np.random.default_rng(0))[0]) == len(pos_set)
    a = sampler.sample(np.random.default_rng(5), 1000)
    b = sampler.sample(np.random.default_rng(5), 1000)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="out of range"):
        BPRSampler(np.array([0]), np.array([5]), 1, 5)
    with pytest.raises(ValueError, match="no user"):
        BPRSampler(np.array([0, 0]), np.array([0, 1]), 1, 2)  # the user owns every item


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> Split:
    ds = make_sequences(tmp_path_factory.mktemp("ring"), n_users=150, n_items=40)
    return make_split(ds, SplitConfig())


def popularity_ndcg(split: Split) -> float:
    counts = torch.from_numpy(np.bincount(split.train.item_idx, minlength=split.n_items)).float()
    res = evaluate(lambda u: counts.repeat(len(u), 1), split, "valid", EVAL, progress=False)
    return res.metrics["ndcg@10"]


@pytest.mark.parametrize("name", ["lightgcn", "kg"])
def test_training_improves_and_beats_popularity(name: ModelName, ring: Split,
                                                tmp_path: Path) -> None:
    kg = train_graph(ring)
    cfg = GraphTrainConfig(dim=16, layers=2, epochs=8, batch_size=128, lr=0.02,
                           eval_metric="ndcg@10", eval_every=4)
    untrained = build_model(name, kg, cfg)
    before = evaluate(scorer(untrained, untrained.graph(kg)), ring, "valid", EVAL,
                      progress=False).metrics["ndcg@10"]
    res = train_graph_model(name, kg, ring, cfg, EVAL, tmp_path, progress=False)
    assert res.best_valid is not None
    pop = popularity_ndcg(ring)
    assert res.best_valid > before + 0.1, (before, res.best_valid)
    assert res.best_valid > pop + 0.1, (pop, res.best_valid)
    assert res.history[0].loss > res.history[-1].loss
    assert res.user_emb.shape == (ring.n_users, 16) and res.item_emb.shape == (ring.n_items, 16)
    assert (res.entity_emb is None) == (name == "lightgcn")
    torch.testing.assert_close(res.score(np.array([0, 3])),
                               res.user_emb[[0, 3]] @ res.item_emb.T)


def test_early_stopping_checkpoints_and_reload(ring: Split, tmp_path: Path) -> None:
    kg = train_graph(ring)
    # a learning rate this high overfits within a few epochs, so validation stops improving
    cfg = GraphTrainConfig(dim=16, layers=1, epochs=60, batch_size=256, lr=0.3, patience=2,
                           eval_metric="ndcg@10", reg=0.0)
    res = train_graph_model("lightgcn", kg, ring, cfg, EVAL, tmp_path, progress=False)
    n = len(res.history)
    assert n < 60
    assert n == res.best_epoch + cfg.patience
    valid = [r.valid for r in res.history]
    assert res.best_valid == max(v for v in valid if v is not None)
    assert valid.index(res.best_valid) + 1 == res.best_epoch
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == [f"epoch_{n - 1:03d}.safetensors", f"epoch_{n:03d}.safetensors"]
    best = tmp_path / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:  # a real safetensors file
        assert set(f.keys()) == {"user_emb", "item_emb"}
        assert f.metadata()["epoch"] == str(res.best_epoch)
    with safe_open(str(tmp_path / "checkpoints" / ckpts[-1]), framework="pt") as f:
        assert f.metadata()["epoch"] == str(n)
    fresh = build_model("lightgcn", kg, cfg.model_copy(update={"seed": 99}))
    load_state(fresh, best)
    for key, value in res.model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    # the result's embeddings are the best weights propagated over train + valid
    user, item = propagate(fresh, fresh.graph(inference_graph(kg, ring)))
    torch.testing.assert_close(res.user_emb, user)
    torch.testing.assert_close(res.item_emb, item)
    last = build_model("lightgcn", kg, cfg)
    load_state(last, tmp_path / "checkpoints" / ckpts[-1])
    assert not torch.equal(last.user_emb, fresh.user_emb)  # later epochs differ from the best


def test_test_time_graph_has_validation_but_never_test_edges(ring: Split, tmp_path: Path) -> None:
    kg = train_graph(ring)
    g = inference_graph(kg, ring)
    pairs = set(zip(g.ui_user.tolist(), g.ui_item.tolist(), strict=True))
    valid = set(zip(ring.valid.user_idx.tolist(), ring.valid.item_idx.tolist(), strict=True))
    test = set(zip(ring.test.user_idx.tolist(), ring.test.item_idx.tolist(), strict=True))
    train = set(zip(kg.ui_user.tolist(), kg.ui_item.tolist(), strict=True))
    assert valid and valid <= pairs and train <= pairs
    assert not pairs & test
    assert len(g.ui_user) == len(kg.ui_user) + len(ring.valid)
    # validation edges change the test-time embedding of the users who have them
    cfg = GraphTrainConfig(dim=8, layers=2, epochs=1, eval_metric="ndcg@10")
    res = train_graph_model("lightgcn", kg, ring, cfg, EVAL, None, progress=False)
    user_train, _ = propagate(res.model, res.model.graph(kg))
    has_valid = np.unique(ring.valid.user_idx.to_numpy())
    assert not torch.allclose(res.user_emb[has_valid], user_train[has_valid])


def test_save_embeddings(ring: Split, tmp_path: Path) -> None:
    kg = train_graph(ring)
    cfg = GraphTrainConfig(dim=8, layers=1, epochs=1, eval_metric="ndcg@10")
    res = train_graph_model("lightgcn", kg, ring, cfg, EVAL, None, progress=False)
    ds = ring.dataset
    path = save_embeddings(res, tmp_path, user_ids=list(ds.users["user_id"]),
                           item_ids=list(ds.items["item_id"]))
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"user", "item"}
        torch.testing.assert_close(f.get_tensor("item"), res.item_emb)
    info = json.loads((tmp_path / "embeddings.json").read_text())
    assert info["dim"] == 8 and info["model"] == "lightgcn" and info["best_epoch"] == 1
    assert json.loads((tmp_path / "item_ids.json").read_text()) == list(ds.items["item_id"])
    assert len(json.loads((tmp_path / "user_ids.json").read_text())) == ds.n_users
    with pytest.raises(ValueError, match="item_ids"):
        save_embeddings(res, tmp_path, item_ids=["x"])


def test_no_validation_part_trains_all_epochs(ring: Split, tmp_path: Path) -> None:
    kg = train_graph(ring)
    no_valid = Split(ring.dataset, ring.method, ring.train, ring.valid.iloc[:0], ring.test)
    seen: list[int] = []

    def on_epoch(epoch: int, score: Scorer) -> dict[str, float]:
        seen.append(epoch)
        res = evaluate(score, no_valid, "test", EVAL, progress=False)
        return {"test_ndcg@10": res.metrics["ndcg@10"]}

    cfg = GraphTrainConfig(dim=8, layers=1, epochs=3, patience=1, eval_metric="ndcg@10")
    res = train_graph_model("lightgcn", kg, no_valid, cfg, EVAL, tmp_path, progress=False,
                            on_epoch=on_epoch)
    assert seen == [1, 2, 3] and res.best_epoch == 3 and res.best_valid is None
    assert all("test_ndcg@10" in r.extra and r.valid is None for r in res.history)


def test_initial_state_replaces_the_seeded_init(ring: Split) -> None:
    kg = train_graph(ring)
    cfg = GraphTrainConfig(dim=8, layers=1, epochs=1, lr=1e-12, eval_metric="ndcg@10")
    init = {"user_emb": torch.full((ring.n_users, 8), 0.5),
            "item_emb": torch.linspace(-1, 1, ring.n_items * 8).reshape(ring.n_items, 8)}
    res = train_graph_model("lightgcn", kg, ring, cfg, EVAL, None, progress=False,
                            initial_state=init)
    torch.testing.assert_close(res.model.state_dict()["item_emb"], init["item_emb"], atol=1e-6,
                               rtol=0)
