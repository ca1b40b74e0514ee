"""The two-tower fusion network: a multimodal item tower and a user-in-context tower.

Item tower
----------
Item ``i`` has up to three fixed input vectors, each possibly absent: its graph embedding
``x_g`` (the KG model's or LightGCN's final item embedding), its text embedding ``x_t``
(all-MiniLM-L6-v2, 384-d) and its image embedding ``x_v``. Each present modality ``m`` is
projected to the hidden width ``h``::

    p_m = LayerNorm(W_m x_m + b_m)                                      (m in present(i))

and the projections are fused by a gate, a softmax over the PRESENT modalities of a learned
score of each projected vector (absent modalities get weight 0)::

    a_m = v^T tanh(G p_m) + c_m,       alpha = softmax_{m in present(i)}(a_m)
    f_i = sum_m alpha_m p_m            (f_i = n, a learned "no content" vector, if none present)
    e_i = normalize(MLP(f_i))          in R^dim, ||e_i|| = 1

(attention-style modality gating as in gated multimodal units, Arevalo et al., ICLR-W 2017).
During training every present modality of an item is dropped with probability
``modality_dropout``, never all of them (modality dropout, Neverova et al., ModDrop, TPAMI 2016),
so an item without image, text or graph vector still gets a usable embedding.

User-in-context tower
---------------------
A request is a user ``u`` at time ``t`` with context (device, location), an optional query ``q``
and the user's most recent ``history_len`` history items ``j_1..j_L`` (as sets: no positional
index, so events that share a timestamp are interchangeable). With ``b_k`` the log-bucketed gap
``t - t_{j_k}`` (``floor(2 log2 max(gap_seconds, 1))``), the history is pooled by multi-head
attention whose query is the request context (DIN, Zhou et al., KDD 2018, attends with the
candidate item instead, which a two-tower model cannot; unlike SASRec, Kang & McAuley, ICDM 2018,
there is no position embedding, only the time gap)::

    c      = [emb(device), emb(location), time(t), demographics(u), P_g y_u, P_q z_q, [q given]]
    s_hk   = <W_q^h c, W_k^h (e_{j_k} + g_{b_k})> / sqrt(dim / H)        (head h)
    r      = W_o concat_h sum_k softmax_k(s_h0, s_h1..s_hL)_k W_v^h e_{j_k}

where ``y_u`` is the user's graph embedding, ``z_q`` the query's text embedding (same encoder as
the item texts; zero when there is no query), ``time(t)`` the hour / weekday sin and cos, and
slot 0 a learned "null" key and value (an empty history pools to it). Then::

    u = normalize(MLP([r, c, [history not empty]]))                  in R^dim, ||u|| = 1
    score(u, i) = <u, e_i> / temperature

(the item MLP has one GELU hidden layer of width ``h``, the user MLP two).

Absent inputs (no graph, text, image, context, query or behaviour) are removed from the network,
not zero-filled, so leave-one-modality-out variants are separate, smaller networks. The towers
follow the two-tower retrieval models of Covington et al. (YouTube DNN, RecSys 2016) and Yi et
al. (RecSys 2019); see :mod:`kgrank.fusion.train` for the loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ITEM_MODALITIES = ("graph", "text", "image")
"""Item-side modalities, in the order of the gate's inputs."""
GAP_BUCKETS = 64
"""Number of log-gap buckets: ``floor(2 log2(seconds))`` reaches 63 after ~70 years."""
CONTEXT_EMB = 16
"""Width of the device and location embeddings."""
DEMO_EMB = 8
"""Width of each demographic category embedding."""
GATE_HIDDEN = 64
"""Width of the gate's ``G`` (the gate only scores modalities)."""


