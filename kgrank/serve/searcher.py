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

Per request, :class:`~kgrank.serve.fastpath.FastPart` feeds those objects from state
precomputed at start-up (no pandas on the request path); it gives what ``build_part`` gives for
the request, bit for bit (``tests/serve/test_fastpath.py``), and :meth:`Searcher.score_part` uses
the stage's own batch path. LightGBM runs on ``threads`` threads. The searcher is safe to call
from several threads at once.

A request is one row of :class:`~kgrank.features.requests.Requests` scored against the "test"
history; an unknown user is a cold-start request (``user_idx`` -1: no per-user sources, the
fusion tower from context + query). Nothing here imports training code (``kgrank.*.train``,
Ray, optimizers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from kgrank.data.split import Part, Split, make_split
from kgrank.export.loader import Export
from kgrank.export.onnx import batch_arrays
from kgrank.features.context import ContextVocab
from kgrank.features.requests import Requests
from kgrank.fusion.inputs import EventIndex, QueryCache, RequestFeatures, request_features
from kgrank.ranking.ltr import BIAS, top_reasons
from kgrank.ranking.paths import PathExplainer
from kgrank.ranking.stage import FULL, RankingInputs, RankingStage
from kgrank.serve.compiled import CompiledTrees, compile_booster
from kgrank.serve.fastpath import FastPart

log = logging.getLogger("kgrank")

ExplainMethod = Literal["path", "shap"]

PART: Part = "test"
"""Requests are scored against the test-time history (training + validation events)."""


class StoredGraph:
    """A graph model's exported (user, item) embeddings, as ``GraphModelResult.embeddings``."""

    def __init__(self, user: np.ndarray, item: np.ndarray) -> None:
        self.user, self.item = torch.from_numpy(np.array(user)), torch.from_numpy(np.array(item))

    def embeddings(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user, self.item


def users_index(index: EventIndex, users: np.ndarray) -> EventIndex:
    """The :class:`EventIndex` of the events of ``users`` (any order, repeats and -1 ignored),
    sliced from an index of a whole history: equal to ``EventIndex(<the history's rows of those
    users>)``."""
    known = np.unique(np.asarray(users, np.int64))
    known = known[known >= 0]
    # a user's keys are user * span + [0, span); users ascending keep the slices sorted
    lo = np.searchsorted(index.keys, known * index.span, side="left")
    hi = np.searchsorted(index.keys, (known + 1) * index.span, side="left")
    take = (np.concatenate([np.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist(),
                                                             strict=True)])
            if len(known) else np.zeros(0, np.int64))
    out = EventIndex.__new__(EventIndex)
    out.users, out.items, out.times = index.users[take], index.items[take], index.times[take]
    out.t0 = int(out.times.min()) if len(out.times) else 0
    out.span = (int(out.times.max()) - out.t0 + 3) if len(out.times) else 3
    out.keys = out._key(out.users, out.times)
    return out


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
        self._index: tuple[pd.DataFrame, EventIndex] | None = None
        self._lock = threading.Lock()

    def item_emb(self) -> np.ndarray:
        return self._items

    def _events(self, history: pd.DataFrame) -> EventIndex:
        # keyed by the frame itself, not its id(): a collected frame's id is reused by the next
        # one, which would then get a stale index (another request's users)
        index = self._index
        if index is None or index[0] is not history:
            index = self._index = (history, EventIndex(history))
        return index[1]

    def _features(self, requests: Requests, index: EventIndex) -> RequestFeatures:
        with self._lock:  # the query cache grows (and is reset) under the lock
            if len(self.queries.texts) > len(self._base[0]) + self.max_new_queries:
                fresh = QueryCache(self.queries.encode, self.queries.dim)  # bounded memory
                if self._base[0]:
                    fresh.add(*self._base)
                self.queries = fresh
            # (the query table holds only the batch's queries: QueryCache.lookup)
            return request_features(requests, index, self.vocab, self.queries,
                                    self.history_len, strict=False)

    def user_vectors(self, requests: Requests, history: pd.DataFrame, chunk: int = 4096
                     ) -> np.ndarray:
        return self._run(self._features(requests, self._events(history)), chunk)

    def vectors_at(self, requests: Requests, index: EventIndex, chunk: int = 4096
                   ) -> np.ndarray:
        """``user_vectors`` from an index of the whole history: the same as
        ``user_vectors(requests, <the requests' users' events>)`` (one tower call for the
        batch), without building an index from a frame per call."""
        return self._run(self._features(requests, users_index(index, requests.user_idx)), chunk)

    def _run(self, feats: RequestFeatures, chunk: int) -> np.ndarray:
        out = [np.zeros((0, self._items.shape[1]), np.float32)]
        for lo in range(0, len(feats), chunk):
            rows = np.arange(lo, min(lo + chunk, len(feats)))
            batch = feats.batch(rows, torch.device("cpu"))
            out.append(self.session.run(None, batch_arrays(batch, self.session))[0])
        return np.concatenate(out)


class LRUEncoder:
    """``texts -> [n, d]`` through an LRU cache of ``size`` distinct texts, in front of a table
    of pinned vectors (precomputed, never evicted); the seconds spent encoding are added to
    :attr:`seconds`."""

    def __init__(self, encode: Callable[[Sequence[str | None]], np.ndarray], size: int = 4096
                 ) -> None:
        self.encode, self.size = encode, size
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.pinned: dict[str, np.ndarray] = {}
        self.seconds = 0.0
        self.hits = self.misses = 0
        self._lock = threading.RLock()
        """Concurrent requests share the cache (and the encoder, which runs under the lock)."""
        self._local = threading.local()

    def __call__(self, texts: Sequence[str | None]) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            with self._lock:
                return self._call(texts)
        finally:  # this thread's time, waiting for the lock included
            self._local.seconds = self.thread_seconds() + time.perf_counter() - t0

    def pin(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Serve ``texts`` from ``vectors`` (rows in the same order) without encoding."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"pin: {len(texts)} texts but vectors of shape {vectors.shape}")
        with self._lock:
            self.pinned.update(zip(texts, vectors, strict=True))

    @contextmanager
    def uncached(self) -> Iterator[None]:
        """Encode everything afresh inside the block (as the run did); the cache and the
        pinned table are back afterwards. Holds the lock: other callers wait."""
        with self._lock:
            saved = self.cache, self.pinned
            self.cache, self.pinned = OrderedDict(), {}
            try:
                yield
            finally:
                self.cache, self.pinned = saved

    def thread_seconds(self) -> float:
        """Seconds the calling thread has spent in this encoder (per-request timings stay
        right while other threads encode)."""
        return float(getattr(self._local, "seconds", 0.0))

    def _call(self, texts: Sequence[str | None]) -> np.ndarray:
        t0 = time.perf_counter()
        keys = [t or "" for t in texts]
        new = sorted({k for k in keys if k not in self.cache and k not in self.pinned})
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            for k, v in zip(new, np.asarray(self.encode(new), np.float32), strict=True):
                self.cache[k] = v
        out = (np.stack([self.pinned[k] if k in self.pinned else self.cache[k] for k in keys])
               if keys else np.zeros((0, 0), np.float32))
        for k in keys:
            if k in self.cache:
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
class SearchArgs:
    """The arguments of one :meth:`Searcher.search` call (a batch of them goes to
    :meth:`Searcher.search_many`)."""

    user_id: str | None = None
    query: str | None = None
    context: Context = field(default_factory=Context)
    k: int = 10
    filters: Filters | None = None
    explain: bool = True
    method: ExplainMethod = "path"


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
    """Seconds per step: query_embed, candidates (source scores + top-N union), features (the
    LTR table), ltr (LightGBM predict + ordering), explain (per-family path attributions or
    TreeSHAP of the hits), each the whole batch's."""
    batch_size: int = 1
    """Requests ranked together with this one (:meth:`Searcher.search_many`)."""


def _baselines(export: Export, cfg: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The baselines the ranking stage refits, with the run's tuned parameters."""
    from kgrank.pipeline import _ranking_baselines

    tuned = [SimpleNamespace(name=n, params=p) for n, p in export.tuned_params().items()]
    return _ranking_baselines(cfg, tuned)  # type: ignore[arg-type]


class Searcher:
    """Ranks items for search / recommendation requests from an export.

    ``candidates``: per-source top-N (default: the run's); ``threads``: torch / onnxruntime /
    LightGBM threads per request; ``query_cache``: distinct query texts kept per encoder (LRU);
    ``text_encoder``: use this encoder instead of building the run's; ``pin_queries``: serve the
    queries the run's fusion stage encoded (the export's ``fusion/queries.safetensors``) from
    that table instead of encoding them per request, and likewise for the image model's text
    tower (the export's ``encoders/image/queries.safetensors``); ``compiled``: predict with the
    LightGBM trees compiled to native code (:mod:`kgrank.serve.compiled`; LightGBM when lleaves
    is unavailable).
    """

    def __init__(self, export: Export, candidates: int | None = None, threads: int = 1,
                 query_cache: int = 4096, text_encoder: Any | None = None,
                 pin_queries: bool = True, compiled: bool = True) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(threads)
        # numpy's OpenBLAS and the OpenMP runtimes default to every core; concurrent requests
        # (threads, or worker processes) then oversubscribe it, and a 1x384 @ 384x3000 product
        # waits on spinning pool threads (on 2 busy cores: p50 88 -> 40 ms in-process).
        # Process-wide, like torch.set_num_threads.
        self._thread_limits = threadpool_limits(threads)
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

        fusion = OnnxFusion(export, self.query_text, threads)
        inputs = RankingInputs(
            baselines=_baselines(export, cfg), graph=graph,
            text=export.embeddings("text")[1] if "text" in stages else None,
            image=export.embeddings("image")[1] if "image" in stages else None,
            encode_query_text=self.query_text, encode_query_image=self.query_image,
            item_texts=item_texts(self.dataset),
            fusion=fusion,
        )
        if (pin_queries and self.query_text is not None and fusion.queries.texts
                and inputs.text is not None and fusion.queries.dim == inputs.text.shape[1]):
            # the fusion stage encoded the run's training queries with this text encoder: the
            # export's copy saves a transformer pass per request on every known query
            self.query_text.pin(fusion.queries.texts, fusion.queries.vectors)
        if (pin_queries and self.query_image is not None and fusion.queries.texts
                and "image_queries" in export.manifest.files):
            from safetensors.numpy import load_file

            self.query_image.pin(fusion.queries.texts,
                                 load_file(str(export.path("image_queries")))["queries"])
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
        self.threads = threads
        self._family_matrix = self.ltr._family_matrix()
        booster = self.ltr.booster
        assert booster is not None
        self.paths = PathExplainer(booster, self._family_matrix, self.ltr.best_iteration)
        self.compiled: CompiledTrees | None = None
        if compiled:  # the trees the model predicts with, compiled (LightGBM stays the fallback)
            self.compiled = compile_booster(
                booster.model_to_string(num_iteration=self.ltr.best_iteration))
        self.fast: FastPart | None = None
        self.warm()  # the stage's own path fits and keeps the part's history models
        self.fast = FastPart(self.stage, PART)
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
        return self.requests_of([SearchArgs(user_id, query, ctx)])

    def requests_of(self, batch: Sequence[SearchArgs]) -> Requests:
        """One :class:`Requests` row per search (unknown user ids are cold starts)."""
        users = [-1 if a.user_id is None else self.user_row.get(a.user_id, -1) for a in batch]
        times = [self.t_end if a.context.time is None else int(a.context.time) for a in batch]
        queries = [a.query.strip() if isinstance(a.query, str) and a.query.strip() else None
                   for a in batch]

        def objects(values: list[Any]) -> np.ndarray:
            out = np.empty(len(values), object)
            out[:] = values
            return out

        return Requests(np.array(users, np.int64), np.array(times, np.int64),
                        objects([a.context.device for a in batch]),
                        objects([a.context.location for a in batch]), objects(queries))

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
               filters: Filters | None = None, explain: bool = True,
               method: ExplainMethod = "path") -> SearchResult:
        """Rank the candidates of one request; the top ``k`` with explanations (``method``
        "path": path attributions, :mod:`kgrank.ranking.paths`; "shap": TreeSHAP, as the run's
        ``explanations.json``; both per family and summing to the score)."""
        return self.search_many([SearchArgs(user_id, query, ctx, k, filters, explain,
                                            method)])[0]

    def search_many(self, batch: Sequence[SearchArgs]) -> list[SearchResult]:
        """:meth:`search` of several requests at once: one candidate generation, one feature
        table and one LightGBM call for all of them, which spreads the per-call overhead of
        the request path (the server batches the requests that queue up while it is busy,
        :mod:`kgrank.serve.batching`). Each result is what :meth:`search` gives for its request
        alone, up to float rounding in the batched products (tested). Timings are the batch's
        (every request of a batch waits for all of it)."""
        if not batch:
            return []
        encoders = [e for e in (self.query_text, self.query_image) if e is not None]
        enc0 = sum(e.thread_seconds() for e in encoders)
        t0 = time.perf_counter()
        req = self.requests_of(batch)
        data = self.stage.build_part(PART, req) if self.fast is None else self.fast.build(req)
        t1 = time.perf_counter()
        query_s = sum(e.thread_seconds() for e in encoders) - enc0
        rows = np.arange(len(batch))
        x, names, _, cells, items = self.stage.table(data, rows)
        cols = self.feature_columns(names)
        if cols != list(range(x.shape[1])):  # (usually the table's own order: no copy)
            x = x[:, cols]
        t2 = time.perf_counter()
        pred = self.predict(x)
        bounds = np.searchsorted(cells[:, 0], np.arange(len(batch) + 1))  # cells are row-major
        orders: list[list[int]] = []
        for r, a in enumerate(batch):
            lo, hi = int(bounds[r]), int(bounds[r + 1])
            keep = self._keep(items[lo:hi], a.filters)
            ranked = np.argsort(-pred[lo:hi], kind="stable")
            top = (ranked if a.filters is None else ranked[keep[ranked]])[: a.k]
            orders.append([lo + int(j) for j in top])
        t3 = time.perf_counter()
        timings = {"query_embed": query_s, "candidates": t1 - t0 - query_s, "features": t2 - t1,
                   "ltr": t3 - t2}
        # one explanation call per method for the whole batch (each row's is its own)
        explained: dict[int, tuple[np.ndarray, list[str]]] = {}
        for method in dict.fromkeys(a.method for a in batch if a.explain):
            who = [r for r, a in enumerate(batch) if a.explain and a.method == method and orders[r]]
            if not who:
                continue
            contrib, fams = self.explain(x[[j for r in who for j in orders[r]]], method)
            ends = np.cumsum([len(orders[r]) for r in who])
            for r, part in zip(who, np.split(contrib, ends[:-1]), strict=True):
                explained[r] = (part, fams)
        timings["explain"] = time.perf_counter() - t3
        out = []
        for r, (a, order) in enumerate(zip(batch, orders, strict=True)):
            contrib, fams = explained.get(r, (np.zeros((len(order), 0)), []))
            hits: list[Hit] = []
            for i_hit, j in enumerate(order):
                i = int(items[j])
                row = contrib[i_hit]
                why = {f: round(float(v), 4) for f, v in zip(fams, row, strict=True)}
                hits.append(Hit(self.item_ids[i], float(pred[j]), self.titles[i],
                                self.images[i], _num(self.prices[i]), why,
                                top_reasons(row, fams) if a.explain else []))
            out.append(SearchResult(hits, bool(req.user_idx[r] >= 0),
                                    int(bounds[r + 1] - bounds[r]), dict(timings), len(batch)))
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``self.ltr.predict(x)`` on ``self.threads`` threads (LightGBM's default is every
        core, which concurrent requests would oversubscribe); by the compiled trees when there
        are (equal to ~1e-12)."""
        if self.compiled is not None:
            return self.compiled.predict(x, self.threads)
        booster = self.ltr.booster
        assert booster is not None
        return np.asarray(booster.predict(x, num_iteration=self.ltr.best_iteration,
                                          raw_score=True, num_threads=self.threads), np.float64)

    def explain(self, x: np.ndarray, method: ExplainMethod = "shap"
                ) -> tuple[np.ndarray, list[str]]:
        """Per-family contributions plus the bias column, on ``self.threads`` threads:
        ``self.ltr.explain(x)`` (TreeSHAP) or the path attributions (``method="path"``)."""
        names = [*self.ltr.family_names, BIAS]
        if method == "path":
            contrib, bias = self.paths.explain(x, self.threads)
            return np.column_stack([contrib, np.full(len(x), bias)]), names
        if method != "shap":
            raise ValueError(f"unknown explanation method {method!r} (path, shap)")
        return self.ltr.explain(x, self.threads)

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
        with ExitStack() as stack:  # queries encoded as the run encoded them (one batch)
            for enc in (self.query_text, self.query_image):
                if enc is not None:
                    stack.enter_context(enc.uncached())
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
