"""Neighbourhood taste features: user-based collaborative smoothing at the attribute level.

A user with ~10 history items gives a noisy estimate of their tastes; users with similar
histories (the same shopper segment) share them. For every request this module finds the ``k``
users whose histories are most similar to the requesting user's and averages their category,
brand, attribute-value, item and price profiles - user-based neighbourhood collaborative
filtering (user-KNN; Herlocker, Konstan, Borchers & Riedl, "An algorithmic framework for performing
collaborative filtering", SIGIR 1999; Desrosiers & Karypis, "A comprehensive survey of
neighborhood-based recommendation methods", Recommender Systems Handbook, 2011) applied to
attribute shares instead of item ratings only.

Profiles and similarity. Item ``i`` has a code ``a(i)`` in each *block* (``leaf``, ``brand``, every
configured attribute column, and the item itself). ``n_b(x, v)`` counts the events of a history
``x`` whose item has value ``v`` in block ``b`` (the item block is binary: 1 if ``x`` has the
item). The similarity of the requesting user's history ``q`` and another user ``v``'s history is
the mean of the per-block cosines over the blocks ``B`` the catalog has::

    sim(q, v) = 1/|B| sum_{b in B} <n_b(q), n_b(v)> / (||n_b(q)|| ||n_b(v)||)      (0 if a norm is 0)

The dot products and squared norms are sums of small integers, so they are exact in floating
point whatever the summation order, and the block cosines are added in a fixed block order (in
float32, which halves the cost of the top-k selection): the similarity does not depend on the
order of events or on item ids. Requests are scored against all users in chunks of
:data:`SIM_CELLS` cells (sparse products, no ``n_users x n_users`` matrix), and a request's
neighbours do not depend on the other requests of its batch.

Neighbours ``N(q)``: the ``k`` users ``v != u`` with the largest ``sim(q, v) > 0`` (ties at the
cut broken by the lower user index). With ``s_v = sim(q, v)`` and ``p_b(v, x) = n_b(v, x) / |v|``
(``|v|`` the number of ``v``'s events) the features of a candidate ``c`` are::

    nbr_<b>_share(c) = sum_{v in N} s_v p_b(v, a_b(c)) / sum_{v in N} s_v
    nbr_item_share(c) = sum_{v in N} s_v [c in v] / sum_{v in N} s_v

Time rules: the requesting user's profile ``q`` uses only their events with ``ts <= t`` (as every
per-request behaviour feature); the other users' profiles are fitted once on the part's whole
history (as the item-item statistics and the ItemKNN baseline are), and the requesting user's own
fitted profile is never a neighbour, so their events after ``t`` never count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from kgrank.features.lookup import lookup

NEIGHBOURS = 50
"""Default neighbourhood size (``ranking.neighbours``)."""
SIM_CELLS = 1 << 22
"""Request x user similarity cells computed at once (bounds the temporary memory: 16 MiB of
float32 similarities)."""
DENSE_CELLS = 1 << 21
"""Similarity blocks with at most this many ``size x n_users`` cells keep their profiles as a
dense float64 matrix (16 MiB at most): a request's dot products are then one matrix product
instead of an expansion over every user of each of its codes (a colour held by most users)."""

NEIGHBOUR_DOCS: dict[str, str] = {
    "nbr_sim": "mean sim(q, v) over the neighbours N (0 without neighbours)",
    "nbr_leaf_share": "sum_{v in N} s_v p_leaf(v, leaf(c)) / sum_{v in N} s_v, p the share of v's "
                      "events in that leaf",
    "nbr_parent_share": "as nbr_leaf_share for the parent category",
    "nbr_brand_share": "as nbr_leaf_share for the brand",
    "nbr_item_share": "sum_{v in N} s_v [c in v's history] / sum_{v in N} s_v",
    "nbr_rel_price_gap": "price_vs_leaf(c) - sum_v s_v m_v / sum_v s_v over neighbours with priced "
                         "events, m_v the mean price_vs_leaf of v's priced events; 0 if either "
                         "side has no price",
    "nbr_rel_price_abs_gap": "|nbr_rel_price_gap|",
}
"""Formulas of the neighbourhood features (``c`` = candidate, ``q`` = the requesting user's events
``<= t``, ``N`` = their neighbours with similarities ``s_v``); ``nbr_attr_<col>_share`` is
``nbr_leaf_share`` for an attribute column's value."""


def neighbour_feature_names(attributes: list[str]) -> tuple[str, ...]:
    """Names of the neighbourhood features, with ``nbr_attr_<col>_share`` per attribute column."""
    names = list(NEIGHBOUR_DOCS)
    at = names.index("nbr_item_share")
    return tuple(names[:at] + [f"nbr_attr_{c}_share" for c in attributes] + names[at:])


