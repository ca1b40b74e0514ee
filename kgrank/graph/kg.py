"""A relation-aware knowledge-graph recommender: LightGCN on interactions plus attentive,
relation-modulated propagation over the knowledge graph.

Built after KGAT (X. Wang, X. He, Y. Cao, M. Liu, T.-S. Chua. *KGAT: Knowledge Graph Attention
Network for Recommendation.* KDD 2019) for the attention over a node's knowledge neighbours, and
KGIN (X. Wang, T. Huang, D. Wang, Y. Yuan, Z. Liu, X. He, T.-S. Chua. *Learning Intents behind
Interactions with Knowledge Graph for Recommendation.* WWW 2021) for relation-modulated messages
``e_r ⊙ e_t`` without feature transforms; the collaborative part is LightGCN's (SIGIR 2020).

Nodes: users ``u`` and KG nodes ``v`` (items first, then entities: categories, brands, attribute
values, external entities). Every forward triple ``(h, r, t)`` also yields the inverse triple
``(t, r + R, h)``, so items reach their categories and categories reach all their items. With
``N_u`` / ``N_i`` the interaction neighbours, ``N^KG(v)`` the knowledge neighbours ``(r, t)``
of ``v`` and ``w = kg_weight``, one layer is::

    e_u^(k+1) = sum_{i in N_u} e_i^(k) / sqrt(|N_u| |N_i|)
    e_i^(k+1) = sum_{u in N_i} e_u^(k) / sqrt(|N_u| |N_i|) + w * sum_{(r,t) in N^KG(i)} pi(i,r,t) e_r ⊙ e_t^(k)
    e_v^(k+1) = sum_{(r,t) in N^KG(v)} pi(v,r,t) e_r ⊙ e_t^(k)         (non-item entities)

    pi(h,r,t)    = beta(h,r) * alpha(h,r,t)
    beta(h,r)    = softmax over the relations r' present at h of  a_r'        (learnable scalars)
    alpha(h,r,t) = softmax over t' in N_r(h) of  (e_h ⊙ e_r) . e_t'          (attention on)
                 = 1 / |N_r(h)|                                              (attention off)

so the knowledge weights of every node sum to 1 over all its neighbours. The two levels keep
relations balanced whatever their neighbour counts (an item's single brand is not drowned by
twenty co-purchased items unless ``a_r`` says so) and the relation weights are learned by
gradient; the neighbour attention ``alpha`` is computed from the ego embeddings ``e^(0)``
without gradient and shared by all layers, as KGAT's attentive Laplacian (refreshed every step
here, so it follows the embeddings and ``e_r`` as they train). Keeping the head's own embedding
out of the relation weights matters for cold items: an item without interactions is trained
only as a negative, and a head-dependent score would learn to look away from its category.
Final embeddings are the mean over layers ``0..K``; ``score(u, i) = <e_u, e_i>``. An item
without any interaction still gets an embedding from its categories, brands, attributes and
related items (and, two hops away, from the items that share them), which is what lets it be
ranked at all. Relation embeddings start at 1 (the message is then the neighbour's embedding)
and learn a per-dimension gate; ``a_r`` start at 0.

Cost: messages are never materialised per edge. Neighbours are grouped by (head, relation),
and as all neighbours of a group share ``e_r``, ``sum_t pi e_r ⊙ e_t = beta e_r ⊙ sum_t alpha
e_t``: per layer one CSR product (groups x nodes, values ``alpha``), one product with
``beta e_r`` per group, and one CSR product that adds groups into their heads. Attention logits
are a sampled dense-dense product (SDDMM) over the fixed pattern, once per step. The CSR
products use int32 indices and a backward pass with the precomputed transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.utils import softmax

from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.lightgcn import (
    INIT_STD,
    csr_tensor,
    index_dtype,
    normalized_adjacency,
    spmm,
)


class SparsePattern:
    """A fixed CSR sparsity pattern of shape ``[n_rows, n_cols]`` and its transpose.

    Entries are ordered by (row, col); ``rows`` / ``cols`` (int64) give each entry's coordinates.
    """

    def __init__(self, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> None:
        n_rows, n_cols = shape
        self.shape = shape
        self.rows, self.cols = rows, cols
        dtype = index_dtype(len(rows), n_rows, n_cols)
        self.crow = _offsets(rows, n_rows).to(dtype)
        self.col = cols.to(dtype)
        self.perm_t = torch.argsort(cols * n_rows + rows)
        self.crow_t = _offsets(cols, n_cols).to(dtype)
        self.col_t = rows[self.perm_t].to(dtype)
        self._ones: dict[torch.dtype, Tensor] = {}

    @property
    def nnz(self) -> int:
        return len(self.rows)

    def csr(self, values: Tensor) -> Tensor:
        """The matrix with these per-entry values."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, size=self.shape,
                                       check_invariants=False)  # valid by construction

    def csr_t(self, values: Tensor) -> Tensor:
        """The transposed matrix (``[n_cols, n_rows]``) with these per-entry values."""
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t],
                                       size=(self.shape[1], self.shape[0]),
                                       check_invariants=False)

    def sddmm(self, a: Tensor, b: Tensor) -> Tensor:
        """Per entry ``(r, c)``: ``<a[r], b[c]>``, i.e. ``a @ b.T`` sampled at the pattern
        (no gradient)."""
        if a.dtype not in self._ones:
            self._ones[a.dtype] = self.csr(torch.ones(self.nnz, dtype=a.dtype, device=a.device))
        out = torch.sparse.sampled_addmm(self._ones[a.dtype], a.contiguous(), b.T.contiguous(),
                                         beta=0.0)
        return out.values()


