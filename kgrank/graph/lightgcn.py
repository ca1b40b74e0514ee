"""LightGCN: linear, normalized propagation over the user-item bipartite graph.

X. He, K. Deng, X. Wang, Y. Li, Y. Zhang, M. Wang. *LightGCN: Simplifying and Powering Graph
Convolution Network for Recommendation.* SIGIR 2020.

With ``E^(0)`` the ego (free) embeddings of users and items stacked into one
``(n_users + n_items) x d`` matrix and ``A`` the symmetric adjacency of the training interactions
(``A[u, n_users + i] = A[n_users + i, u] = 1``, or the edge weight when ``weighted``)::

    E^(k+1) = D^-1/2 A D^-1/2 E^(k)          (D: diagonal degree matrix of A, 0^-1/2 := 0)
    E       = sum_{k=0..K} alpha_k E^(k),     alpha_k = 1 / (K + 1)
    score(u, i) = <e_u, e_i>

No feature transformation, no non-linearity, no self-loop. The normalized adjacency is built once
per graph as a CSR tensor with int32 indices; one layer is one sparse-dense product (on CPU
ATen's native CSR kernel). Because the matrix is symmetric, the backward pass reuses it
(``grad = A_hat @ grad_out``) instead of letting autograd transpose a CSR tensor at every step. Ego embeddings are initialised ``N(0, 0.1^2)`` as in the
authors' PyTorch code (gusye1234/LightGCN-PyTorch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kgrank.graph.graph import KnowledgeGraph

INIT_STD = 0.1

# torch warns once per process that CSR support is "beta"; the operations used here are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def csr_tensor(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int],
    device: torch.device | str = "cpu",
) -> Tensor:
    """A float32 CSR tensor from COO arrays; duplicate (row, col) entries are summed."""
    n_rows, n_cols = shape
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    keys = rows * n_cols + cols
    uniq, inverse = np.unique(keys, return_inverse=True)
    vals = np.bincount(inverse.ravel(), weights=np.asarray(values, dtype=np.float64),
                       minlength=len(uniq))
    r, c = np.divmod(uniq, n_cols)
    crow = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=crow[1:])
    dtype = index_dtype(len(uniq), *shape)
    return torch.sparse_csr_tensor(
        torch.from_numpy(crow).to(device, dtype), torch.from_numpy(c).to(device, dtype),
        torch.from_numpy(vals.astype(np.float32)).to(device), size=shape, check_invariants=True,
    )


def index_dtype(*sizes: int) -> torch.dtype:
    """int32 CSR indices where they fit: MKL / cuSPARSE then skip an index conversion per
    product (about 2.5x faster on CPU); int64 otherwise."""
    return torch.int32 if max(sizes, default=0) < 2**31 - 1 else torch.int64


def normalized_adjacency(
    kg: KnowledgeGraph, weighted: bool = False, device: torch.device | str = "cpu",
    n_nodes: int | None = None,
) -> Tensor:
    """``D^-1/2 A D^-1/2`` of the symmetric user-item graph as a CSR tensor.

    Node ``u < n_users`` is user ``u``, node ``n_users + i`` is item ``i``; ``n_nodes`` pads the
    matrix with isolated nodes after the items (default ``n_users + n_items``). Duplicate
    user-item pairs are merged: to one edge of value 1 when unweighted, to the sum of their
    ``ui_weight`` when ``weighted``. Isolated nodes get an all-zero row.
    """
    n_u, n_i = kg.n_users, kg.n_items
    n = n_u + n_i if n_nodes is None else n_nodes
    if n < n_u + n_i:
        raise ValueError(f"n_nodes={n} < n_users + n_items")
    user = np.asarray(kg.ui_user, dtype=np.int64)
    item = np.asarray(kg.ui_item, dtype=np.int64)
    if weighted:
        keys, inverse = np.unique(user * n_i + item, return_inverse=True)
        w = np.bincount(inverse.ravel(), weights=np.asarray(kg.ui_weight, dtype=np.float64),
                        minlength=len(keys))
    else:
        keys = np.unique(user * n_i + item)
        w = np.ones(len(keys), dtype=np.float64)
    if (w < 0).any():
        raise ValueError("negative user-item edge weight in the graph")
    u, i = np.divmod(keys, n_i)
    rows = np.concatenate([u, n_u + i])
    cols = np.concatenate([n_u + i, u])
    vals = np.concatenate([w, w])
    deg = np.bincount(rows, weights=vals, minlength=n)
    with np.errstate(divide="ignore"):
        dinv = np.where(deg > 0, 1.0 / np.sqrt(deg), 0.0)
    return csr_tensor(rows, cols, vals * dinv[rows] * dinv[cols], (n, n), device)


def csr_mm(a: Tensor, x: Tensor) -> Tensor:
    """CSR times dense, no autograd. On CPU, ATen's native row-parallel CSR kernel
    (``reduce="sum"``, the path PyG uses without torch-sparse) skips MKL's output copies;
    elsewhere the vendor kernel (cuSPARSE)."""
    if x.device.type == "cpu":
        return torch.sparse.mm(a, x.contiguous(), reduce="sum")
    return a @ x


class _FixedSpMM(torch.autograd.Function):
    """``a @ x`` for a constant sparse ``a``; the backward uses the given ``a_t`` (= a^T)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, a_t: Tensor) -> Tensor:
        ctx.a_t = a_t
        return csr_mm(a, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        return csr_mm(ctx.a_t, grad), None, None


def spmm(a: Tensor, x: Tensor, a_t: Tensor | None = None) -> Tensor:
    """Sparse (constant) times dense, differentiable in ``x``; ``a_t=None`` means ``a`` is
    symmetric."""
    return _FixedSpMM.apply(x, a, a if a_t is None else a_t)


@dataclass
class LightGCNGraph:
    """The tensors LightGCN propagates over (on the model's device)."""

    n_users: int
    n_items: int
    adj: Tensor  # CSR [(n_users + n_items)^2], symmetric normalized


class LightGCN(nn.Module):
    """LightGCN with ego embeddings for users and items; see the module docstring."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.n_users, self.n_items, self.dim, self.layers = n_users, n_items, dim, layers
        self.user_emb = nn.Parameter(torch.empty(n_users, dim))
        self.item_emb = nn.Parameter(torch.empty(n_items, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_emb, std=INIT_STD)
        nn.init.normal_(self.item_emb, std=INIT_STD)

    @property
    def device(self) -> torch.device:
        return self.user_emb.device

    @property
    def ego_parameters(self) -> list[nn.Parameter]:
        """The free embedding tables (the only parameters)."""
        return [self.user_emb, self.item_emb]

    def ego_rows(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Ego embeddings ``E^(0)`` of the given users and items, for the L2 term on a batch."""
        return self.user_emb.index_select(0, users), self.item_emb.index_select(0, items)

    def graph(self, kg: KnowledgeGraph, weighted: bool = False) -> LightGCNGraph:
        """Build the normalized adjacency of ``kg``'s interactions on the model's device."""
        if (kg.n_users, kg.n_items) != (self.n_users, self.n_items):
            raise ValueError(f"graph has {kg.n_users} users / {kg.n_items} items, model "
                             f"{self.n_users} / {self.n_items}")
        return LightGCNGraph(kg.n_users, kg.n_items,
                             normalized_adjacency(kg, weighted, self.device))

    def propagate(self, g: LightGCNGraph) -> tuple[Tensor, Tensor]:
        """Final (user [n_users, d], item [n_items, d]) embeddings: the mean over layers 0..K."""
        out = self.propagate_nodes(g)
        return out[: self.n_users], out[self.n_users :]

    def propagate_nodes(self, g: LightGCNGraph) -> Tensor:
        """Final embeddings of all nodes, users then items, [n_users + n_items, d]."""
        return self.layer_sum(g) / (self.layers + 1)

    def layer_sum(self, g: LightGCNGraph) -> Tensor:
        """``sum_k E^(k)`` (the final embeddings times ``K + 1``; the training loss divides only
        the rows it uses)."""
        x = torch.cat([self.user_emb, self.item_emb])
        out = x
        for _ in range(self.layers):
            x = spmm(g.adj, x)
            out = out + x
        return out

    def layer_embeddings(self, g: LightGCNGraph) -> list[Tensor]:
        """``E^(0) .. E^(K)`` stacked users-then-items (for inspection and tests)."""
        xs = [torch.cat([self.user_emb, self.item_emb])]
        for _ in range(self.layers):
            xs.append(spmm(g.adj, xs[-1]))
        return xs

    def forward(self, g: LightGCNGraph) -> tuple[Tensor, Tensor]:
        return self.propagate(g)

    @torch.no_grad()
    def score(self, g: LightGCNGraph, users: Tensor) -> Tensor:
        """Scores ``<e_u, e_i>`` of the given users against all items, [B, n_items]."""
        user, item = self.propagate(g)
        return user[users.to(self.device)] @ item.T
