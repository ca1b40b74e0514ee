"""Vectorized full-ranking top-k metrics for implicit-feedback recommendation.

Every user is scored against the whole catalog. The caller masks the items that
must not be ranked (typically the user's training interactions) by setting their
scores to ``-inf``, and randomizes ties if it wants that. :func:`topk_hits` then
takes the top-K list per user and marks which positions hold a ground-truth item.
:func:`metrics_from_hits` turns that boolean hit matrix into per-user values of
NDCG, Recall, HR, Precision and MRR for several cut-offs at once, using cumulative
sums over the hit matrix (no Python loop over users).

Definitions, for one user with ground-truth set ``G`` and cut-off ``k``, where
``r`` is a 1-based rank in the user's top-k list:

* ``DCG@k  = sum over the ranks r <= k that hold an item of G of 1 / log2(r + 1)``
* ``IDCG@k = sum_{r=1}^{min(|G|, k)} 1 / log2(r + 1)``, i.e. the ideal DCG is
  computed from the size of the ground-truth set, as RecBole and KGIN do, not
  from the relevant items that happen to be rankable.
* ``NDCG@k = DCG@k / IDCG@k``
* ``Recall@k = (#hits in the top k) / |G|`` (RecBole definition; not divided by
  ``min(|G|, k)``)
* ``HR@k = 1`` if at least one hit is in the top k, else ``0``
* ``Precision@k = (#hits in the top k) / k``
* ``MRR@k = 1 / (rank of the first hit)`` if a hit is in the top k, else ``0``

Averages over users, bootstrap confidence intervals (:func:`bootstrap_ci`) and
catalog coverage (:func:`item_coverage`) are computed from these per-user values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "METRIC_NAMES",
    "bootstrap_ci",
    "bootstrap_many",
    "paired_bootstrap_ci",
    "item_coverage",
    "metrics_from_hits",
    "topk_hits",
]

METRIC_NAMES: tuple[str, ...] = ("ndcg", "recall", "hr", "precision", "mrr")

# Upper bound on the number of elements of one bootstrap index chunk. The chunk
# holds int64 indices plus the gathered float64 values (16 bytes per element), so
# 2**23 elements keep the working set near 128 MiB whatever the number of users.
_BOOT_CHUNK_ELEMENTS = 1 << 23


def topk_hits(
    scores: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k item indices per user and which of them are relevant.

    Args:
        scores: float ``[B, N]`` scores, already masked (excluded items set to ``-inf``).
        targets: bool ``[B, N]`` relevance (the user's ground-truth items).
        k: list length; clipped to ``N``.

    Returns:
        ``(topk_idx, hits)``: ``topk_idx`` long ``[B, k]`` sorted by decreasing score
        and ``hits`` bool ``[B, k]`` with ``hits[b, r] = targets[b, topk_idx[b, r]]``.
        A position filled by a ``-inf``-masked item (which only happens when a user
        has fewer than ``k`` unmasked items) never counts as a hit.

    Raises:
        ValueError: on shape mismatch, non-2-D input, ``k < 1`` or NaN scores.
        TypeError: if ``targets`` is not bool or ``scores`` not floating point.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [B, N], got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != scores shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating point tensor, got {scores.dtype}")
    if targets.dtype != torch.bool:
        raise TypeError(f"targets must be a bool tensor, got {targets.dtype}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")

    k_eff = min(int(k), scores.shape[1])
    values, topk_idx = torch.topk(scores, k_eff, dim=1, largest=True, sorted=True)
    hits = torch.gather(targets, 1, topk_idx) & (values != float("-inf"))
    return topk_idx, hits


def metrics_from_hits(
    hits: torch.Tensor, n_relevant: torch.Tensor, ks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Per-user NDCG, Recall, HR, Precision and MRR for every cut-off in ``ks``.

    Args:
        hits: bool ``[B, K]`` hit matrix of the top-K ranked items (``K >= max(ks)``).
            A cut-off ``k > K`` is accepted and treats ranks beyond ``K`` as misses,
            which is exact when ``K`` is the whole catalog (``k`` was clipped to ``N``);
            Precision@k still divides by ``k`` and IDCG@k still uses ``min(|G|, k)``.
        n_relevant: long or float ``[B]`` size of each user's ground-truth set (``>= 1``).
        ks: cut-offs, each ``>= 1``.

    Returns:
        ``{f"{name}@{k}": float32 tensor [B]}`` for every name in :data:`METRIC_NAMES`
        and every ``k`` in ``ks``, on the device of ``hits``.

    Raises:
        ValueError: if a user has ``n_relevant < 1``, on shape mismatch or bad ``ks``.
        TypeError: if ``hits`` is not bool.
    """
    if hits.dim() != 2:
        raise ValueError(f"hits must be 2-D [B, K], got shape {tuple(hits.shape)}")
    if hits.dtype != torch.bool:
        raise TypeError(f"hits must be a bool tensor, got {hits.dtype}")
    n_users, width = hits.shape
    if n_relevant.dim() != 1 or n_relevant.shape[0] != n_users:
        raise ValueError(f"n_relevant must have shape [{n_users}], got {tuple(n_relevant.shape)}")
    ks_list = [int(k) for k in ks]
    if any(k < 1 for k in ks_list):
        raise ValueError(f"all cut-offs must be >= 1, got {ks_list}")

    device = hits.device
    n_rel = n_relevant.to(device=device, dtype=torch.float64)
    if bool((n_rel < 1).any()):
        raise ValueError(
            "every user needs n_relevant >= 1 (got 0 or less); filter users without test items"
        )
    if not ks_list:
        return {}

    max_k = max(ks_list)
    # discount[r - 1] = 1 / log2(r + 1) for 1-based ranks r = 1..max(K, max_k)
    ranks = torch.arange(1, max(width, max_k) + 1, device=device, dtype=torch.float64)
    discount = 1.0 / torch.log2(ranks + 1.0)

    h = hits.to(torch.float64)
    zero_col = torch.zeros(n_users, 1, device=device, dtype=torch.float64)
    # Column j of the padded cumulative sums covers the first j ranks (column 0: none).
    cum_hits = torch.cat([zero_col, h.cumsum(dim=1)], dim=1)
    cum_dcg = torch.cat([zero_col, (h * discount[:width]).cumsum(dim=1)], dim=1)
    cum_idcg = torch.cat([discount.new_zeros(1), discount.cumsum(dim=0)])

    # 1-based rank of the first hit; width + 1 when the user has no hit at all.
    first_rank = torch.full((n_users,), width + 1, device=device, dtype=torch.long)
    if width > 0:
        rank_pos = torch.arange(1, width + 1, device=device, dtype=torch.long)
        first_rank = torch.where(hits, rank_pos, first_rank[:, None]).amin(dim=1)
    reciprocal = 1.0 / first_rank.to(torch.float64)
    zeros = torch.zeros_like(reciprocal)

    out: dict[str, torch.Tensor] = {}
    for k in ks_list:  # loop over cut-offs only; every op is over all users at once
        col = min(k, width)
        n_hits = cum_hits[:, col]
        ideal_len = torch.clamp(n_rel, max=float(k)).round().long()
        idcg = cum_idcg[ideal_len]
        values = {
            "ndcg": cum_dcg[:, col] / idcg,
            "recall": n_hits / n_rel,
            "hr": (n_hits > 0).to(torch.float64),
            "precision": n_hits / float(k),
            "mrr": torch.where(first_rank <= col, reciprocal, zeros),
        }
        for name in METRIC_NAMES:
            out[f"{name}@{k}"] = values[name].to(torch.float32)
    return out