def _offsets(index: Tensor, n: int) -> Tensor:
    out = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    out[1:] = torch.cumsum(torch.bincount(index, minlength=n), 0)
    return out


@dataclass
class KGGraph:
    """The tensors :class:`KGModel` propagates over (on the model's device).

    One node space for everything: user ``u`` is node ``u``, KG node ``v`` (item or entity) is
    node ``n_users + v``, so a layer is a few sparse products over one table and no slicing.
    ``adj`` is LightGCN's normalized interaction matrix padded to all nodes (entities isolated).

    Knowledge neighbours are grouped by (head, relation): ``nbr`` has one row per distinct
    (head, relation) pair ("group") and one column per node (the tails); ``group_sum`` is the
    one-hot ``[n_nodes, n_groups]`` matrix that adds each group into its head;
    ``group_rel_select`` is the one-hot ``[n_groups, 2R]`` matrix that gathers each group's
    relation embedding (``_t``: transposes, for the backward pass: a CSR product reduces those
    gradients far faster than ``index_add_`` into a few rows).
    Relations ``0..R-1`` are the forward ones, ``R..2R-1`` their inverses. Per group:
    ``group_node`` (node id of the head), ``group_rel``, ``group_item`` (head is an item); per
    neighbour entry: ``uniform`` (``1 / |N_r(h)|``), ``entry_head`` / ``entry_tail`` (KG node
    ids) and ``entry_rel``.
    """

    n_users: int
    n_items: int
    n_kg: int
    adj: Tensor
    nbr: SparsePattern
    group_sum: Tensor
    group_sum_t: Tensor
    group_rel_select: Tensor
    group_rel_select_t: Tensor
    group_node: Tensor
    group_rel: Tensor
    group_item: Tensor
    uniform: Tensor
    entry_head: Tensor
    entry_rel: Tensor
    entry_tail: Tensor

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_kg


