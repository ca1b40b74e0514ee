"""The per-request fast path of :class:`kgrank.serve.searcher.Searcher`.

:meth:`RankingStage.build_part` with a ``requests`` argument is the reference for one request:
it is built for batches, so each call re-derives per-part state from the part's history (a
pandas slice of the users' events, their timestamps in seconds, an event index for the fusion
user tower, the normalised graph embeddings, transposed item matrices). :class:`FastPart` does
that once at start-up and then, for each request, feeds the **same** objects the stage uses
(:class:`~kgrank.ranking.table.PartFeatures`, the fitted baselines and behaviour features,
:meth:`RankingStage.sources`, :func:`~kgrank.ranking.candidates.generate_candidates`,
:meth:`RankingStage.table`) with the request's own inputs gathered from arrays, so the
candidates, their order and the feature table are identical to the stage's (the serving tests
compare them request by request).

Everything here is read-only after :meth:`FastPart.__init__`: one instance serves concurrent
requests (the query caches it reads through lock themselves).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kgrank.data.split import Part
from kgrank.features.history import RequestHistory
from kgrank.features.requests import Requests, to_seconds
from kgrank.fusion.inputs import EventIndex
from kgrank.ranking.candidates import generate_candidates
from kgrank.ranking.stage import RankingStage, _encode_queries, _PartData
from kgrank.ranking.table import PartFeatures, present_rows


class FastPart:
    """Per-part state of the request path, precomputed from a warmed-up ``RankingStage``
    (``keep_fitted`` on, :meth:`RankingStage.build_part` run once for ``part``)."""

    def __init__(self, stage: RankingStage, part: Part) -> None:
        from kgrank.features.behaviour import FEATURE_FAMILIES

        if not stage.keep_fitted:
            raise ValueError("FastPart needs a RankingStage with keep_fitted")
        if stage.inputs.fusion_without:
            raise ValueError("FastPart serves no fusion ablation variants")
        self.stage, self.part = stage, part
        self.families = FEATURE_FAMILIES
        split = stage.split
        self.n_items = split.n_items
        history: pd.DataFrame = stage._fitted(part, "history", lambda: split.history(part))
        self.behaviour = stage._fit_cache[(part, "behaviour")]
        if self.behaviour is not None:
            self.behaviour.cache_neighbours()
        self.baselines = [(name, stage._fit_cache[(part, name)])
                          for name in stage.inputs.baselines]
        self.embeddings = stage._embeddings(part)
        self.clusters = stage._clusters(part, self.embeddings)
        self.present = {name: present_rows(emb) for name, (emb, _) in self.embeddings.items()}
        self.graph = []
        for name, res in stage.inputs.graph.items():
            u, i = res.embeddings(part)
            self.graph.append((name, u, i.T.contiguous()))
        self.fusion_t = (None if stage.fusion_item is None
                         else torch.from_numpy(stage.fusion_item.T.copy()))
        self.events = EventIndex(history)
        """The fusion user tower's window index over the whole part history (a user's windows
        read only that user's events, as with the per-request history the stage passes)."""
        # the history's events in request_history's order: by (user, time), original order
        # inside a timestamp; with each event's timestamp ordinal inside its user
        h_user = history["user_idx"].to_numpy(dtype=np.int64)
        h_ts = to_seconds(history["timestamp"]) if len(history) else np.zeros(0, np.int64)
        h_item = history["item_idx"].to_numpy(dtype=np.int64)
        order = np.lexsort((h_ts, h_user))
        self.h_user, self.h_ts, self.h_item = h_user[order], h_ts[order], h_item[order]
        new_user = np.ones(len(order), dtype=bool)
        new_user[1:] = self.h_user[1:] != self.h_user[:-1]
        new_group = new_user.copy()
        new_group[1:] |= self.h_ts[1:] != self.h_ts[:-1]
        group_id = np.cumsum(new_group) - 1
        self.ordinal = group_id - np.maximum.accumulate(np.where(new_user, group_id, 0))
        # each user's items in the history's original row order (what the evaluator masks)
        by_user = np.argsort(h_user, kind="stable")
        self.u_sorted, self.u_items = h_user[by_user], h_item[by_user]
        self._no_user = pd.Series(np.zeros(0, np.int64), dtype=np.int64)

    # ---------------------------------------------------------------------------- per request

    def _history(self, users: np.ndarray, times: np.ndarray) -> RequestHistory:
        """:func:`kgrank.features.history.request_history` of the requests."""
        rows, idx, g = [], [], []
        for r, (user, t) in enumerate(zip(users.tolist(), times.tolist(), strict=True)):
            if user < 0:
                continue
            lo = int(np.searchsorted(self.h_user, user, side="left"))
            hi = int(np.searchsorted(self.h_user, user, side="right"))
            end = lo + int(np.searchsorted(self.h_ts[lo:hi], t, side="right"))
            if end == lo:
                continue
            at = np.arange(lo, end, dtype=np.int64)
            rows.append(np.full(len(at), r, np.int64))
            idx.append(at)
            g.append(self.ordinal[end - 1] - self.ordinal[at])
        if not idx:
            z = np.zeros(0, np.int64)
            return RequestHistory(z, z, z, z, len(users))
        at = np.concatenate(idx)
        return RequestHistory(np.concatenate(rows), self.h_item[at], self.h_ts[at],
                              np.concatenate(g).astype(np.int64), len(users))

    def _exclude(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each request's history items (CSR), as ``user_items_csr`` gives them."""
        offsets, items = [0], []
        for user in users.tolist():
            lo = hi = 0
            if user >= 0:
                lo = int(np.searchsorted(self.u_sorted, user, side="left"))
                hi = int(np.searchsorted(self.u_sorted, user, side="right"))
            items.append(self.u_items[lo:hi])
            offsets.append(offsets[-1] + hi - lo)
        return np.asarray(offsets, np.int64), np.concatenate(items)

    def build(self, requests: Requests) -> _PartData:
        """What ``stage.build_part(part, requests)`` returns for these requests."""
        stage, rc, inputs = self.stage, self.stage.rc, self.stage.inputs
        users = np.asarray(requests.user_idx, np.int64)
        emb = self.embeddings
        query_emb: dict[str, np.ndarray] = {}
        if inputs.encode_query_text is not None and "text" in emb:
            query_emb["text"] = _encode_queries(inputs.encode_query_text, requests.query,
                                                emb["text"][0].shape[1])
        if inputs.encode_query_image is not None and "image" in emb:
            query_emb["image"] = _encode_queries(inputs.encode_query_image, requests.query,
                                                 emb["image"][0].shape[1])
        feats = PartFeatures(requests, self._history(users, np.asarray(requests.timestamp)),
                             self.n_items, emb, query_emb, stage.tokens, stage.vocab,
                             stage.demographics, self.behaviour, self.families, rc.half_life,
                             rc.history_len, self.clusters, self.present)
        known = torch.from_numpy(np.maximum(users, 0))
        graph = [(name, u[known], item_t) for name, u, item_t in self.graph]
        fusion = []
        if inputs.fusion is not None and self.fusion_t is not None:
            uvec = torch.from_numpy(np.asarray(inputs.fusion.vectors_at(requests, self.events),
                                               np.float32))
            fusion.append(("fusion", uvec, self.fusion_t))
        sources, extra = stage.sources(users, feats, self.baselines, graph, fusion)
        cands = generate_candidates(sources, np.arange(len(requests)), self._exclude(users),
                                    rc.candidates,
                                    batch_size=stage.cfg.eval.batch_size, progress=False,
                                    extra=extra)
        return _PartData(self.part, requests, feats, cands, self._no_user)
