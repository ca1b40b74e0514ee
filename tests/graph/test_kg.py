"""The knowledge-graph model: cold items through KG neighbours, inverse relations, attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kgrank.config import EvalConfig, GraphTrainConfig, SplitConfig
from kgrank.data.dataset import write_dataset
from kgrank.data.split import Split, make_split
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.kg import KGGraph, KGModel, SparsePattern
from kgrank.graph.lightgcn import LightGCN
from kgrank.graph.train import train_graph_model

# Two categories of 6 items; items 5 and 11 never occur in any interaction.
GROUPS = {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10, 11]}
COLD = {0: 5, 1: 11}


def toy(tmp: Path, n_users: int = 40) -> tuple[KnowledgeGraph, Split]:
    """Users of group g buy 4 of the 5 warm items of category g; the KG links every item to its
    category (entity 0 / 1) and to a shared 'store' entity 2."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        group = u % 2
        warm = [i for i in GROUPS[group] if i != COLD[group]]
        for day, item in enumerate(rng.permutation(warm)[:4]):
            rows.append((f"u{u}", f"i{item}", pd.Timestamp("2024-01-01", tz="UTC")
                         + pd.Timedelta(days=day)))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{j}" for j in range(12)]})
    ds = write_dataset(tmp / "toy", items, inter)
    split = make_split(ds, SplitConfig())
    tr = split.train
    item_of = ds.item_index([f"i{j}" for j in range(12)])  # dataset row of item "ij"
    heads = np.concatenate([item_of, item_of])
    rels = np.concatenate([np.zeros(12, np.int64), np.ones(12, np.int64)])
    tails = np.concatenate([12 + np.arange(12) // 6, np.full(12, 12 + 2)])
    kg = KnowledgeGraph(
        ds.n_users, ds.n_items, tr.user_idx.to_numpy(), tr.item_idx.to_numpy(),
        np.ones(len(tr), np.float32), entity_names=["cat0", "cat1", "store"],
        entity_types=np.zeros(3, np.int64), entity_type_names=["category"],
        relation_names=["in_category", "sold_in"], kg_head=heads, kg_rel=rels, kg_tail=tails,
    )
    return kg, split


def _item(split: Split, j: int) -> int:
    return int(split.dataset.item_index([f"i{j}"])[0])


def test_cold_item_gets_embedding_from_kg_neighbours(tmp_path: Path) -> None:
    kg, split = toy(tmp_path)
    cold = _item(split, 5)
    assert cold not in set(kg.ui_item)
    torch.manual_seed(0)
    model = KGModel(kg.n_users, kg.n_items, kg.n_entities, kg.n_relations, dim=8, layers=2)
    g = model.graph(kg)
    _, item = model.propagate(g)
    ego = model.node_emb[cold].detach()
    e = item[cold].detach()
    assert e.norm() > 0
    assert not torch.allclose(e, ego / 3)  # more than the ego term of the layer mean
    # without the knowledge graph the same item would only keep its ego term
    lgcn = LightGCN(kg.n_users, kg.n_items, dim=8, layers=2)
    with torch.no_grad():
        lgcn.item_emb.copy_(model.node_emb[: kg.n_items])
        lgcn.user_emb.copy_(model.user_emb)
    _, plain = lgcn.propagate(lgcn.graph(kg))
    torch.testing.assert_close(plain[cold].detach(), ego / 3)


def test_cold_item_ranks_with_its_category_after_training(tmp_path: Path) -> None:
    kg, split = toy(tmp_path)
    cfg = GraphTrainConfig(dim=16, layers=2, epochs=20, batch_size=64, lr=0.05, reg=1e-4,
                           eval_every=10, eval_metric="ndcg@5")
    res = train_graph_model("kg", kg, split, cfg, EvalConfig(ks=[5], bootstrap=0), None,
                            progress=False)
    assert res.entity_emb is not None and res.entity_emb.shape == (3, 16)
    item = torch.nn.functional.normalize(res.item_emb, dim=1)
    users = split.dataset.user_index([f"u{u}" for u in range(40)])
    for group, cold_j in COLD.items():
        cold = _item(split, cold_j)
        siblings = [_item(split, j) for j in GROUPS[group] if j != cold_j]
        others = [_item(split, j) for j in GROUPS[1 - group]]
        sim_sib = float((item[siblings] @ item[cold]).mean())
        sim_other = float((item[others] @ item[cold]).mean())
        assert sim_sib > sim_other + 0.2, (group, sim_sib, sim_other)
        # users of the cold item's category score it above the other category's cold item
        own = users[group::2]
        other_cold = _item(split, COLD[1 - group])
        scores = res.score(own)
        assert float((scores[:, cold] > scores[:, other_cold]).float().mean()) > 0.9


def test_inverse_relations_and_attention_sums(tmp_path: Path) -> None:
    kg, _ = toy(tmp_path)
    for attention in (True, False):
        torch.manual_seed(0)
        model = KGModel(kg.n_users, kg.n_items, kg.n_entities, kg.n_relations, dim=8,
                        attention=attention)
        g = model.graph(kg)
        R = kg.n_relations
        entries = set(zip(g.entry_head.tolist(), g.entry_rel.tolist(), g.entry_tail.tolist(),
                          strict=True))
        for h, r, t in zip(kg.kg_head, kg.kg_rel, kg.kg_tail, strict=True):
            assert (int(h), int(r), int(t)) in entries
            assert (int(t), int(r) + R, int(h)) in entries  # inverse relation
        assert len(entries) == 2 * len(kg.kg_head)
        pi = model.attention_weights(g).detach()
        assert (pi > 0).all()
        sums = torch.zeros(kg.n_kg_nodes).index_add_(0, g.entry_head, pi)
        torch.testing.assert_close(sums, torch.ones(kg.n_kg_nodes))
        # an item has two relations (category, store), weighted alike at the start
        torch.testing.assert_close(pi[g.entry_head == 0], torch.full((2,), 0.5))
        # the category entity spreads its attention over its 6 items
        cat0 = 12
        assert int((g.entry_head == cat0).sum()) == 6
        if not attention:
            torch.testing.assert_close(pi[g.entry_head == cat0], torch.full((6,), 1 / 6))


def test_attention_follows_similarity_and_relation_weights() -> None:
    kg = KnowledgeGraph(1, 4, np.array([0]), np.array([0]), np.ones(1, np.float32),
                        relation_names=["related", "brand"], kg_head=np.array([0, 0, 0]),
                        kg_rel=np.array([0, 0, 1]), kg_tail=np.array([1, 2, 3]))
    model = KGModel(1, 4, 0, 2, dim=4)
    with torch.no_grad():
        model.node_emb.copy_(torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [-1, -1, 0, 0],
                                           [0, 0, 1, 0]]))
    g = model.graph(kg)
    pi = model.attention_weights(g).detach()
    mine = g.entry_head == 0
    by_tail = dict(zip(g.entry_tail[mine].tolist(), pi[mine].tolist(), strict=True))
    # relation level: 1/2 each; within "related": (e_h ⊙ e_r) . e_t = 2 vs -2
    assert by_tail[3] == pytest.approx(0.5)
    assert by_tail[1] == pytest.approx(0.5 * torch.sigmoid(torch.tensor(4.0)).item(), rel=1e-5)
    with torch.no_grad():
        model.rel_logit[1] = float(np.log(3.0))  # brand 3x as heavy as "related"
    pi = model.attention_weights(g).detach()
    assert dict(zip(g.entry_tail[mine].tolist(), pi[mine].tolist(), strict=True))[3] == \
        pytest.approx(0.75)


