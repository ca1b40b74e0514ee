"""The single judge: full-ranking evaluation of any scorer on a split, with CIs and groups.

Every model, baseline and ablation goes through :func:`evaluate`, so numbers in one report are
comparable. For each user with targets in the evaluated part, the scorer returns one score per
catalog item; the user's history items (train for ``valid``, train + valid for ``test``) are
masked; ties are broken by a fixed random permutation of the catalog (never by item id, whose order
can carry artifacts, e.g. ASIN order on Amazon); the top-K list is compared with the targets.

Reported: mean of each metric over users, a bootstrap 95% CI, the same for the "same-time" users
(target timestamp equals their latest history event) and the "later-time" users, and catalog
coverage. ``sampled_negatives`` ranks each user's targets only against that many random
non-history items; results are then labelled ``sampled`` and are not comparable to full ranking.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kgrank.config import EvalConfig
from kgrank.data.split import Part, Split
from kgrank.eval.metrics import bootstrap_many, metrics_from_hits, paired_bootstrap_ci

Scorer = Callable[[np.ndarray], torch.Tensor]
"""Maps a batch of user int ids [B] to scores over all items [B, n_items] (higher is better)."""


class Recommender(Protocol):
    """What :func:`tune_and_test` needs of a model: fit on a history, then score users."""

    def fit(self, history: pd.DataFrame, n_users: int, n_items: int) -> Any: ...

    def score(self, users: np.ndarray) -> torch.Tensor: ...


@dataclass
class EvalResult:
    """Metrics of one model on one part of a split."""

    name: str
    part: str
    n_users: int
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    groups: dict[str, dict[str, float]]
    group_sizes: dict[str, int]
    coverage: dict[str, float]
    per_user: dict[str, np.ndarray] = field(repr=False)
    sampled: bool = False

    def flat(self) -> dict[str, float]:
        """The metrics.json entry: flat keys with plain floats."""
        out: dict[str, float] = {"n_users": float(self.n_users)}
        for key, value in self.metrics.items():
            out[key] = value
            low, high = self.ci[key]
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
        for group, values in self.groups.items():
            out[f"{group}/n_users"] = float(self.group_sizes[group])
            for key, value in values.items():
                out[f"{group}/{key}"] = value
        out.update(self.coverage)
        return out


def user_items_csr(frame: pd.DataFrame, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, items) of each listed user's items in ``frame``, in the order of ``users``."""
    pos = pd.Index(users).get_indexer(frame["user_idx"])
    keep = pos >= 0
    order = np.argsort(pos[keep], kind="stable")
    items = frame["item_idx"].to_numpy()[keep][order]
    counts = np.bincount(pos[keep], minlength=len(users))
    return np.concatenate([[0], np.cumsum(counts)]), items