def _counts(owner: np.ndarray, code: np.ndarray, n_rows: int, n_codes: int,
            binary: bool = False) -> sp.csr_matrix:
    """``[n_rows, n_codes]`` event counts (binary: presence) of ``(owner, code)`` pairs, code -1
    skipped; sorted indices."""
    ok = code >= 0
    mat = sp.csr_matrix((np.ones(int(ok.sum())), (owner[ok], code[ok])),
                        shape=(n_rows, max(n_codes, 1)))
    mat.sum_duplicates()
    if binary:
        mat.data[:] = 1.0
    mat.sort_indices()
    return mat


def _sq_norms(mat: sp.csr_matrix) -> np.ndarray:
    return np.asarray(mat.multiply(mat).sum(axis=1), dtype=np.float64).ravel()


def _top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Mask of each row's ``k`` largest positive entries; ties at the cut go to the lower column."""
    k = min(k, sim.shape[1])
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
    take = (sim >= kth) & (sim > 0)
    over = np.flatnonzero(take.sum(axis=1) > k)  # rows with ties at the cut
    if len(over):
        sub, cut = sim[over], kth[over]
        keep = sub > cut
        eq = sub == cut
        keep |= eq & (np.cumsum(eq, axis=1) <= k - keep.sum(axis=1, keepdims=True))
        take[over] = keep & (sub > 0)
    return take