def test_kg_weight_zero_is_lightgcn_on_users_and_items(tmp_path: Path) -> None:
    kg, _ = toy(tmp_path)
    torch.manual_seed(0)
    model = KGModel(kg.n_users, kg.n_items, kg.n_entities, kg.n_relations, dim=8, kg_weight=0.0)
    lgcn = LightGCN(kg.n_users, kg.n_items, dim=8)
    with torch.no_grad():
        lgcn.item_emb.copy_(model.node_emb[: kg.n_items])
        lgcn.user_emb.copy_(model.user_emb)
    u1, i1 = model.propagate(model.graph(kg))
    u2, i2 = lgcn.propagate(lgcn.graph(kg))
    torch.testing.assert_close(u1, u2)
    torch.testing.assert_close(i1, i2)


def test_graph_without_triples_is_lightgcn() -> None:
    kg = KnowledgeGraph(3, 4, np.array([0, 1, 2]), np.array([0, 2, 3]), np.ones(3, np.float32))
    torch.manual_seed(0)
    model = KGModel(3, 4, 0, 0, dim=4)
    lgcn = LightGCN(3, 4, dim=4)
    with torch.no_grad():
        lgcn.user_emb.copy_(model.user_emb)
        lgcn.item_emb.copy_(model.node_emb)
    g = model.graph(kg)
    torch.testing.assert_close(model.propagate(g), lgcn.propagate(lgcn.graph(kg)))
    assert model.attention_weights(g).shape == (0,)


