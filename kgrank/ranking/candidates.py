"""Candidate generation: the union of every source's top-N per request, history masked.

A *source* is any scorer over the catalog (``rows [B] -> scores [B, n_items]``, higher is better):
the fusion towers, a graph model, the transition model, ItemKNN, popularity, a query matcher. For
each request row, :func:`generate_candidates` masks the request's history, takes each source's
top-N and unions them. For every candidate it then gathers **every** source's score (not only the
sources that proposed it) plus its rank in each source's list, so that the learning-to-rank stage
sees the full picture. ``extra`` sources are gathered as features but propose no candidates.

Ordering and ties. Candidates of a row are ordered by their best rank over the sources, then by
their position in a seeded random permutation of the catalog -- never by item id, whose order can
carry artifacts (e.g. ASIN order on Amazon). Ties inside a source's top-N are broken the same way:
``torch.topk`` runs on the permuted columns, so whichever tied item it prefers depends on the
random position, not on the id.

Ranking cannot beat candidate recall: :meth:`Candidates.recall_by_source` reports, per source and
for the union, the share of requests whose target made it into the candidates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

SourceFn = Callable[[np.ndarray], torch.Tensor]
"""Maps a batch of request rows [B] to scores over all items [B, n_items] (higher is better)."""

NON_CANDIDATE_SCORE = -1.0e9
"""Score :func:`full_scores` gives items that are not candidates (candidates get >= 0)."""


@dataclass
class Candidates:
    """Candidate items of ``R`` requests, padded to ``C`` columns with item ``-1``."""

    items: np.ndarray
    """int64 [R, C] item ids; ``-1`` marks padding."""
    scores: dict[str, np.ndarray]
    """source -> float32 [R, C]: the source's score at each candidate (candidate and ``extra``
    sources alike). Non-finite source values become NaN (missing for LightGBM); padding is 0."""
    ranks: dict[str, np.ndarray]
    """candidate source -> int16 [R, C] (int32 when ``n`` >= 2**15): 0-based rank of the
    candidate in the source's top-N, ``n`` when it is not in that top-N (and in padding). Kept
    narrow: a part holds one per source (on Amazon Beauty 22k requests x ~500 columns each)."""
    n_sources_hit: np.ndarray
    """int16 [R, C]: number of candidate sources whose top-N contains the item (0 in padding)."""
    n: int
    """Top-N taken from each candidate source (clipped to the catalog size)."""

    @property
    def valid(self) -> np.ndarray:
        """bool [R, C]: True where a cell holds a candidate (not padding)."""
        return self.items >= 0

    @property
    def sources(self) -> list[str]:
        """Names of the candidate sources (those that proposed candidates)."""
        return list(self.ranks)

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def take(self, rows: np.ndarray | slice) -> Candidates:
        """The candidates of a subset of the requests (same column layout)."""
        return Candidates(
            self.items[rows],
            {k: v[rows] for k, v in self.scores.items()},
            {k: v[rows] for k, v in self.ranks.items()},
            self.n_sources_hit[rows],
            self.n,
        )

    def _match(self, targets: np.ndarray) -> np.ndarray:
        targets = np.asarray(targets, dtype=np.int64)
        if targets.shape != (len(self),):
            raise ValueError(f"targets has shape {targets.shape}, expected ({len(self)},)")
        return (self.items == targets[:, None]) & self.valid

    def labels(self, targets: np.ndarray) -> np.ndarray:
        """int8 [R, C]: 1 where the candidate is the request's target item, else 0."""
        return self._match(targets).astype(np.int8)

    def hits(self, targets: np.ndarray) -> np.ndarray:
        """bool [R]: whether each request's target item (int64 [R], ``-1``: none) is a
        candidate."""
        return np.asarray(self._match(targets).any(axis=1))

    def recall(self, targets: np.ndarray) -> float:
        """Share of requests whose target item is among its candidates."""
        return float(self.hits(targets).mean()) if len(self) else float("nan")

    def recall_by_source(self, targets: np.ndarray, at: int | None = None) -> dict[str, float]:
        """Candidate recall@``at`` (default ``n``) of each candidate source and of their union.

        ``{source: share of requests whose target is in that source's top-at, ...,
        "union": share whose target is in at least one source's top-at}``. The union at ``n`` is
        :meth:`recall`. ``at`` must not exceed ``n`` (deeper lists were never taken).
        """
        at = self.n if at is None else at
        if not 0 < at <= self.n:
            raise ValueError(f"recall cut-off at={at} must be in 1..n={self.n}")
        match = self._match(targets)
        if not len(self):
            return {**{s: float("nan") for s in self.ranks}, "union": float("nan")}
        out: dict[str, float] = {}
        union = np.zeros_like(match)
        for source, rank in self.ranks.items():
            inside = rank < at
            union |= inside
            out[source] = float((match & inside).any(axis=1).mean())
        out["union"] = float((match & union).any(axis=1).mean())
        return out


