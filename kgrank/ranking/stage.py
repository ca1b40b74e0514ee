"""The ranking step of ``kgrank run``: candidates -> feature table -> LambdaRank -> evaluation.

Protocol (nothing ever looks at test interactions while training):

1. For a part (``valid`` or ``test``), every first-stage model is fitted on that part's history
   (the split's ``history(part)``: train for valid, train + valid for test); graph models use
   their propagation over the same history. One request per user with targets in the part (its
   time, device, location and query come from the target event's row; its item does not).
2. Candidates: the union of the top-N of each configured source, history masked.
3. The LightGBM LambdaRank model is trained on the **validation** requests whose target is among
   the candidates (holding out a share of those requests for early stopping), then ranks the test
   candidates. Non-candidates rank below every candidate, so the evaluator's full ranking over the
   catalog is well defined and comparable with every other model in the report.
4. Leave-one-modality-out ablations retrain the ranker without one feature family; when the
   pipeline provides a fusion model trained without that modality, its score replaces the full
   fusion score, otherwise the fusion columns are dropped too. Ablations re-rank the same
   candidate pool (their candidate sets are not regenerated).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kgrank.baselines.transition import share_backoff
from kgrank.config import RunConfig
from kgrank.data.dataset import Dataset
from kgrank.data.split import Part, Split
from kgrank.eval.protocol import EvalResult, Recommender, evaluate, user_items_csr
from kgrank.features.context import ContextVocab, Demographics
from kgrank.features.history import request_history
from kgrank.features.requests import Requests, requests_for_targets
from kgrank.memory import release_free_memory
from kgrank.ranking.candidates import Candidates, SourceFn, full_scores, generate_candidates
from kgrank.ranking.ltr import LTRModel
from kgrank.ranking.table import (
    MODALITY_FAMILIES,
    PartFeatures,
    TokenIndex,
    item_tokens_text,
)

log = logging.getLogger("kgrank")

FULL = "fusion+ltr"
USER_INDEPENDENT = frozenset({"popularity"})
"""Baselines whose scores do not depend on the user (kept for cold-start requests)."""


@dataclass
class RankingInputs:
    """Artifacts of the earlier stages that the ranker builds candidates and features from."""

    baselines: Mapping[str, tuple[Callable[..., Recommender], dict[str, Any]]] = field(
        default_factory=dict)
    """name -> (factory, tuned params); refitted on each part's history."""
    graph: Mapping[str, Any] = field(default_factory=dict)
    """name -> :class:`kgrank.graph.train.GraphModelResult`."""
    text: np.ndarray | None = None
    """Item text embeddings [n_items, d] (zero rows where missing)."""
    image: np.ndarray | None = None
    """Item image embeddings [n_items, d] (zero rows where missing)."""
    encode_query_text: Callable[[Sequence[str | None]], np.ndarray] | None = None
    encode_query_image: Callable[[Sequence[str | None]], np.ndarray] | None = None
    item_texts: list[str] | None = None
    fusion: Any | None = None
    """A trained fusion model (``item_emb()``, ``user_vectors(requests, history)``)."""
    fusion_without: Mapping[str, Any] = field(default_factory=dict)
    """modality family -> fusion model trained without it (for ablations)."""


@dataclass
class RankingOutput:
    results: list[EvalResult]
    candidate_recall: dict[str, dict[str, float]]
    importance: dict[str, float]
    explanations: list[dict[str, Any]]
    info: dict[str, Any]


@dataclass
class LTRTable:
    """The LambdaRank training table: rows grouped by request, in request order."""

    x: np.ndarray
    """float32 [N, F] features (NaN: missing)."""
    y: np.ndarray
    """float32 [N] relevance (1: the request's target item)."""
    group: np.ndarray
    """int64 [G] rows per request."""
    names: list[str]
    families: dict[str, str]
    info: dict[str, Any]


