"""The request path: an export -> ranked items with per-family explanations.

:class:`Searcher` builds the ranking stage's own objects from the export (the same
:class:`~kgrank.ranking.stage.RankingStage`, candidate generation and feature table as ``kgrank
run``; nothing re-implemented) with serving-time stand-ins for the trained models:

* graph models: the exported test-time embeddings (:class:`StoredGraph`);
* fusion: the ONNX user tower run by onnxruntime over the same user-tower inputs
  (:class:`OnnxFusion`), the exported fused item embeddings;
* baselines and behaviour features: refitted once at start-up on the exported dataset's
  test-time history (deterministic, the ranking stage's own code), then kept;
* query text: the run's text encoder behind an LRU cache.

A request is one row of :class:`~kgrank.features.requests.Requests` scored against the "test"
history; an unknown user is a cold-start request (``user_idx`` -1: no per-user sources, the
fusion tower from context + query). Nothing here imports training code (``kgrank.*.train``,
Ray, optimizers).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from kgrank.data.split import Part, Split, make_split
from kgrank.export.loader import Export
from kgrank.export.onnx import batch_arrays
from kgrank.features.context import ContextVocab
from kgrank.features.requests import Requests
from kgrank.fusion.inputs import EventIndex, QueryCache, request_features
from kgrank.ranking.ltr import top_reasons
from kgrank.ranking.stage import FULL, RankingInputs, RankingStage

log = logging.getLogger("kgrank")

PART: Part = "test"
"""Requests are scored against the test-time history (training + validation events)."""


class StoredGraph:
    """A graph model's exported (user, item) embeddings, as ``GraphModelResult.embeddings``."""

    def __init__(self, user: np.ndarray, item: np.ndarray) -> None:
        self.user, self.item = torch.from_numpy(np.array(user)), torch.from_numpy(np.array(item))

    def embeddings(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user, self.item


class OnnxFusion:
    """The fusion model at serving time: ``item_emb()`` from the export, ``user_vectors`` by the
    ONNX user tower over the user-tower inputs of :mod:`kgrank.fusion.inputs`."""

    def __init__(self, export: Export, encode_query: Callable[[Sequence[str | None]], np.ndarray]
                 | None, threads: int = 1) -> None:
        meta = export.fusion_meta()
        self.session = export.onnx_session("user", threads)
        self._items = export.embeddings("fusion", "items")[1]
        self.vocab = ContextVocab.from_json(meta["vocab"])
        self.history_len = int(meta["config"]["history_len"])
        self.queries = QueryCache(encode_query, int(meta["spec"]["query_dim"]))
        if meta["queries"]:
            from safetensors.numpy import load_file

            self.queries.add(meta["queries"],
                             load_file(str(export.path("fusion_queries")))["queries"])
        self._base = (list(self.queries.texts), self.queries.vectors.copy())
        self.max_new_queries = 4096
        """The run's cached query vectors are kept; at most this many new ones on top."""
        self._index: tuple[int, EventIndex] | None = None

    def item_emb(self) -> np.ndarray:
        return self._items

    def _events(self, history: pd.DataFrame) -> EventIndex:
        if self._index is None or self._index[0] != id(history):
            self._index = (id(history), EventIndex(history))
        return self._index[1]

    def user_vectors(self, requests: Requests, history: pd.DataFrame, chunk: int = 4096
                     ) -> np.ndarray:
        if len(self.queries.texts) > len(self._base[0]) + self.max_new_queries:
            fresh = QueryCache(self.queries.encode, self.queries.dim)  # bounded memory
            if self._base[0]:
                fresh.add(*self._base)
            self.queries = fresh
        feats = request_features(requests, self._events(history), self.vocab, self.queries,
                                 self.history_len, strict=False)
        out = [np.zeros((0, self._items.shape[1]), np.float32)]
        for lo in range(0, len(feats), chunk):
            rows = np.arange(lo, min(lo + chunk, len(feats)))
            batch = feats.batch(rows, torch.device("cpu"))
            out.append(self.session.run(None, batch_arrays(batch))[0])
        return np.concatenate(out)


class LRUEncoder:
    """``texts -> [n, d]`` through an LRU cache of ``size`` distinct texts; the seconds spent
    encoding are added to :attr:`seconds`."""

    def __init__(self, encode: Callable[[Sequence[str | None]], np.ndarray], size: int = 4096
                 ) -> None:
        self.encode, self.size = encode, size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.seconds = 0.0
        self.hits = self.misses = 0

    def __call__(self, texts: Sequence[str | None]) -> np.ndarray:
        t0 = time.perf_counter()
        keys = [t or "" for t in texts]
        new = sorted({k for k in keys if k not in self.cache})
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            for k, v in zip(new, np.asarray(self.encode(new), np.float32), strict=True):
                self.cache[k] = v
        out = np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        self.seconds += time.perf_counter() - t0
        return out


@dataclass
class Context:
    """Request context: time (seconds since the epoch, UTC), device and location names."""

    time: int | None = None
    device: str | None = None
    location: str | None = None


@dataclass
class Filters:
    """Post-ranking filters on candidate items."""

    category: str | None = None
    """Keep items with a category path containing this text (case-insensitive)."""
    brand: str | None = None
    min_price: float | None = None
    max_price: float | None = None


@dataclass
class Hit:
    item_id: str
    score: float
    title: str | None
    image: str | None
    price: float | None
    why: dict[str, float]
    reasons: list[str]


@dataclass
class SearchResult:
    hits: list[Hit]
    user_known: bool
    n_candidates: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step: query_embed, candidates (ANN + source scores), features, ltr."""


def _baselines(export: Export, cfg: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The baselines the ranking stage refits, with the run's tuned parameters."""
    from kgrank.pipeline import _ranking_baselines

    tuned = [SimpleNamespace(name=n, params=p) for n, p in export.tuned_params().items()]
    return _ranking_baselines(cfg, tuned)  # type: ignore[arg-type]


class Searcher:
    """Ranks items for search / recommendation requests from an export."""

    def __init__(self, export: Export, candidates: int | None = None, threads: int = 1,
                 query_cache: int = 4096, text_encoder: Any | None = None) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        self.export = export
        cfg = export.config
        if candidates is not None:
            cfg = cfg.model_copy(update={"ranking": cfg.ranking.model_copy(
                update={"candidates": candidates})})
        self.cfg = cfg
        self.dataset = export.dataset
        self.split: Split = make_split(self.dataset, cfg.data.split)
        self.item_ids = [str(i) for i in self.dataset.items["item_id"]]
        self.item_row = {i: r for r, i in enumerate(self.item_ids)}
        self.user_row = {str(u): r for r, u in enumerate(self.dataset.users["user_id"])}
        stages = export.stages
        self.query_text: LRUEncoder | None = None
        self.query_image: LRUEncoder | None = None
        if "text" in stages:
            if text_encoder is None:
                from kgrank.encoders.stage import build_text_encoder

                text_encoder = build_text_encoder(cfg.encoders.text)
            self.query_text = LRUEncoder(text_encoder.encode, query_cache)
        if "image" in stages:
            from kgrank.encoders.stage import build_image_encoder

            aligned = (export.path("image_aligned") if "image_aligned" in export.manifest.files
                       else None)
            self.query_image = LRUEncoder(build_image_encoder(cfg.encoders.image,
                                                              aligned).encode_text, query_cache)
        graph = {s.removeprefix("graph_"): StoredGraph(export.embeddings(s, "users")[1],
                                                      export.embeddings(s, "items")[1])
                 for s in stages if s.startswith("graph_")}
        from kgrank.pipeline import item_texts

        inputs = RankingInputs(
            baselines=_baselines(export, cfg), graph=graph,
            text=export.embeddings("text")[1] if "text" in stages else None,
            image=export.embeddings("image")[1] if "image" in stages else None,
            encode_query_text=self.query_text, encode_query_image=self.query_image,
            item_texts=item_texts(self.dataset),
            fusion=OnnxFusion(export, self.query_text, threads),
        )
        self.stage = RankingStage(self.dataset, self.split, cfg, inputs, progress=False)
        self.stage.keep_fitted = True
        self.ltr = export.ltr_model()
        self.index = export.faiss_index()
        self.fused = export.embeddings("fusion", "items")[1]
        items = self.dataset.items
        self.titles = _strings(items, "title")
        self.images = _strings(items, "image")
        self.brands = _strings(items, "brand")
        self.prices = items["price"].tolist() if "price" in items else [None] * len(items)
        self.categories = ([" | ".join(c) if c is not None else "" for c in items["categories"]]
                           if "categories" in items else [""] * len(items))
        self.history = self.stage._fitted(PART, "history", lambda: self.split.history(PART))
        self.t_end = int(self.history["timestamp"].max().timestamp()) if len(self.history) else 0
        self._columns: list[int] | None = None
        self.warm()
        log.info("searcher ready in %.1fs", time.perf_counter() - t0)

    # ----------------------------------------------------------------------------------- vocab

    @property
    def devices(self) -> list[str]:
        return list(self.stage.vocab.devices)

    @property
    def locations(self) -> list[str]:
        return list(self.stage.vocab.locations)

    def warm(self) -> None:
        """Fit everything the first request would (history models, behaviour features)."""
        self.search(None, None, Context(), k=1)

    def price(self, item: int) -> float | None:
        return _num(self.prices[item])

    # ----------------------------------------------------------------------------------- search

    def requests(self, user_id: str | None, query: str | None, ctx: Context) -> Requests:
        user = -1 if user_id is None else self.user_row.get(user_id, -1)
        t = self.t_end if ctx.time is None else int(ctx.time)
        query = query.strip() if isinstance(query, str) and query.strip() else None
        return Requests(np.array([user], np.int64), np.array([t], np.int64),
                        np.array([ctx.device], object), np.array([ctx.location], object),
                        np.array([query], object))

    def _keep(self, items: np.ndarray, flt: Filters | None) -> np.ndarray:
        keep = np.ones(len(items), bool)
        if flt is None:
            return keep
        for j, i in enumerate(items):
            price = self.prices[i] if self.prices[i] is not None else 0.0
            keep[j] = not (
                (flt.category and flt.category.lower() not in self.categories[i].lower())
                or (flt.brand and (self.brands[i] or "").lower() != flt.brand.lower())
                or (flt.min_price is not None and not price >= flt.min_price)
                or (flt.max_price is not None and not price <= flt.max_price))
        return keep

    def feature_columns(self, names: list[str]) -> list[int]:
        """Columns of the stage's feature table the LTR model was trained on, in its order."""
        if self._columns is None:
            pos = {n: j for j, n in enumerate(names)}
            missing = [n for n in self.ltr.feature_names if n not in pos]
            if missing:
                raise RuntimeError(f"the feature table lacks the model's features {missing}")
            self._columns = [pos[n] for n in self.ltr.feature_names]
        return self._columns

    def search(self, user_id: str | None, query: str | None, ctx: Context, k: int = 10,
               filters: Filters | None = None, explain: bool = True) -> SearchResult:
        """Rank the candidates of one request; the top ``k`` with explanations."""
        timings: dict[str, float] = {}
        encoders = [e for e in (self.query_text, self.query_image) if e is not None]
        enc0 = sum(e.seconds for e in encoders)
        t0 = time.perf_counter()
        req = self.requests(user_id, query, ctx)
        data = self.stage.build_part(PART, req)
        t1 = time.perf_counter()
        timings["query_embed"] = sum(e.seconds for e in encoders) - enc0
        timings["candidates"] = t1 - t0 - timings["query_embed"]
        x, names, _, _cells, items = self.stage.table(data, np.array([0]))
        x = x[:, self.feature_columns(names)]
        t2 = time.perf_counter()
        timings["features"] = t2 - t1
        pred = self.ltr.predict(x)
        keep = self._keep(items, filters)
        order = [j for j in np.argsort(-pred, kind="stable") if keep[j]][:k]
        hits: list[Hit] = []
        if order:
            contrib, fams = (self.ltr.explain(x[order]) if explain
                             else (np.zeros((len(order), 0)), []))
            for r, j in enumerate(order):
                i = int(items[j])
                why = {f: round(float(v), 4) for f, v in zip(fams, contrib[r], strict=True)}
                hits.append(Hit(self.item_ids[i], float(pred[j]), self.titles[i],
                                self.images[i], _num(self.prices[i]), why,
                                top_reasons(contrib[r], fams) if explain else []))
        timings["ltr"] = time.perf_counter() - t2
        return SearchResult(hits, bool(req.user_idx[0] >= 0), int(len(items)), timings)

    def similar(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        """Nearest items by fused embedding (FAISS inner product), the item itself excluded."""
        row = self.item_row[item_id]
        scores, idx = self.index.search(self.fused[row : row + 1], min(k + 1, len(self.item_ids)))
        return [(self.item_ids[int(i)], float(s)) for s, i in zip(scores[0], idx[0], strict=True)
                if int(i) != row and int(i) >= 0][:k]

    # ----------------------------------------------------------------------------- round trip

    def score_part(self) -> dict[str, float]:
        """Rank every test request of the run through the exported artifacts and evaluate it
        with the run's judge: the metrics of ``fusion+ltr`` (a round trip reproduces the run's)."""
        data = self.stage.build_part(PART)
        _, names, fam, _, _ = self.stage.table(data, np.array([0]))
        cols = self.feature_columns(names)
        n_req, width = data.candidates.items.shape
        out = np.full((n_req, width), -np.inf, np.float32)
        step = max(1, self.cfg.eval.batch_size // 4)
        for lo in range(0, n_req, step):
            rows = np.arange(lo, min(lo + step, n_req))
            x, _, _, cells, _ = self.stage.table(data, rows)
            out[rows[cells[:, 0]], cells[:, 1]] = self.ltr.predict(x[:, cols]).astype(np.float32)
        result = self.stage.evaluate(data, {FULL: out})[0]
        return {k: float(v) for k, v in result.metrics.items()}


def _strings(items: pd.DataFrame, column: str) -> list[str | None]:
    if column not in items:
        return [None] * len(items)
    return [v if isinstance(v, str) and v else None for v in items[column]]


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f