def knowledge_graph_tensors(
    kg: KnowledgeGraph, weighted: bool = False, device: torch.device | str = "cpu"
) -> KGGraph:
    """The propagation tensors of ``kg``: interactions, knowledge triples and their inverses.

    Self-loops are dropped and repeated triples merged.
    """
    n_u, n_kg, n_rel = kg.n_users, kg.n_kg_nodes, kg.n_relations
    n_nodes = n_u + n_kg
    h = np.asarray(kg.kg_head, dtype=np.int64)
    r = np.asarray(kg.kg_rel, dtype=np.int64)
    t = np.asarray(kg.kg_tail, dtype=np.int64)
    if len(h) and (min(h.min(), t.min()) < 0 or max(h.max(), t.max()) >= n_kg):
        raise ValueError("knowledge triple node out of range")
    if len(r) and (r.min() < 0 or r.max() >= n_rel):
        raise ValueError("knowledge triple relation out of range")
    keep = h != t
    h, r, t = h[keep], r[keep], t[keep]
    n_rel2 = max(2 * n_rel, 1)
    heads = np.concatenate([h, t])
    rels = np.concatenate([r, r + n_rel])
    tails = np.concatenate([t, h])
    triples = np.unique((heads * n_rel2 + rels) * n_kg + tails)  # sorted by (head, rel, tail)
    hr, tails = np.divmod(triples, n_kg)
    heads, rels = np.divmod(hr, n_rel2)
    group_keys, e_group = np.unique(hr, return_inverse=True)
    e_group = e_group.ravel()
    g_head, g_rel = np.divmod(group_keys, n_rel2)
    n_groups = len(group_keys)
    size = np.bincount(e_group, minlength=n_groups)

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    ones, groups = np.ones(n_groups), np.arange(n_groups)
    return KGGraph(
        n_u, kg.n_items, n_kg,
        adj=normalized_adjacency(kg, weighted, device, n_nodes),
        nbr=SparsePattern(tensor(e_group), tensor(n_u + tails), (n_groups, n_nodes)),
        group_sum=csr_tensor(n_u + g_head, groups, ones, (n_nodes, n_groups), device),
        group_sum_t=csr_tensor(groups, n_u + g_head, ones, (n_groups, n_nodes), device),
        group_rel_select=csr_tensor(groups, g_rel, ones, (n_groups, 2 * n_rel), device),
        group_rel_select_t=csr_tensor(g_rel, groups, ones, (2 * n_rel, n_groups), device),
        group_node=tensor(n_u + g_head),
        group_rel=tensor(g_rel),
        group_item=torch.from_numpy(g_head < kg.n_items).to(device),
        uniform=torch.from_numpy(1.0 / size[e_group]).float().to(device),
        entry_head=tensor(heads),
        entry_rel=tensor(rels),
        entry_tail=tensor(tails),
    )