@dataclass
class _PartData:
    part: Part
    requests: Requests
    features: PartFeatures
    candidates: Candidates
    row_of_user: pd.Series


def _encode_queries(fn: Callable[[Sequence[str | None]], np.ndarray], queries: np.ndarray,
                    dim: int = 1) -> np.ndarray:
    """Embed each distinct query once; rows without a query stay zero (``dim`` columns when no
    row has a query)."""
    distinct = sorted({q for q in queries if q is not None})
    if not distinct:
        return np.zeros((len(queries), dim), np.float32)
    emb = np.asarray(fn(distinct), dtype=np.float32)
    out = np.zeros((len(queries), emb.shape[1]), np.float32)
    where = {q: i for i, q in enumerate(distinct)}
    for r, q in enumerate(queries):
        if q is not None:
            out[r] = emb[where[q]]
    return out


class RankingStage:
    """Builds both parts, trains the rankers on validation and evaluates them on test."""

    def __init__(self, dataset: Dataset, split: Split, cfg: RunConfig, inputs: RankingInputs,
                 progress: bool = True) -> None:
        self.dataset, self.split, self.cfg, self.inputs = dataset, split, cfg, inputs
        self.progress = progress
        self.rc = cfg.ranking
        self.k = int(cfg.eval.main_metric.partition("@")[2])
        self.vocab = ContextVocab.fit(split.train)
        users_table = dataset.users.drop(columns=["user_id"], errors="ignore")
        self.demographics = (Demographics.from_users(dataset.users)
                             if len(users_table.columns) else None)
        if self.demographics is not None and not (self.demographics.numeric_names
                                                  or self.demographics.categorical_names):
            self.demographics = None
        self.tokens = (TokenIndex.build(item_tokens_text(inputs.item_texts, dataset.items,
                                                         self.rc.attributes))
                       if inputs.item_texts else None)
        self.fusion_item = (None if inputs.fusion is None
                            else np.asarray(inputs.fusion.item_emb(), np.float32))
        has_query = "query" in split.train and bool(split.train["query"].notna().any())
        self.absent = () if has_query else ("query",)
        """Families without signal in this dataset (not ablated)."""
        self.keep_fitted = False
        """Serving hook: keep what :meth:`build_part` fits on a part's history between calls."""
        self._fit_cache: dict[tuple[str, str], Any] = {}
        self._cluster_cache: dict[str, dict[str, np.ndarray]] = {}

    # -- building a part -------------------------------------------------------------------

    def _embeddings(self, part: Part) -> dict[str, tuple[np.ndarray, str]]:
        emb: dict[str, tuple[np.ndarray, str]] = {}
        if self.inputs.text is not None:
            emb["text"] = (np.asarray(self.inputs.text, np.float32), "text")
        if self.inputs.image is not None:
            emb["image"] = (np.asarray(self.inputs.image, np.float32), "image")
        for name, res in self.inputs.graph.items():
            item = res.embeddings(part)[1].numpy()
            norms = np.linalg.norm(item, axis=1, keepdims=True)
            emb[f"graph_{name}"] = (item / np.maximum(norms, 1e-12), "graph")
        return emb

    def _clusters(self, part: Part, embeddings: Mapping[str, tuple[np.ndarray, str]]
                  ) -> dict[str, np.ndarray]:
        """k-means cluster of each item per embedding (``ranking.embedding_clusters``), computed
        once per part (graph embeddings differ between parts)."""
        from kgrank.features.clusters import item_clusters

        k = self.rc.embedding_clusters
        if k <= 0:
            return {}
        if part not in self._cluster_cache:
            self._cluster_cache[part] = {name: item_clusters(emb, k, self.cfg.seed)
                                         for name, (emb, _) in embeddings.items()}
        return self._cluster_cache[part]

    def _fitted(self, part: Part, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, kept per (part, key) when ``self.keep_fitted`` (serving hook: many small
        request batches are built against one part, so its history-fitted models are fitted
        once)."""
        if not self.keep_fitted:
            return make()
        if (part, key) not in self._fit_cache:
            self._fit_cache[(part, key)] = make()
        return self._fit_cache[(part, key)]

    def _own_history(self, part: Part, history: pd.DataFrame, users: np.ndarray
                     ) -> pd.DataFrame:
        """The rows of ``history`` whose user is one of ``users`` (original order)."""
        def index() -> tuple[np.ndarray, np.ndarray]:
            h_users = history["user_idx"].to_numpy(dtype=np.int64)
            order = np.argsort(h_users, kind="stable")
            return order, h_users[order]

        order, sorted_users = self._fitted(part, "history_by_user", index)
        wanted = np.unique(users[users >= 0])
        lo = np.searchsorted(sorted_users, wanted, side="left")
        hi = np.searchsorted(sorted_users, wanted, side="right")
        rows = np.sort(np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)]
                                      + [np.zeros(0, np.int64)]))
        return history.iloc[rows]

    def build_part(self, part: Part, requests: Requests | None = None) -> _PartData:
        """Requests, features and candidates of ``part``: by default one request per user with
        targets in the part; ``requests`` (serving hook) scores other requests against the same
        history. Unknown users (``user_idx`` -1) get no per-user source scores (cold start)."""
        from kgrank.features.behaviour import FEATURE_FAMILIES, BehaviourFeatures

        t0 = time.perf_counter()
        split, n_items = self.split, self.split.n_items
        history = self._fitted(part, "history", lambda: split.history(part))
        if requests is None:
            requests = requests_for_targets(split.targets(part))
        query_emb: dict[str, np.ndarray] = {}
        embeddings = self._embeddings(part)
        if self.inputs.encode_query_text is not None and "text" in embeddings:
            query_emb["text"] = _encode_queries(self.inputs.encode_query_text, requests.query,
                                                embeddings["text"][0].shape[1])
        if self.inputs.encode_query_image is not None and "image" in embeddings:
            query_emb["image"] = _encode_queries(self.inputs.encode_query_image, requests.query,
                                                 embeddings["image"][0].shape[1])
        behaviour = self._fitted(part, "behaviour", lambda: BehaviourFeatures.fit(
            history, self.dataset.items, split.n_users, n_items,
            history_len=self.rc.history_len, half_life=self.rc.half_life,
            attributes=self.rc.attributes, session_gap_s=self.rc.session_gap_s,
            neighbours=self.rc.neighbours))
        # per-request inputs read only the requesting users' events (identical results); serving
        # passes just those rows instead of scanning the part's whole history per request
        own = self._own_history(part, history, requests.user_idx) if self.keep_fitted else history
        feats = PartFeatures(requests, request_history(requests, own), n_items, embeddings,
                             query_emb, self.tokens, self.vocab, self.demographics, behaviour,
                             FEATURE_FAMILIES, self.rc.half_life, self.rc.history_len,
                             self._clusters(part, embeddings))
        users = requests.user_idx

        def fit(make: Callable[..., Any], params: dict[str, Any]) -> Callable[[], Any]:
            return lambda: make(**params).fit(history, split.n_users, n_items)

        baselines = [(name, self._fitted(part, name, fit(make, params)))
                     for name, (make, params) in self.inputs.baselines.items()]
        share_backoff([model for _, model in baselines])
        graph = []
        for name, res in self.inputs.graph.items():
            u, i = res.embeddings(part)
            graph.append((name, u[torch.from_numpy(np.maximum(users, 0))], i.T.contiguous()))
        fusion = []
        if self.inputs.fusion is not None and self.fusion_item is not None:
            uvec = np.asarray(self.inputs.fusion.user_vectors(requests, own), np.float32)
            fusion.append(("fusion", torch.from_numpy(uvec),
                           torch.from_numpy(self.fusion_item.T.copy())))
        for fam, variant in self.inputs.fusion_without.items():
            uv = np.asarray(variant.user_vectors(requests, own), np.float32)
            it = torch.from_numpy(np.asarray(variant.item_emb(), np.float32).T.copy())
            fusion.append((f"fusion_without_{fam}", torch.from_numpy(uv), it))
        sources, extra = self.sources(users, feats, baselines, graph, fusion)
        exclude = user_items_csr(own, users)  # what the evaluator masks
        cands = generate_candidates(sources, np.arange(len(requests)), exclude, self.rc.candidates,
                                    batch_size=self.cfg.eval.batch_size, progress=self.progress,
                                    extra=extra)
        row_of_user = pd.Series(np.arange(len(users)), index=users)
        log.info("ranking %s: %d requests, %.1f candidates per request, built in %.1fs", part,
                 len(requests), float(cands.valid.sum(1).mean()), time.perf_counter() - t0)
        return _PartData(part, requests, feats, cands, row_of_user)

    def sources(self, users: np.ndarray, feats: PartFeatures,
                baselines: Sequence[tuple[str, Recommender]],
                graph: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
                fusion: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
                ) -> tuple[dict[str, SourceFn], dict[str, SourceFn]]:
        """The candidate sources and the feature-only scorers (``extra``) of requests whose user
        rows are ``users`` (-1: unknown; per-user sources give them ``-inf``).

        ``baselines``: (name, fitted model); ``graph``: (name, user embeddings of the requests
        [R, d], item embeddings transposed [d, n_items]); ``fusion``: the same for ``"fusion"``
        and ``"fusion_without_<family>"`` (ablation variants: features only). The text / image
        profile and query sources come from ``feats``. Shared by :meth:`build_part` and the
        serving fast path (:mod:`kgrank.serve.fastpath`), so both score candidates alike.
        """
        sources: dict[str, SourceFn] = {}
        extra: dict[str, SourceFn] = {}
        wanted = set(self.rc.sources)

        def add(name: str, fn: SourceFn, group: str) -> None:
            (sources if group in wanted else extra)[name] = fn

        cold = torch.from_numpy(users < 0)

        def known(fn: SourceFn) -> SourceFn:
            def scores(rows: np.ndarray) -> torch.Tensor:
                out = fn(rows)
                is_cold = cold[torch.from_numpy(np.asarray(rows))]
                # (no [B, n_items] copy for a batch of known users: the usual serving batch)
                return out.masked_fill(is_cold[:, None], -torch.inf) if is_cold.any() else out
            return scores

        def by_user(model: Recommender, per_user: bool = True) -> SourceFn:
            fn = lambda rows: model.score(np.maximum(users[rows], 0))  # noqa: E731
            return known(fn) if per_user else fn

        def dot(user: torch.Tensor, item_t: torch.Tensor) -> SourceFn:
            # a fresh copy of the rows (BLAS results can depend on the operands' alignment);
            # numpy's product: a few rows against the catalogue read it at memory speed, 1.7x
            # torch's on one thread ([4, 64] x [64, 12101]: 91 vs 153 us)
            u, it = user.detach().cpu().numpy(), item_t.detach().cpu().numpy()
            return lambda rows: torch.from_numpy(u[np.asarray(rows)] @ it)

        def profile(name: str) -> SourceFn:
            return lambda rows: feats.profile_scores(name, rows)

        for name, model in baselines:
            add(name, by_user(model, per_user=name not in USER_INDEPENDENT), name)
        for name, user, item_t in graph:
            add(name, known(dot(user, item_t)), "graph")
        for name, user, item_t in fusion:
            if name == "fusion":
                add(name, dot(user, item_t), "fusion")
            else:
                extra[name] = dot(user, item_t)
        for name in ("text", "image"):
            # proposing sources only: as a feature, the score is already the table's
            # <name>_profile_sim (a full-catalogue product per request saved)
            if name in feats.embeddings and name in wanted:
                add(name, profile(name), name)
        if "text" in feats.query_emb:
            add("query", feats.query_scores, "query")
        return sources, extra

    # -- feature tables ----------------------------------------------------------------------

    def table(self, data: _PartData, rows: np.ndarray, shuffle_seed: int | None = None
              ) -> tuple[np.ndarray, list[str], dict[str, str], np.ndarray, np.ndarray]:
        """Features of the candidates of request ``rows``: (X of the non-padding cells, names,
        families, the cells' (row, column) positions in ``[len(rows), C]``, their items).

        With ``shuffle_seed`` the candidates of each request are put in a random order first,
        so that nothing about the row order inside a group (built from source ranks and item
        ids) can reach the ranker's ties.
        """
        cands = data.candidates
        items = cands.items[rows]
        perm: np.ndarray | None = None
        if shuffle_seed is not None:
            rng = np.random.default_rng(shuffle_seed)
            perm = np.argsort(rng.random(items.shape), axis=1)

        def order(v: np.ndarray) -> np.ndarray:
            return v if perm is None else np.take_along_axis(v, perm, 1)

        items = order(items)
        ranked = set(cands.ranks)
        scores = {s: order(v[rows]) for s, v in cands.scores.items()
                  if s in ranked or not s.startswith("fusion_without_")}
        ranks = {s: order(v[rows]) for s, v in cands.ranks.items()}
        variants = {f"score_{s}": (order(v[rows]), "fusion_variant")
                    for s, v in cands.scores.items() if s.startswith("fusion_without_")}
        x, names, fam = data.features.build(rows, items, scores, ranks, variants)
        valid = (items >= 0).reshape(-1)
        cell_row, cell_col = np.divmod(np.flatnonzero(valid), items.shape[1])
        if perm is not None:  # positions in the caller's (unshuffled) candidate order
            cell_col = perm[cell_row, cell_col]
        if not valid.all():  # (a serving batch is usually all candidates: no copy)
            x = x[valid]
        return x, names, fam, np.stack([cell_row, cell_col], 1), items.reshape(-1)[valid]

    @staticmethod
    def feature_sets(names: list[str], fam: Mapping[str, str], absent: Collection[str] = ()
                     ) -> dict[str, list[int]]:
        """Column indices of the full ranker and of each leave-one-family-out ablation
        (``absent``: families the data has no signal for, e.g. queries, are not ablated: their
        ablation would only remove the fusion score)."""
        base = [j for j, n in enumerate(names) if fam[n] != "fusion_variant"]
        sets = {FULL: base}
        present = {fam[n] for n in names} - set(absent)
        for f in MODALITY_FAMILIES:
            if f not in present:
                continue
            cols = [j for j in base if fam[names[j]] not in (f, "fusion")]
            variant = f"score_fusion_without_{f}"
            if variant in names:
                cols.append(names.index(variant))
            sets[f"{FULL} -{f}"] = cols
        return sets

    # -- training and evaluation -------------------------------------------------------------

    def train(self, data: _PartData) -> tuple[dict[str, LTRModel], list[str], dict[str, str],
                                              dict[str, Any]]:
        """Train the full ranker and the ablations on the requests of ``data`` (validation)."""
        return self.fit_models(self.training_table(data))

    def training_table(self, data: _PartData) -> LTRTable:
        """The LambdaRank training table of ``data``'s requests whose target is a candidate.

        Once it is built, ``data`` is no longer needed for training: the caller can free the
        part's candidates (about as large as the table on Amazon Beauty) before LightGBM runs.
        """
        target = data.requests.target
        assert target is not None
        hit_rows = np.flatnonzero((data.candidates.items == target[:, None]).any(1))
        # One preallocated float32 table, filled chunk by chunk: no list of chunks plus their
        # concatenation (on Amazon Beauty the table is ~3.4M rows x 67 features, ~0.9 GB).
        group = data.candidates.valid[hit_rows].sum(1).astype(np.int64)
        x_all = np.empty((0, 0), np.float32)
        y_all = np.empty(int(group.sum()), np.float32)
        names: list[str] = []
        fam: dict[str, str] = {}
        step = max(1, self.cfg.eval.batch_size // 4)
        at = 0
        for lo in tqdm(range(0, len(hit_rows), step), desc="ltr table [valid]",
                       disable=not self.progress, leave=False):
            rows = hit_rows[lo : lo + step]
            x, names, fam, cells, items = self.table(data, rows, shuffle_seed=self.cfg.seed + lo)
            if lo == 0:
                x_all = np.empty((len(y_all), x.shape[1]), np.float32)
            x_all[at : at + len(x)] = x
            y_all[at : at + len(x)] = items == target[rows][cells[:, 0]]
            at += len(x)
        if at != len(y_all):
            raise RuntimeError(f"feature table has {at} rows, candidates say {len(y_all)}")
        info = {"train_requests": int(len(hit_rows)), "valid_requests": len(data.requests),
                "train_rows": int(len(x_all)), "features": len(names)}
        log.info("ltr training table: %s", info)
        return LTRTable(x_all, y_all, group, names, fam, info)

    def fit_models(self, table: LTRTable) -> tuple[dict[str, LTRModel], list[str],
                                                   dict[str, str], dict[str, Any]]:
        """The full ranker (and, with ``ranking.ablations``, each leave-one-family-out ranker)
        trained on ``table``; returns ``(models, names, families, info)``."""
        names, fam = table.names, table.families
        models: dict[str, LTRModel] = {}
        for key, cols in self.feature_sets(names, fam, self.absent).items():
            t0 = time.perf_counter()
            sub = [names[j] for j in cols]
            x = table.x if cols == list(range(len(names))) else table.x[:, cols]  # no copy if all
            model = self.fit_ltr(x, table.y, table.group, sub, {n: fam[n] for n in sub})
            del x
            models[key] = model
            log.info("ltr %s: %d features, trained in %.1fs", key, len(cols),
                     time.perf_counter() - t0)
            if not self.rc.ablations:
                break
        return models, names, fam, table.info

    def fit_ltr(self, x: np.ndarray, y: np.ndarray, group: np.ndarray, names: list[str],
                fam: Mapping[str, str]) -> LTRModel:
        """One LambdaRank model: in-process, or data-parallel LightGBM on Ray (whole query groups
        per worker) when ``ray.address`` is set and ``ranking`` is among ``ray.stages``."""
        ray_cfg = self.cfg.ray
        if ray_cfg.address is not None and "ranking" in ray_cfg.stages:
            from kgrank.distributed.ltr import fit_ltr_ray  # imports Ray: only when configured

            return fit_ltr_ray(x, y, group, names, fam, self.rc.ltr, self.k, ray_cfg,
                               output_dir=self.cfg.output_dir)
        return LTRModel().fit(x, y, group, names, fam, self.rc.ltr, self.k,
                              progress=self.progress)

    def predict(self, data: _PartData, models: Mapping[str, LTRModel], names: list[str],
                fam: Mapping[str, str], n_explain: int = 50
                ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Scores [R, C] of every model on ``data``'s candidates (-inf on padding) and the full
        model's per-family explanations of the top results of the first ``n_explain`` requests."""
        n_req, width = data.candidates.items.shape
        out = {key: np.full((n_req, width), -np.inf, np.float32) for key in models}
        sets = self.feature_sets(names, fam, self.absent)
        explanations: list[dict[str, Any]] = []
        step = max(1, self.cfg.eval.batch_size // 4)
        item_ids = self.dataset.items["item_id"].to_numpy()
        for lo in tqdm(range(0, n_req, step), desc=f"ltr predict [{data.part}]",
                       disable=not self.progress, leave=False):
            rows = np.arange(lo, min(lo + step, n_req))
            x, cur, _, cells, items = self.table(data, rows)
            if cur != names:
                raise RuntimeError("feature columns differ between training and prediction")
            for key, model in models.items():
                pred = model.predict(x[:, sets[key]]).astype(np.float32)
                out[key][rows[cells[:, 0]], cells[:, 1]] = pred
            if lo < n_explain:
                # TreeSHAP only for the rows shown: each request's top k (not the whole chunk)
                pred = out[FULL][rows]
                tops = []
                for r in range(min(len(rows), n_explain - lo)):
                    at = np.flatnonzero(cells[:, 0] == r)
                    tops.append(at[np.argsort(-pred[r, cells[at, 1]], kind="stable")[: self.k]])
                shown = np.concatenate([np.zeros(0, np.int64), *tops])
                if not len(shown):
                    continue
                contrib, fams = models[FULL].explain(x[shown][:, sets[FULL]])
                row_of = {int(j): i for i, j in enumerate(shown)}
                req = data.requests
                for r, top in enumerate(tops):
                    explanations.append({
                        "user": int(req.user_idx[rows[r]]),
                        "query": req.query[rows[r]],
                        "device": req.device[rows[r]],
                        "location": req.location[rows[r]],
                        "results": [{"item": str(item_ids[items[j]]),
                                     "score": float(contrib[row_of[int(j)]].sum()),
                                     "why": {f: round(float(v), 4) for f, v in
                                             zip(fams, contrib[row_of[int(j)]], strict=True)}}
                                    for j in top],
                    })
        return out, explanations

    def evaluate(self, data: _PartData, scores: Mapping[str, np.ndarray]) -> list[EvalResult]:
        results = []
        n_items = self.split.n_items
        for key, sc in scores.items():
            def score(users: np.ndarray, sc: np.ndarray = sc) -> torch.Tensor:
                rows = data.row_of_user.loc[users].to_numpy()
                return full_scores(data.candidates, sc, n_items, rows=rows)

            results.append(evaluate(score, self.split, data.part, self.cfg.eval, name=key,
                                    progress=self.progress))
        return results

    def recall(self, data: _PartData) -> dict[str, float]:
        """Candidate recall@N of each source and of the union (ranking cannot beat it)."""
        target = data.requests.target
        assert target is not None
        out = data.candidates.recall_by_source(target)
        out["candidates_per_request"] = float(data.candidates.valid.sum(1).mean())
        return out


def run_ranking_stage(dataset: Dataset, split: Split, cfg: RunConfig, inputs: RankingInputs,
                      out_dir: Path, progress: bool = True) -> RankingOutput:
    """Train the ranker on validation, evaluate it and its ablations on test, write artifacts."""
    t0 = time.perf_counter()
    stage = RankingStage(dataset, split, cfg, inputs, progress)
    valid = stage.build_part("valid")
    release_free_memory()  # the source-scoring batches' temporaries
    recall = {"valid": stage.recall(valid)}
    table = stage.training_table(valid)
    del valid
    release_free_memory()  # the validation part's candidates and features, before LightGBM
    models, names, fam, info = stage.fit_models(table)
    del table
    release_free_memory()  # the training table, before the test part
    test = stage.build_part("test")
    release_free_memory()
    recall["test"] = stage.recall(test)
    scores, explanations = stage.predict(test, models, names, fam)
    results = stage.evaluate(test, scores)
    full = models[FULL]
    importance = full.importance_by_family()
    out_dir.mkdir(parents=True, exist_ok=True)
    full.save(out_dir / "ltr_model.txt")
    info.update(seconds=time.perf_counter() - t0, families={n: fam[n] for n in names})
    files = {"candidate_recall.json": recall, "importance.json": importance,
             "explanations.json": explanations, "info.json": info}
    for fname, content in files.items():
        (out_dir / fname).write_text(json.dumps(content, indent=1, default=str) + "\n")
    for r in results:
        log.info("%s: test %s=%.4f", r.name, cfg.eval.main_metric, r.metrics[cfg.eval.main_metric])
    return RankingOutput(results, recall, importance, explanations, info)
