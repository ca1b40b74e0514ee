"""The LightGBM feature table: one row per (request, candidate item), grouped by request.

Columns and their families (the families are what explanations and ablations are reported by):

========================  =========  =========================================================
column                    family     meaning
========================  =========  =========================================================
``score_<s>``             by source  candidate source ``s``'s score (fusion, kg, lightgcn,
``rank_<s>``                         transition, itemknn, popularity, query; text / image
                                     when they propose candidates, else their score is
                                     ``<m>_profile_sim``); rank is the 0-based rank in
                                     ``s``'s top-N (N when absent)
``<m>_profile_sim``       m          cos(recency-weighted history profile, item) in modality
``<m>_last_sim``          m          cos(mean of the latest timestamp group, item)
                                     (m = text, image, graph:<model>)
``query_text_sim``        query      cos(query, item text) in the text encoder's space
``query_image_sim``       query      cos(query, item photo) in the image model's joint space
``query_overlap``         query      share of the query's tokens found in the item's text
``has_query``             query      1 when the request has a query
``item_has_<m>``          m          the item has a text / image embedding
``<m>_cluster_share``     m          history share in the item's k-means cluster of modality
                                     m (see :mod:`kgrank.features.clusters`)
``hour_*`` / ``weekday_*``  context  cyclic time of the request
``device`` / ``location``   context  category ids (0 = unknown)
``user_<column>``         context    demographics of the requesting user
behaviour features        behaviour  see :mod:`kgrank.features.behaviour` (some are context)
========================  =========  =========================================================

Everything is computed from the request, its history (events up to the request time) and
artifacts fitted on the part's history; never from the target.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from kgrank.features.clusters import cluster_shares, share_at
from kgrank.features.context import ContextVocab, Demographics, time_features
from kgrank.features.history import RequestHistory
from kgrank.features.requests import Requests

SOURCE_FAMILY = {
    "fusion": "fusion",
    "kg": "graph",
    "lightgcn": "graph",
    "transition": "behaviour",
    "itemknn": "behaviour",
    "popularity": "behaviour",
    "text": "text",
    "image": "image",
    "query": "query",
}
"""Family of each candidate source's score and rank columns."""

MODALITY_FAMILIES = ("graph", "text", "image", "behaviour", "context", "query")
"""Families a leave-one-modality-out ablation can remove."""

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str | None) -> list[str]:
    """Lower-case alphanumeric tokens."""
    return _TOKEN.findall(text.lower()) if isinstance(text, str) else []


@dataclass
class TokenIndex:
    """Binary item x token matrix for lexical query matching."""

    vocab: dict[str, int]
    item_tokens: sp.csr_matrix  # [n_items, V] binary

    @classmethod
    def build(cls, texts: list[str]) -> TokenIndex:
        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, text in enumerate(texts):
            for tok in set(tokenize(text)):
                rows.append(i)
                cols.append(vocab.setdefault(tok, len(vocab)))
        mat = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                            shape=(len(texts), max(1, len(vocab))))
        return cls(vocab, mat)

    def overlap(self, queries: np.ndarray) -> sp.csr_matrix:
        """``[R, n_items]``: share of each query's distinct tokens found in each item's text
        (tokens outside the catalog vocabulary count in the denominator)."""
        rows, cols, vals = [], [], []
        for r, q in enumerate(queries):
            toks = set(tokenize(q))
            for t in toks:
                if t in self.vocab:
                    rows.append(r)
                    cols.append(self.vocab[t])
                    vals.append(1.0 / len(toks))
        qmat = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)),
                             shape=(len(queries), self.item_tokens.shape[1]))
        return (qmat @ self._item_tokens_t).tocsr()

    @functools.cached_property
    def _item_tokens_t(self) -> sp.csr_matrix:
        """``item_tokens.T`` as CSR: what the product converted it to on every call (kept: on
        the demo a serving batch with a query spent ~0.3 ms converting it)."""
        return self.item_tokens.T.tocsr()


def item_tokens_text(texts: Sequence[str], items: pd.DataFrame, attributes: Sequence[str]
                     ) -> list[str]:
    """Each item's text followed by its values of the ``attributes`` columns (what a query is
    matched against: a shopper may ask for "linen" although the title does not say it)."""
    if not attributes:
        return list(texts)
    if len(texts) != len(items):
        raise ValueError(f"{len(texts)} item texts for {len(items)} items")
    values = [[v if isinstance(v, str) else "" for v in items[c].tolist()] for c in attributes]
    return [" ".join(w for w in (t, *(col[i] for col in values)) if w) for i, t in enumerate(texts)]