@dataclass
class NeighbourIndex:
    """Fitted user profiles of one history (see the module docstring)."""

    k: int
    n_users: int
    codes: dict[str, np.ndarray] = field(repr=False)
    """block -> int64 code per item (-1 = missing); ``item`` is the item id itself."""
    sizes: dict[str, int] = field(repr=False)
    sim_blocks: tuple[str, ...]
    profiles_t: dict[str, sp.csr_matrix] = field(repr=False)
    """similarity block -> ``[size, n_users]`` counts (binary for ``item``) of the whole
    history, transposed."""
    sq_norms: dict[str, np.ndarray] = field(repr=False)
    shares: dict[str, sp.csr_matrix] = field(repr=False)
    """feature block -> ``[n_users, size]`` shares ``p_b(v, x)`` (``item``: presence)."""
    rel_price: np.ndarray = field(repr=False)
    """price_vs_leaf per item, NaN without a price."""
    user_price: np.ndarray = field(repr=False)
    """``m_v`` per user (0 without priced events)."""
    user_priced: np.ndarray = field(repr=False)
    """1.0 where the user has priced events."""
    _dense: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    """similarity block -> dense ``profiles_t`` (small blocks only; built on first use)."""
    _cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, init=False,
                                                                      repr=False)
    """(indptr [n_users + 1], neighbour users, similarities): the neighbours of each user's
    whole history (:meth:`cache_users`)."""

    def cache_users(self, users: np.ndarray, owner: np.ndarray, item: np.ndarray) -> None:
        """Compute and keep the neighbours of these users' histories (row ``j``: ``users[j]``
        with the events ``owner == j``), normally each user's whole history. :meth:`features`
        then reads them for the requests it is told are such rows (``cached``) instead of
        scoring those users against everyone again: a serving request is usually made after
        all of its user's history. The entries are the ones :meth:`neighbours` computes (a
        request's neighbours never depend on its batch)."""
        users = np.asarray(users, np.int64)
        r, c, v = self._neighbour_entries(users, owner, item)
        counts = np.zeros(self.n_users, np.int64)
        ok = (users >= 0) & (users < self.n_users)
        counts[users[ok]] = np.bincount(r, minlength=len(users))[ok]
        by_user = np.argsort(users[r], kind="stable")  # a user's entries stay in column order
        self._cached = (np.r_[0, np.cumsum(counts)], c[by_user], v[by_user])

    def _dense_profiles(self, b: str) -> np.ndarray | None:
        """``profiles_t[b]`` as a dense ``[size, n_users]`` float64 matrix, None when it has more
        than :data:`DENSE_CELLS` cells."""
        if b not in self._dense:
            prof = self.profiles_t[b]
            if prof.shape[0] * prof.shape[1] > DENSE_CELLS:
                return None
            self._dense[b] = prof.toarray().astype(np.float64)
        return self._dense[b]

    @classmethod
    def fit(cls, user: np.ndarray, item: np.ndarray, n_users: int, n_items: int,
            codes: Mapping[str, np.ndarray], sim_blocks: tuple[str, ...], rel_price: np.ndarray,
            k: int) -> NeighbourIndex:
        """Index the history events ``(user, item)``; ``codes`` maps each block (``leaf``,
        ``parent``, ``brand``, ``attr_<col>``) to the int64 code per item, ``sim_blocks`` names
        the blocks (``item`` included) of the similarity; ``rel_price`` is ``price_vs_leaf`` per
        item, NaN where the item has no price."""
        all_codes = {**codes, "item": np.arange(n_items, dtype=np.int64)}
        sizes = {b: int(c.max()) + 1 if len(c) and c.max() >= 0 else 0
                 for b, c in all_codes.items()}
        blocks = tuple(b for b in sim_blocks if sizes[b] > 0)
        n_ev = np.bincount(user, minlength=n_users).astype(np.float64)
        inv = sp.diags(np.divide(1.0, n_ev, out=np.zeros(n_users), where=n_ev > 0))
        profiles, shares = {}, {}
        for b, c in all_codes.items():
            counts = _counts(user, c[item], n_users, sizes[b], binary=b == "item")
            profiles[b] = counts
            share = counts if b == "item" else sp.csr_matrix(inv @ counts)  # item: presence
            share.sort_indices()
            shares[b] = share
        priced = np.isfinite(rel_price[item])
        pu, pv = user[priced], rel_price[item][priced]
        order = np.lexsort((pv, pu))  # canonical summation order: by user, then by value
        p_sum = np.zeros(n_users)
        if len(order):
            su = pu[order]
            starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
            p_sum[su[starts]] = np.add.reduceat(pv[order], starts)
        p_n = np.bincount(pu, minlength=n_users).astype(np.float64)
        return cls(
            k=int(k), n_users=n_users, codes=all_codes, sizes=sizes, sim_blocks=blocks,
            profiles_t={b: sp.csr_matrix(profiles[b].T) for b in blocks},
            sq_norms={b: _sq_norms(profiles[b]) for b in blocks},
            shares=shares, rel_price=rel_price,
            user_price=np.divide(p_sum, p_n, out=np.zeros(n_users), where=p_n > 0),
            user_priced=(p_n > 0).astype(np.float64),
        )

    def neighbours(self, user: np.ndarray, owner: np.ndarray, item: np.ndarray
                   ) -> sp.csr_matrix:
        """``[R, n_users]`` similarities ``s_v`` of each request's neighbours (other entries 0);
        ``user`` the requesting users (-1 = unknown), ``(owner, item)`` their events ``<= t``."""
        r, c, v = self._neighbour_entries(user, owner, item)
        return sp.csr_matrix((v, c, np.r_[0, np.cumsum(np.bincount(r, minlength=len(user)))]),
                             shape=(len(user), self.n_users))

    def _neighbour_entries(self, user: np.ndarray, owner: np.ndarray, item: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`neighbours` as (request, user, similarity) entries sorted by request, then
        user. Plain array code (sorts, gathers, bincounts) rather than scipy products: a
        serving request has one row, where scipy's per-call overhead was most of the cost."""
        nr = len(user)
        queries = {b: _query_counts(owner, self.codes[b][item], self.sizes[b], b == "item")
                   for b in self.sim_blocks}
        q_norms = {b: np.bincount(q[0], weights=q[2] ** 2, minlength=nr)
                   for b, q in queries.items()}
        step = max(1, SIM_CELLS // max(self.n_users, 1))
        rows: list[np.ndarray] = [np.zeros(0, np.int64)]
        cols: list[np.ndarray] = [np.zeros(0, np.int64)]
        vals: list[np.ndarray] = [np.zeros(0, np.float64)]
        for lo in range(0, nr if self.sim_blocks and self.n_users else 0, step):
            hi = min(lo + step, nr)
            sim = np.zeros((hi - lo) * self.n_users, dtype=np.float32)  # halves the selection
            for b in self.sim_blocks:  # in a fixed block order: a canonical sum
                q_row, q_code, q_count = queries[b]
                a, z = np.searchsorted(q_row, [lo, hi])
                # <n_b(q), n_b(v)>: sums of small integers, exact in any order (so the dense
                # product and the sparse expansion give the same bits)
                dense = self._dense_profiles(b)
                if dense is not None:  # whole rows: no per-cell indexing
                    q = np.zeros((hi - lo, dense.shape[0]))
                    q[q_row[a:z] - lo, q_code[a:z]] = q_count[a:z]
                    dots2 = q @ dense
                    norms = np.sqrt(q_norms[b][lo:hi, None] * self.sq_norms[b][None, :])
                    # the cells without a dot product add 0 (both norms are > 0 where one is)
                    sim += np.divide(dots2, norms, out=np.zeros_like(dots2),
                                     where=dots2 != 0).astype(np.float32).ravel()
                    continue
                prof = self.profiles_t[b]
                k, other = _expand(prof.indptr, q_code[a:z])
                dots = np.bincount((q_row[a:z][k] - lo) * self.n_users + prof.indices[other],
                                   weights=q_count[a:z][k] * prof.data[other],
                                   minlength=(hi - lo) * self.n_users)
                cell = np.flatnonzero(dots)
                row, col = np.divmod(cell, self.n_users)
                sim[cell] += (dots[cell] / np.sqrt(
                    q_norms[b][lo + row] * self.sq_norms[b][col])).astype(np.float32)
            sim /= np.float32(len(self.sim_blocks))
            sim2 = sim.reshape(hi - lo, self.n_users)
            u = user[lo:hi]
            own = (u >= 0) & (u < self.n_users)
            sim2[np.flatnonzero(own), u[own]] = 0.0  # never the user's own (whole-history) profile
            r, c = np.nonzero(_top_k(sim2, self.k))
            rows.append(r + lo)
            cols.append(c)
            vals.append(sim2[r, c].astype(np.float64))
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def _entries(self, user: np.ndarray, owner: np.ndarray, item: np.ndarray,
                 cached: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_neighbour_entries`, read from :meth:`cache_users`'s table for the rows
        ``cached`` marks (their events are their user's cached history)."""
        if cached is None or self._cached is None or not cached.any():
            return self._neighbour_entries(user, owner, item)
        fresh = np.flatnonzero(~cached)
        new_row = np.full(len(user), -1, np.int64)
        new_row[fresh] = np.arange(len(fresh))
        keep = new_row[owner] >= 0
        r1, c1, v1 = self._neighbour_entries(user[fresh], new_row[owner[keep]], item[keep])
        hit = np.flatnonzero(cached)
        indptr, cols, sims = self._cached
        k, at = _expand(indptr, user[hit])
        r = np.concatenate([fresh[r1], hit[k]])
        c = np.concatenate([c1, cols[at]])
        order = np.lexsort((c, r))  # by request, then user: as computed in one go
        return r[order], c[order], np.concatenate([v1, sims[at]])[order]

    def features(self, user: np.ndarray, owner: np.ndarray, item: np.ndarray,
                 rf: np.ndarray, cand: np.ndarray, attributes: list[str],
                 cached: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every neighbourhood feature over the flattened pairs (``rf`` request, ``cand`` item of
        each pair); ``cached``: requests whose events are their user's history given to
        :meth:`cache_users` (their neighbours are read, not computed)."""
        nr = len(user)
        r, c, s = self._entries(user, owner, item, cached)
        n_nbr = np.bincount(r, minlength=nr).astype(np.float64)
        w_sum = np.bincount(r, weights=s, minlength=nr)  # in user order
        wn = s * np.divide(1.0, w_sum, out=np.zeros(nr), where=w_sum > 0)[r]
        f = {"nbr_sim": np.divide(w_sum, n_nbr, out=np.zeros(nr), where=n_nbr > 0)[rf]}
        blocks = ["leaf", "parent", "brand", *(f"attr_{c}" for c in attributes), "item"]
        for b in blocks:
            share = self.shares[b]
            size = max(self.sizes[b], 1)
            k, at = _expand(share.indptr, c)
            keys = r[k] * size + share.indices[at]
            terms = wn[k] * share.data[at]
            order = np.argsort(keys, kind="stable")  # per key: the neighbours in user order
            keys, terms = keys[order], terms[order]
            code = self.codes[b][cand]
            out = np.zeros(len(cand))
            if len(keys):
                starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
                keys, values = keys[starts], np.add.reduceat(terms, starts)
                out = np.where(code >= 0, lookup(keys, values, rf * size + np.maximum(code, 0),
                                                 nr * size), 0.0)
            f[f"nbr_{b}_share"] = out
        priced_w = np.bincount(r, weights=wn * self.user_priced[c], minlength=nr)
        mean = np.divide(np.bincount(r, weights=wn * (self.user_price * self.user_priced)[c],
                                     minlength=nr),
                         priced_w, out=np.zeros(nr), where=priced_w > 0)
        rp = self.rel_price[cand]
        ok = np.isfinite(rp) & (priced_w[rf] > 0)
        f["nbr_rel_price_gap"] = np.where(ok, np.nan_to_num(rp) - mean[rf], 0.0)
        f["nbr_rel_price_abs_gap"] = np.abs(f["nbr_rel_price_gap"])
        return f


def _query_counts(owner: np.ndarray, code: np.ndarray, size: int, binary: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The requests' profiles ``n_b(q)`` as (request, code, count) entries sorted by request,
    then code (code -1 skipped; ``binary``: presence)."""
    ok = code >= 0
    keys, counts = np.unique(owner[ok] * max(size, 1) + code[ok], return_counts=True)
    row, col = np.divmod(keys, max(size, 1))
    return row, col, (np.ones(len(keys)) if binary else counts.astype(np.float64))


def _expand(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every stored entry of the CSR rows ``rows[k]``: ``(k, its position in the data)``."""
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    k = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    offsets = np.cumsum(lengths) - lengths
    return k, np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