def rank_dtype(top: int) -> type[np.signedinteger[Any]]:
    """The narrowest of int16 / int32 that holds ranks ``0..top``."""
    return np.int16 if top < np.iinfo(np.int16).max else np.int32


@functools.lru_cache(maxsize=8)
def _permutation(n_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random order of the catalog that breaks ties, and its inverse (read-only;
    kept: a serving batch would otherwise redraw it, ~0.15 ms)."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n_items)
    return perm, inv


def _check_scores(name: str, scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(scores.shape) != shape:
        raise ValueError(f"source {name!r} returned scores of shape {tuple(scores.shape)}, "
                         f"expected {shape}")
    return scores.detach().to(device="cpu", dtype=torch.float32)


def _gather(full: torch.Tensor, cand: torch.Tensor, pad: torch.Tensor) -> np.ndarray:
    """full[b, cand[b, j]] as float32 numpy; non-finite -> NaN, padding -> 0."""
    values = full.gather(1, cand)
    values = torch.where(torch.isfinite(values), values, torch.nan)
    return values.masked_fill_(pad, 0.0).numpy()


def generate_candidates(
    sources: Mapping[str, SourceFn],
    rows: np.ndarray,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    n: int,
    batch_size: int = 1024,
    progress: bool = True,
    extra: Mapping[str, SourceFn] | None = None,
    seed: int = 0,
) -> Candidates:
    """Union of each source's top-``n`` per request row, with the request's history masked.

    Args:
        sources: name -> scorer; each proposes its top-``n`` non-excluded items per row. Items a
            source scores ``-inf`` (or NaN) are never proposed by it.
        rows: the request rows [R]; passed in batches of ``batch_size`` to every scorer.
        exclude: ``(offsets [R + 1], items)`` CSR of the items never to propose per row (the
            request's history), in the order of ``rows``; None: nothing excluded.
        n: top-N per source (clipped to the catalog size).
        batch_size: rows per batch; memory is about ``batch_size * n_items * 4`` bytes per source.
        progress: show a progress bar.
        extra: name -> scorer gathered at the candidates as features only (proposes nothing).
        seed: seed of the catalog permutation that breaks ties (see the module docstring).

    Returns:
        :class:`Candidates`, ordered per row by best rank over the sources, then by the random
        permutation position.
    """
    if not sources:
        raise ValueError("generate_candidates needs at least one candidate source")
    extra = dict(extra or {})
    if overlap := sorted(set(sources) & set(extra)):
        raise ValueError(f"sources and extra share the names {overlap}")
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n ({n}) and batch_size ({batch_size}) must be positive")
    rows = np.asarray(rows)
    n_rows = len(rows)
    if exclude is not None:
        offsets = np.asarray(exclude[0], dtype=np.int64)
        ex_items = np.asarray(exclude[1], dtype=np.int64)
        if offsets.shape != (n_rows + 1,) or offsets[0] != 0 or offsets[-1] != len(ex_items):
            raise ValueError(f"exclude offsets must have {n_rows + 1} entries from 0 to "
                             f"{len(ex_items)} (CSR of the {n_rows} rows)")
    chunks: list[dict[str, np.ndarray]] = []
    n_items = -1
    top = n
    perm = inv = torch.empty(0, dtype=torch.long)
    names = list(sources)
    for lo in tqdm(range(0, n_rows, batch_size), desc="candidates", disable=not progress,
                   leave=False):
        hi = min(lo + batch_size, n_rows)
        b = hi - lo
        batch = rows[lo:hi]
        with torch.no_grad():
            full: dict[str, torch.Tensor] = {}
            for name in names:
                scores = sources[name](batch)
                if n_items < 0:  # first batch: the catalog size is what the sources return
                    if scores.dim() != 2:
                        raise ValueError(f"source {name!r} returned a {scores.dim()}-D tensor")
                    n_items = int(scores.shape[1])
                    top = min(n, n_items)
                    perm, inv = _permutation(n_items, seed)
                full[name] = _check_scores(name, scores, (b, n_items))
            if exclude is not None:
                ex_rows = torch.from_numpy(np.repeat(np.arange(b), np.diff(offsets[lo : hi + 1])))
                ex_cols = inv[torch.from_numpy(ex_items[offsets[lo] : offsets[hi]])]
            best = torch.full((b, n_items), top, dtype=torch.int32)
            n_hit = torch.zeros((b, n_items), dtype=torch.int16)
            tops: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
            for name in names:
                # Columns in the random order, so topk's choice among ties ignores item ids.
                masked = full[name].index_select(1, perm)
                masked.nan_to_num_(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
                # proposes nothing (e.g. no query): no top-N (a max, not a [b, n_items] compare)
                if masked.numel() == 0 or not bool(masked.amax() > -torch.inf):
                    tops[name] = None
                    continue
                if exclude is not None:
                    masked[ex_rows, ex_cols] = -torch.inf
                vals, pos = torch.topk(masked, top, dim=1)
                del masked
                ok = vals > -torch.inf
                idx = perm[pos]
                rank = torch.arange(top, dtype=torch.int32).expand(b, top).masked_fill(~ok, top)
                best.scatter_reduce_(1, idx, rank, reduce="amin")
                n_hit.scatter_add_(1, idx, ok.to(torch.int16))
                tops[name] = (idx, rank)
            is_cand = best < top
            width = max(int(is_cand.sum(dim=1).max()), 1)
            # best rank first, then the random permutation position (unique per item)
            key = best.to(torch.int64) * n_items + inv
            key.masked_fill_(~is_cand, torch.iinfo(torch.int64).max)
            _, cand = torch.topk(key, width, dim=1, largest=False)
            pad = ~is_cand.gather(1, cand)
            del key, best, is_cand
            chunk: dict[str, np.ndarray] = {
                "items": cand.masked_fill(pad, -1).numpy(),
                "n_hit": n_hit.gather(1, cand).masked_fill_(pad, 0).numpy(),
            }
            del n_hit
            rank_buf = torch.empty((b, n_items), dtype=torch.int32)
            for name in names:
                picked = tops[name]
                if picked is None:
                    chunk[f"rank/{name}"] = np.full(tuple(cand.shape), top, rank_dtype(top))
                else:
                    rank_buf.fill_(top).scatter_(1, *picked)
                    chunk[f"rank/{name}"] = (
                        rank_buf.gather(1, cand).masked_fill_(pad, top).numpy().astype(
                            rank_dtype(top))
                    )
                chunk[f"score/{name}"] = _gather(full.pop(name), cand, pad)
            for name, fn in extra.items():
                chunk[f"score/{name}"] = _gather(
                    _check_scores(name, fn(batch), (b, n_items)), cand, pad
                )
        chunks.append(chunk)
    return _assemble(chunks, names, list(extra), n_rows, top)


def _assemble(chunks: list[dict[str, np.ndarray]], names: list[str], extra: list[str],
              n_rows: int, top: int) -> Candidates:
    """Concatenate per-batch arrays, padding every batch to the widest one."""
    width = max((c["items"].shape[1] for c in chunks), default=0)
    fills: dict[str, tuple[float, type[np.generic]]] = {"items": (-1, np.int64),
                                                         "n_hit": (0, np.int16)}
    for name in names:
        fills[f"rank/{name}"] = (top, rank_dtype(top))
    for name in names + extra:
        fills[f"score/{name}"] = (0.0, np.float32)
    out: dict[str, np.ndarray] = {}
    for key, (fill, dtype) in fills.items():
        arr = np.full((n_rows, width), fill, dtype=dtype)
        lo = 0
        for chunk in chunks:
            part = chunk.pop(key)  # free each batch's copy as soon as it is placed
            arr[lo : lo + len(part), : part.shape[1]] = part
            lo += len(part)
        out[key] = arr
    return Candidates(
        items=out["items"],
        scores={name: out[f"score/{name}"] for name in names + extra},
        ranks={name: out[f"rank/{name}"] for name in names},
        n_sources_hit=out["n_hit"],
        n=top,
    )


def candidate_recall(
    candidates: Candidates, targets: np.ndarray, ats: tuple[int, ...] | list[int] | None = None
) -> dict[str, float]:
    """Flat recall report for several cut-offs: ``{"<source>@<at>": value, "union@<at>": ...}``.

    Cut-offs above ``candidates.n`` are skipped (those lists were never taken); default: ``n``.
    """
    out: dict[str, float] = {}
    for at in sorted(set(ats or [candidates.n])):
        if 0 < at <= candidates.n:
            for source, value in candidates.recall_by_source(targets, at).items():
                out[f"{source}@{at}"] = value
    return out


def full_scores(
    candidates: Candidates,
    item_scores: np.ndarray,
    n_items: int,
    rows: np.ndarray | slice | None = None,
) -> torch.Tensor:
    """A full-catalog score matrix [R, n_items] for :func:`kgrank.eval.protocol.evaluate`.

    Candidates get their score (e.g. the LTR score) minus the row's lowest candidate score, so
    they are all ``>= 0`` and keep their order (up to float32 resolution: differences are kept
    relative to the row's range, not to the scores' magnitude); every other item gets
    :data:`NON_CANDIDATE_SCORE`, below all candidates. Padding cells are ignored.

    Args:
        candidates: the candidates, [R, C].
        item_scores: float [R, C] scores of the candidates; must be finite at valid cells.
        n_items: catalog size.
        rows: only build these rows (e.g. a batch of a scorer); scores are indexed the same way.
    """
    item_scores = np.asarray(item_scores, dtype=np.float64)
    if item_scores.shape != candidates.items.shape:
        raise ValueError(f"item_scores has shape {item_scores.shape}, candidates "
                         f"{candidates.items.shape}")
    items = candidates.items
    if rows is not None:
        items, item_scores = items[rows], item_scores[rows]
    valid = items >= 0
    if not np.isfinite(item_scores[valid]).all():
        raise ValueError("item_scores must be finite at every candidate")
    if valid.any() and int(items.max()) >= n_items:
        raise ValueError(f"candidate item {int(items.max())} outside the catalog of {n_items}")
    low = np.where(valid, item_scores, np.inf).min(axis=1, keepdims=True)
    shifted = np.where(valid, item_scores - np.where(np.isfinite(low), low, 0.0), 0.0)
    out = torch.full((len(items), n_items), NON_CANDIDATE_SCORE, dtype=torch.float32)
    r, c = np.nonzero(valid)
    out[torch.from_numpy(r), torch.from_numpy(items[r, c])] = torch.from_numpy(
        shifted[r, c].astype(np.float32)
    )
    return out