def gap_bucket(gap_seconds: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``floor(2 log2 max(gap, 1))`` clipped to ``[0, GAP_BUCKETS)``; gaps of 0 and 1 s share 0."""
    gap = torch.as_tensor(gap_seconds).to(torch.float64).clamp(min=1.0)
    return torch.floor(2.0 * torch.log2(gap)).clamp(0, GAP_BUCKETS - 1).to(torch.int64)


@dataclass(frozen=True)
class FusionSpec:
    """The architecture of a :class:`FusionModel`: sizes of every input (0: absent)."""

    n_users: int
    n_items: int
    dim: int
    hidden: int
    temperature: float
    modality_dropout: float
    graph_item_dim: int = 0
    graph_user_dim: int = 0
    text_dim: int = 0
    image_dim: int = 0
    query_dim: int = 0
    context: bool = False
    n_devices: int = 1
    n_locations: int = 1
    demo_numeric: int = 0
    demo_cardinalities: tuple[int, ...] = field(default_factory=tuple)
    behaviour: bool = True

    @property
    def heads(self) -> int:
        """Attention heads: 4 when ``dim`` divides by 4, else 1."""
        return 4 if self.dim % 4 == 0 else 1

    @property
    def item_modalities(self) -> tuple[str, ...]:
        dims = {"graph": self.graph_item_dim, "text": self.text_dim, "image": self.image_dim}
        return tuple(m for m in ITEM_MODALITIES if dims[m] > 0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["demo_cardinalities"] = list(self.demo_cardinalities)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FusionSpec:
        data = dict(data)
        data["demo_cardinalities"] = tuple(int(c) for c in data.get("demo_cardinalities", ()))
        return cls(**data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass
class UserBatch:
    """The user-side inputs of a batch of requests (all tensors on the model's device)."""

    users: torch.Tensor
    """int64 [B]; -1 for an unknown user (no graph embedding, no demographics)."""
    hist_items: torch.Tensor
    """int64 [B, L] history item ids (any value where ``hist_mask`` is False)."""
    hist_mask: torch.Tensor
    """bool [B, L]: the slot holds a history item."""
    hist_gap: torch.Tensor
    """int64 [B, L]: :func:`gap_bucket` of request time minus event time."""
    context: torch.Tensor
    """int64 [B, 2]: ContextVocab (device, location) ids."""
    time: torch.Tensor
    """float32 [B, 4]: :func:`kgrank.features.context.time_features`."""
    query: torch.Tensor
    """float32 [B, query_dim]: query text embedding (zeros when there is no query)."""
    has_query: torch.Tensor
    """bool [B]."""


def _mlp(n_in: int, hidden: int, n_out: int, layers: int = 1) -> nn.Sequential:
    """``layers`` hidden GELU layers of width ``hidden``, then a linear map to ``n_out``."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(n_in, hidden), nn.GELU()]
        n_in = hidden
    return nn.Sequential(*mods, nn.Linear(n_in, n_out))


def _table(values: np.ndarray | None, rows: int, cols: int) -> torch.Tensor:
    if values is None:
        return torch.zeros(rows, cols)
    arr = np.asarray(values, dtype=np.float32)
    if arr.shape != (rows, cols):
        raise ValueError(f"expected an array of shape {(rows, cols)}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("input embeddings contain non-finite values")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _mask(values: np.ndarray | None, rows: int) -> torch.Tensor:
    if values is None:
        return torch.ones(rows, dtype=torch.bool)
    arr = np.asarray(values, dtype=bool)
    if arr.shape != (rows,):
        raise ValueError(f"expected a mask of shape {(rows,)}, got {arr.shape}")
    return torch.from_numpy(arr.copy())


def modality_dropout(
    present: torch.Tensor, prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Drop each True entry of ``present`` [N, M] with probability ``prob``; a row that had a
    present modality keeps at least one (a uniformly chosen present one)."""
    if prob <= 0 or present.shape[1] == 0:
        return present
    u = torch.rand(present.shape, generator=generator, device=present.device)
    keep = present & (u >= prob)
    lost = ~keep.any(1) & present.any(1)
    choice = torch.where(present, torch.rand(present.shape, generator=generator,
                                             device=present.device) + 1.0, 0.0).argmax(1)
    rescue = torch.zeros_like(keep)
    rescue[torch.arange(len(keep), device=keep.device), choice] = True
    return keep | (rescue & lost[:, None])


class FusionModel(nn.Module):
    """Item tower + user-in-context tower; see the module docstring for the formulas.

    Fixed inputs (graph / text / image item embeddings and masks, graph user embeddings,
    demographics) are buffers, so the state dict alone reproduces every score.
    """

    def __init__(
        self,
        spec: FusionSpec,
        graph_item: np.ndarray | None = None,
        graph_user: np.ndarray | None = None,
        text_item: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        image_item: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        demo_numeric: np.ndarray | None = None,
        demo_categorical: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        h, d = spec.hidden, spec.dim
        dims = {"graph": spec.graph_item_dim, "text": spec.text_dim, "image": spec.image_dim}
        values = {"graph": graph_item, "text": text_item, "image": image_item}
        masks = {"graph": None, "text": text_mask, "image": image_mask}
        self.item_modalities = spec.item_modalities
        self.proj = nn.ModuleDict()
        for m in self.item_modalities:
            self.register_buffer(f"{m}_item", _table(values[m], spec.n_items, dims[m]))
            self.register_buffer(f"{m}_mask", _mask(masks[m], spec.n_items))
            self.proj[m] = nn.Sequential(nn.Linear(dims[m], h), nn.LayerNorm(h))
        self.gate = nn.Sequential(nn.Linear(h, GATE_HIDDEN), nn.Tanh(),
                                  nn.Linear(GATE_HIDDEN, 1, bias=False))
        self.gate_bias = nn.Parameter(torch.zeros(max(len(self.item_modalities), 1)))
        self.null_item = nn.Parameter(torch.randn(h) * 0.1)
        self.item_mlp = _mlp(h, h, d)

        # user-in-context tower
        n_ctx = 0
        if spec.context:
            self.device_emb = nn.Embedding(spec.n_devices, CONTEXT_EMB)
            self.location_emb = nn.Embedding(spec.n_locations, CONTEXT_EMB)
            n_ctx += 2 * CONTEXT_EMB + 4
            self.register_buffer("demo_numeric", _table(demo_numeric, spec.n_users,
                                                        spec.demo_numeric))
            cats = spec.demo_cardinalities
            cat = (np.zeros((spec.n_users, len(cats)), np.int64) if demo_categorical is None
                   else np.asarray(demo_categorical, dtype=np.int64))
            if cat.shape != (spec.n_users, len(cats)):
                raise ValueError(f"demographics: categorical shape {cat.shape}, expected "
                                 f"{(spec.n_users, len(cats))}")
            self.register_buffer("demo_categorical", torch.from_numpy(cat.copy()))
            self.demo_emb = nn.ModuleList(nn.Embedding(c, DEMO_EMB) for c in cats)
            n_ctx += spec.demo_numeric + DEMO_EMB * len(cats)
        if spec.graph_user_dim > 0:
            self.register_buffer("graph_user", _table(graph_user, spec.n_users,
                                                      spec.graph_user_dim))
            self.user_proj = nn.Sequential(nn.Linear(spec.graph_user_dim, h), nn.LayerNorm(h))
            n_ctx += h + 1
        if spec.query_dim > 0:
            self.query_proj = nn.Sequential(nn.Linear(spec.query_dim, h), nn.LayerNorm(h))
            n_ctx += h + 1
        n_ctx = max(n_ctx, 1)
        self.n_context = n_ctx
        n_user = n_ctx
        if spec.behaviour:
            heads = spec.heads
            self.gap_emb = nn.Embedding(GAP_BUCKETS, d)
            nn.init.zeros_(self.gap_emb.weight)
            self.att_q = nn.Linear(n_ctx, d)
            self.att_k = nn.Linear(d, d, bias=False)
            self.att_v = nn.Linear(d, d, bias=False)
            self.att_o = nn.Linear(d, d)
            self.null_key = nn.Parameter(torch.zeros(heads, d // heads))
            self.null_value = nn.Parameter(torch.zeros(d))
            n_user += d + 1
        self.user_mlp = _mlp(n_user, h, d, layers=2)

    # ------------------------------------------------------------------ item tower

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def item_tower(
        self, items: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Fused, L2-normalised embeddings [N, dim] of the item ids ``items`` [N]. In training
        mode, modalities are dropped (:func:`modality_dropout`, drawing from ``generator``)."""
        n = len(items)
        if not self.item_modalities:
            fused = self.null_item.expand(n, -1)
            return F.normalize(self.item_mlp(fused), dim=-1)
        proj = torch.stack([self.proj[m](self.get_buffer(f"{m}_item")[items])
                            for m in self.item_modalities], 1)  # [N, M, h]
        present = torch.stack([self.get_buffer(f"{m}_mask")[items]
                               for m in self.item_modalities], 1)  # [N, M]
        if self.training:
            present = modality_dropout(present, self.spec.modality_dropout, generator)
        score = self.gate(proj).squeeze(-1) + self.gate_bias
        some = present.any(1, keepdim=True)
        score = score.masked_fill(~present, -torch.inf).masked_fill(~some, 0.0)
        alpha = torch.softmax(score, dim=1) * present
        fused = (alpha.unsqueeze(-1) * proj).sum(1) + (~some) * self.null_item
        return F.normalize(self.item_mlp(fused), dim=-1)

    def all_items(self, chunk: int = 8192) -> torch.Tensor:
        """Embeddings of the whole catalog [n_items, dim] (eval mode, no gradient)."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                ids = torch.arange(self.spec.n_items, device=self.device)
                return torch.cat([self.item_tower(ids[lo : lo + chunk])
                                  for lo in range(0, len(ids), chunk)])
        finally:
            self.train(was)

    # ------------------------------------------------------------------ user tower

    def context_features(self, batch: UserBatch) -> torch.Tensor:
        """``c`` of the module docstring: [B, n_context]."""
        spec = self.spec
        users = batch.users
        known = users >= 0
        safe = users.clamp(min=0)
        parts: list[torch.Tensor] = []
        if spec.context:
            parts += [self.device_emb(batch.context[:, 0]),
                      self.location_emb(batch.context[:, 1]), batch.time]
            if spec.demo_numeric:
                parts.append(self.get_buffer("demo_numeric")[safe] * known[:, None])
            for j, emb in enumerate(self.demo_emb):
                parts.append(emb(self.get_buffer("demo_categorical")[safe, j] * known))
        if spec.graph_user_dim > 0:
            parts += [self.user_proj(self.get_buffer("graph_user")[safe]) * known[:, None],
                      known[:, None].float()]
        if spec.query_dim > 0:
            has = batch.has_query[:, None]
            parts += [self.query_proj(batch.query) * has, has.float()]
        if not parts:
            return torch.ones(len(users), 1, device=users.device)
        return torch.cat(parts, 1)

    def pool_history(
        self, ctx: torch.Tensor, hist_emb: torch.Tensor, batch: UserBatch
    ) -> torch.Tensor:
        """``r`` of the module docstring: attention over the history set [B, dim]."""
        b, n_hist, d = hist_emb.shape
        heads = self.spec.heads
        dh = d // heads
        q = self.att_q(ctx).view(b, heads, dh)
        keys = self.att_k(hist_emb + self.gap_emb(batch.hist_gap)).view(b, n_hist, heads, dh)
        vals = self.att_v(hist_emb).view(b, n_hist, heads, dh)
        logits = torch.einsum("bhd,blhd->bhl", q, keys) / math.sqrt(dh)
        logits = logits.masked_fill(~batch.hist_mask[:, None, :], -torch.inf)
        null = (q * self.null_key).sum(-1, keepdim=True) / math.sqrt(dh)  # [B, H, 1]
        weights = torch.softmax(torch.cat([null, logits], -1), dim=-1)
        pooled = torch.einsum("bhl,blhd->bhd", weights[..., 1:], vals)
        pooled = pooled + weights[..., :1] * self.null_value.view(heads, dh)
        return self.att_o(pooled.reshape(b, d))

    def user_tower(self, batch: UserBatch, hist_emb: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised user-in-context vectors [B, dim]; ``hist_emb`` [B, L, dim] are the
        item-tower embeddings of ``batch.hist_items`` (None without the behaviour input)."""
        ctx = self.context_features(batch)
        parts = [ctx]
        if self.spec.behaviour:
            if hist_emb is None:
                raise ValueError("this model pools the history: pass hist_emb")
            parts += [self.pool_history(ctx, hist_emb, batch),
                      batch.hist_mask.any(1, keepdim=True).float()]
        return F.normalize(self.user_mlp(torch.cat(parts, 1)), dim=-1)

    def users_with_items(
        self, batch: UserBatch, item_emb: torch.Tensor
    ) -> torch.Tensor:
        """User vectors when the embeddings of all items [n_items, dim] are known already."""
        hist = item_emb[batch.hist_items] if self.spec.behaviour else None
        return self.user_tower(batch, hist)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``<u, e_i> / temperature`` [B, N]."""
        return users @ items.T / self.spec.temperature