def present_rows(emb: np.ndarray) -> np.ndarray:
    """Whether each row of an embedding table is non-zero (the item has that modality)."""
    return np.asarray(np.abs(emb).sum(-1) > 0)


SIM_ROWS = 512
"""Candidate rows gathered at once for the similarity products (``512 x d`` floats stay in cache
while they are multiplied)."""


def _similarities(emb: np.ndarray, items: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    """``out[b, j] = emb[items[b, j]] @ vecs[b]`` (``vecs [B, d, m]``) as float32 ``[B, C, m]``,
    a few hundred candidate rows at a time: gathering all ``[B, C, d]`` rows first and then
    reading them again doubled the memory traffic. Each request's products are its own, so a
    request's similarities do not depend on the rest of its batch."""
    b, c = items.shape
    out = np.empty((b, c, vecs.shape[2]), dtype=np.float32)
    for r in range(b):  # fixed chunks per request: the same products whatever the batch
        for lo in range(0, c, SIM_ROWS):
            out[r, lo : lo + SIM_ROWS] = emb[items[r, lo : lo + SIM_ROWS]] @ vecs[r]
    return out


def _normalize_rows(mat: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return np.divide(mat, norms, out=np.zeros_like(mat), where=norms > 0)


@dataclass
class PartFeatures:
    """Request-level inputs of one part, fitted on that part's history."""

    requests: Requests
    history: RequestHistory
    n_items: int
    embeddings: Mapping[str, tuple[np.ndarray, str]] = field(default_factory=dict)
    """name -> (item embeddings [n_items, d], L2-normalised, zero rows where missing; family)."""
    query_emb: Mapping[str, np.ndarray] = field(default_factory=dict)
    """"text" / "image" -> query embeddings [R, d] (zero rows without a query)."""
    tokens: TokenIndex | None = None
    vocab: ContextVocab | None = None
    demographics: Demographics | None = None
    behaviour: object | None = None
    """A fitted :class:`kgrank.features.behaviour.BehaviourFeatures` (``transform``)."""
    behaviour_families: Mapping[str, str] = field(default_factory=dict)
    half_life: float = 2.0
    history_len: int = 20
    clusters: Mapping[str, np.ndarray] = field(default_factory=dict)
    """name (a key of ``embeddings``) -> k-means cluster of each item (-1: none)."""
    present: Mapping[str, np.ndarray] = field(default_factory=dict)
    """name -> whether each item has an embedding (a non-zero row), as :func:`present_rows`
    gives it; computed here for names it lacks (callers that build many instances over the
    same embeddings pass it, computed once)."""
    _profiles: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, init=False)
    _shares: dict[str, np.ndarray] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        weights = self.history.matrix(self.n_items, self.half_life, self.history_len)
        last = self.history.last_group(self.n_items)
        for name, (emb, _) in self.embeddings.items():
            self._profiles[name] = (_normalize_rows(np.asarray(weights @ emb, np.float32)),
                                    _normalize_rows(np.asarray(last @ emb, np.float32)))
        for name, labels in self.clusters.items():
            self._shares[name] = cluster_shares(weights, labels)

    def _present(self, name: str) -> np.ndarray:
        if name not in self.present:
            self.present = {**self.present, name: present_rows(self.embeddings[name][0])}
        return self.present[name]

    def profile_scores(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Full-catalog cos(profile, item) of modality ``name`` for request rows [B, n_items]."""
        emb = self.embeddings[name][0]
        return torch.from_numpy(self._profiles[name][0][rows] @ emb.T)

    def query_scores(self, rows: np.ndarray) -> torch.Tensor:
        """Full-catalog cos(query, item text); -inf for requests without a query (so that a
        candidate source built on it proposes nothing for them)."""
        emb = self.embeddings["text"][0]
        has_np = self.requests.has_query[rows]
        if not has_np.any():  # the same all -inf answer without the [B, n_items] product
            return torch.full((len(has_np), emb.shape[0]), -torch.inf, dtype=torch.float32)
        out = torch.from_numpy(self.query_emb["text"][rows] @ emb.T)
        has = torch.from_numpy(has_np)
        return out.masked_fill(~has[:, None], -torch.inf)

    def build(
        self,
        rows: np.ndarray,
        items: np.ndarray,
        source_scores: Mapping[str, np.ndarray],
        source_ranks: Mapping[str, np.ndarray],
        extra: Mapping[str, tuple[np.ndarray, str]] | None = None,
    ) -> tuple[np.ndarray, list[str], dict[str, str]]:
        """Feature matrix of request ``rows`` x candidates ``items [B, C]`` (flattened row-major
        to ``[B*C, F]``), the column names and each column's family.

        ``source_scores`` / ``source_ranks`` hold ``[B, C]`` arrays per candidate source;
        ``extra`` further ``[B, C]`` columns with their family (e.g. fusion-variant scores).
        """
        b, c = items.shape
        safe = np.maximum(items, 0)
        cols: dict[str, np.ndarray] = {}
        fam: dict[str, str] = {}

        def put(name: str, value: np.ndarray, family: str) -> None:
            arr = np.asarray(value, dtype=np.float32)
            cols[name] = np.broadcast_to(arr.reshape(b, -1) if arr.ndim else arr, (b, c))
            fam[name] = family

        for s, val in source_scores.items():
            put(f"score_{s}", val, SOURCE_FAMILY.get(s, s))
            if s in source_ranks:
                put(f"rank_{s}", source_ranks[s], SOURCE_FAMILY.get(s, s))
        query_sims: dict[str, np.ndarray] = {}
        for name, (emb, family) in self.embeddings.items():
            prof, last = self._profiles[name]
            vecs = [prof[rows], last[rows]]
            if name in self.query_emb:
                vecs.append(self.query_emb[name][rows])
            sims = _similarities(emb, safe, np.stack(vecs, axis=2))  # [B, C, len(vecs)]
            put(f"{name}_profile_sim", sims[..., 0], family)
            put(f"{name}_last_sim", sims[..., 1], family)
            if name in self.query_emb:
                query_sims[name] = sims[..., 2]
            if family in ("text", "image"):
                put(f"item_has_{family}", self._present(name)[safe], family)
            if name in self._shares:
                put(f"{name}_cluster_share",
                    share_at(self._shares[name], self.clusters[name], rows, items), family)
        has_query = self.requests.has_query[rows]
        if self.query_emb:
            put("has_query", has_query[:, None], "query")
        for space in self.query_emb:  # a query space is an embedding space (computed above)
            put(f"query_{space}_sim", np.where(has_query[:, None], query_sims[space], 0.0),
                "query")
        if self.tokens is not None and has_query.any():
            ov = self.tokens.overlap(self.requests.query[rows])
            put("query_overlap", np.take_along_axis(ov.toarray(), safe, 1), "query")
        elif self.tokens is not None:
            put("query_overlap", np.zeros((b, 1)), "query")
        tf = time_features(self.requests.timestamp[rows])
        for j, name in enumerate(("hour_sin", "hour_cos", "weekday_sin", "weekday_cos")):
            put(name, tf[:, j : j + 1], "context")
        if self.vocab is not None and (self.vocab.devices or self.vocab.locations):
            ids = self.vocab.ids(self.requests.take(rows))
            if self.vocab.devices:
                put("device", ids[:, 0:1], "context")
            if self.vocab.locations:
                put("location", ids[:, 1:2], "context")
        if self.demographics is not None:
            users = np.maximum(self.requests.user_idx[rows], 0)
            known = (self.requests.user_idx[rows] >= 0)[:, None]
            d = self.demographics
            for j, name in enumerate(d.numeric_names):
                put(f"user_{name}", np.where(known, d.numeric[users, j : j + 1], 0.0), "context")
            for j, name in enumerate(d.categorical_names):
                put(f"user_{name}", np.where(known, d.categorical[users, j : j + 1], 0), "context")
        if self.behaviour is not None:
            feats = self.behaviour.transform(self.requests.take(rows), items)  # type: ignore[attr-defined]
            for name, value in feats.items():
                put(name, value, self.behaviour_families.get(name, "behaviour"))
        for name, (value, family) in (extra or {}).items():
            put(name, value, family)
        names = list(cols)
        # filled feature-major (each column one contiguous, broadcasting write), then one
        # transposing copy: a row-major fill writes every column with a stride
        xt = np.empty((len(names), b, c), dtype=np.float32)
        for j, name in enumerate(names):
            xt[j] = cols[name]
        return np.ascontiguousarray(xt.reshape(len(names), b * c).T), names, fam