class KGModel(nn.Module):
    """LightGCN + relation-aware knowledge propagation; see the module docstring."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_entities: int,
        n_relations: int,
        dim: int = 64,
        layers: int = 3,
        attention: bool = True,
        kg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_entities = n_users, n_items, n_entities
        self.n_relations, self.dim, self.layers = n_relations, dim, layers
        self.attention, self.kg_weight = attention, kg_weight
        self.user_emb = nn.Parameter(torch.empty(n_users, dim))
        self.node_emb = nn.Parameter(torch.empty(n_items + n_entities, dim))
        self.rel_emb = nn.Parameter(torch.empty(2 * n_relations, dim))
        self.rel_logit = nn.Parameter(torch.empty(2 * n_relations))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_emb, std=INIT_STD)
        nn.init.normal_(self.node_emb, std=INIT_STD)
        nn.init.ones_(self.rel_emb)
        nn.init.zeros_(self.rel_logit)

    @property
    def n_kg(self) -> int:
        return self.n_items + self.n_entities

    @property
    def device(self) -> torch.device:
        return self.user_emb.device

    @property
    def ego_parameters(self) -> list[nn.Parameter]:
        """The free node embedding tables (users, KG nodes)."""
        return [self.user_emb, self.node_emb]

    def ego_rows(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Ego embeddings ``e^(0)`` of the given users and items, for the L2 term on a batch."""
        return self.user_emb.index_select(0, users), self.node_emb.index_select(0, items)

    def graph(self, kg: KnowledgeGraph, weighted: bool = False) -> KGGraph:
        """Build the propagation tensors of ``kg`` on the model's device."""
        shape = (kg.n_users, kg.n_items, kg.n_entities, kg.n_relations)
        mine = (self.n_users, self.n_items, self.n_entities, self.n_relations)
        if shape != mine:
            raise ValueError(f"graph (users, items, entities, relations) = {shape} does not match "
                             f"the model's {mine}")
        return knowledge_graph_tensors(kg, weighted, self.device)

    def _weights(self, g: KGGraph, z: Tensor, rel: Tensor) -> tuple[Tensor, Tensor]:
        """(beta per group, alpha per neighbour entry); see the module docstring."""
        beta = softmax(self.rel_logit.index_select(0, g.group_rel), g.group_node,
                       num_nodes=g.n_nodes)
        if not self.attention:
            return beta, g.uniform
        with torch.no_grad():  # (e_h ⊙ e_r) . e_t, without gradient (see the module docstring)
            logits = g.nbr.sddmm(z.index_select(0, g.group_node) * rel, z)
            alpha = softmax(logits, g.nbr.rows, num_nodes=g.nbr.shape[0])
        return beta, alpha

    def attention_weights(self, g: KGGraph) -> Tensor:
        """``pi(h, r, t) = beta(h, r) alpha(h, r, t)`` per knowledge entry (heads
        ``g.entry_head``, relations ``g.entry_rel``, tails ``g.entry_tail``), from the ego
        embeddings as in propagation; sums to 1 over each node's knowledge neighbours."""
        rel = spmm(g.group_rel_select, self.rel_emb, g.group_rel_select_t)
        beta, alpha = self._weights(g, torch.cat([self.user_emb, self.node_emb]), rel)
        return beta.index_select(0, g.nbr.rows) * alpha

    def propagate_all(self, g: KGGraph) -> tuple[Tensor, Tensor]:
        """Final (user [n_users, d], KG node [n_items + n_entities, d]) embeddings."""
        out = self.propagate_nodes(g)
        return out[: self.n_users], out[self.n_users :]

    def propagate_nodes(self, g: KGGraph) -> Tensor:
        """Final embeddings of all nodes (users, items, entities), [n_users + n_kg, d]."""
        return self.layer_sum(g) / (self.layers + 1)

    def layer_sum(self, g: KGGraph) -> Tensor:
        """``sum_k z^(k)`` over all nodes (the final embeddings times ``K + 1``)."""
        z = torch.cat([self.user_emb, self.node_emb])
        out = z
        use_kg = g.nbr.nnz > 0 and self.kg_weight > 0
        if use_kg:
            rel = spmm(g.group_rel_select, self.rel_emb, g.group_rel_select_t)
            beta, alpha = self._weights(g, z, rel)
            # Every neighbour in a group shares the relation, so the group's message is
            # beta e_r ⊙ (sum_t alpha e_t); kg_weight scales the knowledge part of items
            # (entities have nothing else). alpha carries no gradient: fixed CSR products.
            kw = torch.where(g.group_item, self.kg_weight, 1.0)
            scale = (beta * kw).unsqueeze(1) * rel
            nbr, nbr_t = g.nbr.csr(alpha), g.nbr.csr_t(alpha)
        for _ in range(self.layers):
            nz = spmm(g.adj, z)
            if use_kg:
                nz = nz + spmm(g.group_sum, spmm(nbr, z, nbr_t) * scale, g.group_sum_t)
            z = nz
            out = out + z
        return out

    def propagate(self, g: KGGraph) -> tuple[Tensor, Tensor]:
        """Final (user [n_users, d], item [n_items, d]) embeddings."""
        user, nodes = self.propagate_all(g)
        return user, nodes[: self.n_items]

    def forward(self, g: KGGraph) -> tuple[Tensor, Tensor]:
        return self.propagate(g)

    @torch.no_grad()
    def score(self, g: KGGraph, users: Tensor) -> Tensor:
        """Scores ``<e_u, e_i>`` of the given users against all items, [B, n_items]."""
        user, item = self.propagate(g)
        return user[users.to(self.device)] @ item.T