def _rows(offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.repeat(np.arange(hi - lo), np.diff(offsets[lo : hi + 1]))


def ranked_topk(
    scores: torch.Tensor, k: int, perm: torch.Tensor, inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, item ids) per row, ties broken by the random order ``perm``, not by id.

    Equivalent to ``topk(scores[:, perm])`` mapped back through ``perm``, but permutes only the
    rows whose k-th value is tied with an item outside the top k (a full column gather costs as
    much as the score product itself).
    """
    vals, idx = torch.topk(scores, k, dim=1)
    tied = (scores >= vals[:, -1:]).sum(dim=1) > k
    rows = torch.nonzero(tied).flatten()
    if len(rows):
        sub = scores[rows][:, perm]  # columns in the random order; a stable sort keeps it
        sub_idx = torch.argsort(sub, dim=1, descending=True, stable=True)[:, :k]
        vals[rows], idx[rows] = sub.gather(1, sub_idx), perm[sub_idx]
    # Within the list, equal scores follow the random order too.
    order = torch.argsort(inv[idx], dim=1, stable=True)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def evaluate(
    score_fn: Scorer,
    split: Split,
    part: Part,
    cfg: EvalConfig,
    name: str = "model",
    progress: bool = True,
) -> EvalResult:
    """Score every user with targets in ``part`` against the full catalog and average metrics."""
    targets = split.targets(part)
    history = split.history(part)
    users = np.unique(targets["user_idx"].to_numpy())
    if len(users) == 0:
        raise ValueError(f"split part {part!r} has no targets to evaluate")
    n_items = split.n_items
    ks = sorted(set(cfg.ks))
    top = min(max(ks), n_items)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n_items, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n_items)
    h_off, h_items = user_items_csr(history, users)
    t_off, t_items = user_items_csr(targets, users)
    per_user: dict[str, list[torch.Tensor]] = {}
    seen = torch.zeros(len(ks), n_items, dtype=torch.bool)
    for lo in tqdm(range(0, len(users), cfg.batch_size), desc=f"eval {name} [{part}]",
                   disable=not progress, leave=False):
        hi = min(lo + cfg.batch_size, len(users))
        with torch.no_grad():
            scores = score_fn(users[lo:hi]).float()
        if scores.shape != (hi - lo, n_items):
            raise ValueError(f"{name}: scorer returned {tuple(scores.shape)}, "
                             f"expected {(hi - lo, n_items)}")
        if torch.isnan(scores).any():
            raise ValueError(f"{name}: scorer returned NaN scores")
        hrow = torch.from_numpy(_rows(h_off, lo, hi))
        scores[hrow, torch.from_numpy(h_items[h_off[lo] : h_off[hi]])] = -torch.inf
        trow = torch.from_numpy(_rows(t_off, lo, hi))
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[trow, torch.from_numpy(t_items[t_off[lo] : t_off[hi]])] = True
        if cfg.sampled_negatives is not None:
            keep = torch.zeros_like(relevant)
            neg = torch.randint(0, n_items, (hi - lo, cfg.sampled_negatives), generator=gen)
            keep.scatter_(1, neg, True)
            scores = scores.masked_fill(~(keep | relevant), -torch.inf)
        vals, idx = ranked_topk(scores, top, perm, inv)
        hits = relevant.gather(1, idx) & torch.isfinite(vals)
        n_rel = torch.from_numpy(np.diff(t_off[lo : hi + 1]))
        for key, batch_values in metrics_from_hits(hits, n_rel, ks).items():
            per_user.setdefault(key, []).append(batch_values)
        for j, k in enumerate(ks):
            seen[j, idx[:, :k][torch.isfinite(vals[:, :k])]] = True
    values = {key: torch.cat(chunks).double().numpy() for key, chunks in per_user.items()}
    keys = list(values)
    means, lows, highs = bootstrap_many(np.stack([values[k] for k in keys]), n_boot=cfg.bootstrap,
                                        seed=cfg.seed)
    metrics = {k: float(m) for k, m in zip(keys, means, strict=True)}
    ci = {k: (float(lo_), float(hi_)) for k, lo_, hi_ in zip(keys, lows, highs, strict=True)}
    same = targets.groupby("user_idx")["same_time"].any().reindex(users).to_numpy(dtype=bool)
    groups: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for group, mask in (("same_time", same), ("later_time", ~same)):
        sizes[group] = int(mask.sum())
        groups[group] = {key: float(arr[mask].mean()) if mask.any() else float("nan")
                         for key, arr in values.items()}
    coverage = {f"coverage@{k}": float(seen[j].float().mean()) for j, k in enumerate(ks)}
    label = f"{name} (sampled {cfg.sampled_negatives})" if cfg.sampled_negatives else name
    return EvalResult(label, part, len(users), metrics, ci, groups, sizes, coverage, values,
                      sampled=cfg.sampled_negatives is not None)


def paired_change(model: EvalResult, base: EvalResult, key: str, cfg: EvalConfig
                  ) -> tuple[float, float, float]:
    """``model - base`` on metric ``key`` with its paired bootstrap CI (same users, same part)."""
    if model.part != base.part or model.n_users != base.n_users:
        raise ValueError(f"{model.name} and {base.name} were not evaluated on the same users")
    return paired_bootstrap_ci(model.per_user[key], base.per_user[key], n_boot=cfg.bootstrap,
                               seed=cfg.seed)


@dataclass
class Tuned:
    """A model tuned on validation and evaluated on test."""

    name: str
    params: dict[str, Any]
    valid: EvalResult
    test: EvalResult
    trials: list[tuple[dict[str, Any], float]]


def grid(space: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
    """All combinations of a parameter grid, in a stable order."""
    keys = list(space)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*space.values())]


def tune_and_test(
    name: str,
    make: Callable[..., Recommender],
    space: Mapping[str, Iterable[Any]],
    split: Split,
    cfg: EvalConfig,
    progress: bool = True,
) -> Tuned:
    """Pick the parameters with the best ``cfg.main_metric`` on validation (model fitted on train),
    refit with them on train + valid and evaluate on test. Test is never looked at while tuning."""
    trials: list[tuple[dict[str, Any], float]] = []
    best: tuple[float, dict[str, Any], EvalResult] | None = None
    for params in grid(space):
        model = make(**params)
        model.fit(split.history("valid"), split.n_users, split.n_items)
        res = evaluate(model.score, split, "valid", cfg, name=name, progress=progress)
        value = res.metrics[cfg.main_metric]
        trials.append((params, value))
        if best is None or value > best[0]:
            best = (value, params, res)
    assert best is not None, "empty parameter grid"
    _, params, valid = best
    model = make(**params)
    model.fit(split.history("test"), split.n_users, split.n_items)
    test = evaluate(model.score, split, "test", cfg, name=name, progress=progress)
    return Tuned(name, params, valid, test, trials)