def test_sparse_pattern_products() -> None:
    p = SparsePattern(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 3, 0, 2, 3]), (3, 4))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(4, 5, generator=gen)
    v = torch.randn(5, generator=gen)
    dense = torch.zeros(3, 4)
    dense[p.rows, p.cols] = v
    torch.testing.assert_close(p.csr(v).to_dense(), dense)
    torch.testing.assert_close(p.csr_t(v).to_dense(), dense.T)
    torch.testing.assert_close(p.sddmm(a, b), (a @ b.T)[p.rows, p.cols])


def dense_reference(model: KGModel, g: KGGraph) -> torch.Tensor:
    """The module docstring's formulas with dense matrices and per-edge messages."""
    n_u = model.n_users
    pi = model.attention_weights(g)
    kw = torch.where(g.entry_head < model.n_items, model.kg_weight, 1.0)
    heads, tails = n_u + g.entry_head, n_u + g.entry_tail
    rel = model.rel_emb[g.entry_rel]
    adj = g.adj.to_dense()
    z = torch.cat([model.user_emb, model.node_emb])
    out = z
    for _ in range(model.layers):
        msg = (pi * kw).unsqueeze(1) * rel * z[tails]
        z = adj @ z + torch.zeros_like(z).index_add(0, heads, msg)
        out = out + z
    return out / (model.layers + 1)


@pytest.mark.parametrize("attention", [True, False])
def test_propagation_and_gradients_match_dense_reference(tmp_path: Path, attention: bool) -> None:
    kg, _ = toy(tmp_path)
    torch.manual_seed(0)
    model = KGModel(kg.n_users, kg.n_items, kg.n_entities, kg.n_relations, dim=6, layers=3,
                    attention=attention, kg_weight=0.7)
    with torch.no_grad():  # move away from the symmetric starting point
        model.rel_emb.add_(0.3 * torch.randn_like(model.rel_emb))
        model.rel_logit.add_(torch.randn_like(model.rel_logit))
        model.node_emb.mul_(10)
    g = model.graph(kg)
    weight = torch.randn(kg.n_users + kg.n_kg_nodes, 6)
    grads = []
    for fn in (model.propagate_nodes, lambda g: dense_reference(model, g)):
        model.zero_grad()
        out = fn(g)
        (out * weight).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}))
    (out_a, grad_a), (out_b, grad_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert set(grad_a) == set(grad_b) == {"user_emb", "node_emb", "rel_emb", "rel_logit"}
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-4, atol=1e-5)


def test_graph_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    kg, _ = toy(tmp_path)
    model = KGModel(kg.n_users, kg.n_items, kg.n_entities + 1, kg.n_relations)
    with pytest.raises(ValueError, match="does not match"):
        model.graph(kg)