def bootstrap_ci(
    values: torch.Tensor | npt.NDArray[Any],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap confidence interval over users.

    Users are resampled with replacement ``n_boot`` times; the interval is the
    ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the resampled means. Index
    matrices are drawn in chunks of at most ``2**23`` elements, so memory stays
    around 128 MiB (e.g. 25k users x 1000 resamples). Deterministic given ``seed``.

    Args:
        values: per-user metric values, any shape (flattened), at least one value.
        n_boot: number of bootstrap resamples; ``0`` skips the interval.
        alpha: two-sided miss rate, in ``(0, 1)``.
        seed: seed of the numpy generator.

    Returns:
        ``(mean, low, high)``; ``(mean, nan, nan)`` when ``n_boot == 0``.
    """
    if isinstance(values, torch.Tensor):
        arr = values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    n = arr.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")

    mean = float(arr.mean())
    if n_boot == 0:
        return mean, math.nan, math.nan

    _, lows, highs = bootstrap_many(arr[None, :], n_boot=n_boot, alpha=alpha, seed=seed)
    return mean, float(lows[0]), float(highs[0])


def bootstrap_many(
    values: npt.NDArray[Any], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Bootstrap CIs of several per-user metrics at once, sharing the resamples.

    ``values`` is ``[M, n]`` (M metrics over the same n users). Each resample is turned into
    per-user counts (``bincount``), so all M resampled means are one matrix product instead of M
    gathers. Returns ``(means, lows, highs)``, each ``[M]``; NaN intervals when ``n_boot == 0``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 2 or vals.shape[1] == 0:
        raise ValueError(f"values must be [M, n] with n >= 1, got shape {vals.shape}")
    n = vals.shape[1]
    means = vals.mean(axis=1)
    if n_boot == 0:
        nan = np.full(len(vals), math.nan)
        return means, nan, nan.copy()
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    boot = np.empty((len(vals), n_boot), dtype=np.float64)
    for start in range(0, n_boot, rows_per_chunk):
        rows = min(rows_per_chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))
        idx += (np.arange(rows) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)
        boot[:, start : start + rows] = vals @ counts.T.astype(np.float64) / n
    lows, highs = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0], axis=1)
    return means, lows, highs


def paired_bootstrap_ci(
    a: npt.NDArray[Any], b: npt.NDArray[Any], n_boot: int = 1000, alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same users and its paired bootstrap interval.

    Both models are scored on the same users, so the change between them is resampled user by
    user (one resample draws users, not two independent ones): much tighter than comparing two
    marginal intervals, and the usual significance check for an ablation (Sakai, "Statistical
    reform in information retrieval?", SIGIR Forum 2014). ``a`` and ``b`` are per-user values in
    the same user order.
    """
    a_arr = np.asarray(a, dtype=np.float64).reshape(-1)
    b_arr = np.asarray(b, dtype=np.float64).reshape(-1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired values differ in length: {a_arr.shape} vs {b_arr.shape}")
    return bootstrap_ci(a_arr - b_arr, n_boot=n_boot, alpha=alpha, seed=seed)


def item_coverage(topk_idx: torch.Tensor, n_items: int) -> float:
    """Share of the catalog that appears in at least one user's top-k list.

    Args:
        topk_idx: long ``[B, k]`` item indices in ``[0, n_items)``.
        n_items: catalog size, ``>= 1``.

    Returns:
        ``#distinct items in topk_idx / n_items``.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    flat = topk_idx.reshape(-1).long()
    if flat.numel() == 0:
        return 0.0
    if bool((flat < 0).any()) or bool((flat >= n_items).any()):
        raise ValueError(f"topk_idx holds indices outside [0, {n_items})")
    seen = torch.zeros(n_items, dtype=torch.bool, device=flat.device)
    seen[flat] = True
    return int(seen.sum().item()) / n_items
