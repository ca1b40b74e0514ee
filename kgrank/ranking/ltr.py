"""LightGBM LambdaRank re-ranker with per-result explanations by feature family.

LambdaRank / LambdaMART (Burges, "From RankNet to LambdaRank to LambdaMART: An Overview", MSR-TR
2010) boosts trees on pairwise gradients weighted by the NDCG change of swapping two results;
``lambdarank_truncation_level`` limits the pairs to those that involve the top of the list (the
main metric's ``k + 3`` by default).

Position bias. When training rows come from logged impressions, clicks depend on where an item
was shown as much as on its relevance. With ``LTRConfig.position_bias`` and display positions,
positions are passed to ``lightgbm.Dataset(position=...)`` (LightGBM >= 4.1): LightGBM then learns
an additive bias per position jointly with the ranker (a GAM over positions, LightGBM PR #5929),
in the spirit of Unbiased LambdaMART (Hu et al., WWW 2019); see the ``position`` argument of
``lightgbm.Dataset`` and the position-bias section of LightGBM's Advanced Topics. The learned bias
is not part of the model's predictions, which estimate relevance only. Caveat: early stopping
still uses NDCG on the logged (biased) labels of the holdout, which favours models that exploit
the bias, so position-debiased models tend to stop earlier.

Explanations. ``booster.predict(pred_contrib=True)`` gives TreeSHAP contributions per feature;
:meth:`LTRModel.explain` sums them per feature family (graph, text, image, behaviour, context,
query, ...) and keeps the expected value as a ``bias`` column, so a row's contributions add up
to its raw score.

Persistence is text only: the LightGBM model file plus a JSON sidecar (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np

from kgrank.config import LTRConfig
from kgrank.io import atomic_write_text

log = logging.getLogger("kgrank")

BIAS = "bias"
"""Name of the explanation column that holds the model's expected value."""

_FORMAT = 1


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def lgb_names(names: Sequence[str]) -> list[str]:
    """Feature names LightGBM accepts (no JSON special characters, unique)."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        clean = re.sub(r"[^0-9A-Za-z_]", "_", name) or f"f{i}"
        if clean in seen:
            clean = f"{clean}__{i}"
        seen.add(clean)
        out.append(clean)
    return out


def check_matrix(X: np.ndarray, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [N, F], got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, the model expects {n_features}")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    return X


def group_offsets(group: np.ndarray, n_rows: int) -> np.ndarray:
    group = np.asarray(group)
    if group.ndim != 1 or len(group) == 0:
        raise ValueError("group must be a non-empty 1-D array of group sizes")
    if not np.issubdtype(group.dtype, np.integer) or (group <= 0).any():
        raise ValueError("group sizes must be positive integers")
    if int(group.sum()) != n_rows:
        raise ValueError(f"group sizes sum to {int(group.sum())} but X has {n_rows} rows "
                         "(rows of one request must be contiguous, groups in row order)")
    return np.concatenate([[0], np.cumsum(group, dtype=np.int64)])


def rows_of(offsets: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Row indices of the listed groups, group by group."""
    starts, ends = offsets[groups], offsets[groups + 1]
    lengths = ends - starts
    if not len(groups):
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(
        int(lengths.sum())
    )


def split_groups(y: np.ndarray, offsets: np.ndarray, cfg: LTRConfig
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(training groups, early-stopping holdout groups, number of groups without a positive):
    a seeded split of whole query groups; groups without a positive carry no ranking signal."""
    pos_per_group = np.add.reduceat((y > 0).astype(np.int64), offsets[:-1])
    keep = np.flatnonzero(pos_per_group > 0)
    dropped = int(len(offsets) - 1 - len(keep))
    if len(keep) < 2:
        raise ValueError(f"need at least 2 groups with a positive, got {len(keep)} "
                         f"({dropped} groups without one)")
    shuffled = np.random.default_rng(cfg.seed).permutation(keep)
    n_hold = min(max(1, round(cfg.holdout * len(keep))), len(keep) - 1)
    return np.sort(shuffled[n_hold:]), np.sort(shuffled[:n_hold]), dropped


class LTRModel:
    """A LightGBM LambdaRank model over named features grouped into families.

    After :meth:`fit`: ``booster``, ``best_iteration``, ``best_score`` (holdout NDCG@k),
    ``n_groups_dropped`` (groups without a positive, removed), ``train_groups`` and
    ``holdout_groups`` (indices into the ``group`` array passed to :meth:`fit`; whole groups).
    """

    def __init__(self) -> None:
        self.booster: lgb.Booster | None = None
        self.feature_names: list[str] = []
        self.families: dict[str, str] = {}
        self.family_names: list[str] = []
        self.k = 10
        self.cfg = LTRConfig()
        self.best_iteration = 0
        self.best_score = float("nan")
        self.n_groups_dropped = 0
        self.used_position = False
        self.train_groups = np.zeros(0, dtype=np.int64)
        self.holdout_groups = np.zeros(0, dtype=np.int64)

    def params(self, cfg: LTRConfig, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [k],
            "lambdarank_truncation_level": cfg.truncation_level or k + 3,
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_child_samples": cfg.min_child_samples,
            "colsample_bytree": cfg.colsample_bytree,
            "seed": cfg.seed,
            "deterministic": True,
            # column-wise histograms: row-wise ones build a second, row-major copy of the
            # binned data (measured on Amazon Beauty: +0.5 GB peak, same model, same time)
            "force_col_wise": True,
            "verbosity": -1,
        }
        if cfg.threads > 0:
            params["num_threads"] = cfg.threads
        return params

    def prepare(
        self,
        X: np.ndarray,
        y: np.ndarray,
        group: np.ndarray,
        feature_names: Sequence[str],
        families: Mapping[str, str],
        cfg: LTRConfig,
        k: int,
        position: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Check :meth:`fit`'s inputs, set the model's metadata (feature names, families, k,
        config, position use) and its seeded split of whole groups (``train_groups``,
        ``holdout_groups``); returns ``(X, y, group offsets, position)``. Shared by the
        in-process :meth:`fit` and the Ray trainer (:mod:`kgrank.distributed.ltr`)."""
        X = check_matrix(X)
        n_rows, n_features = X.shape
        y = np.asarray(y)
        if y.shape != (n_rows,):
            raise ValueError(f"y has shape {y.shape}, expected ({n_rows},)")
        if not np.isfinite(y).all() or (y < 0).any() or (y != np.round(y)).any():
            raise ValueError("y must hold non-negative integer relevance grades")
        offsets = group_offsets(group, n_rows)
        names = list(feature_names)
        if len(names) != n_features or len(set(names)) != n_features:
            raise ValueError(f"need {n_features} distinct feature names, got {len(names)} "
                             f"({len(set(names))} distinct)")
        if missing := [f for f in names if f not in families]:
            raise ValueError(f"features without a family: {missing}")
        if BIAS in families.values():
            raise ValueError(f"{BIAS!r} is reserved for the expected value; rename that family")
        if position is not None:
            position = np.asarray(position)
            if position.shape != (n_rows,) or not np.issubdtype(position.dtype, np.integer):
                raise ValueError(f"position must be an integer array of shape ({n_rows},)")
            if (position < 0).any():
                raise ValueError("position must be 0-based (non-negative)")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")

        self.train_groups, self.holdout_groups, self.n_groups_dropped = split_groups(
            y, offsets, cfg)

        self.feature_names = names
        self.families = {f: families[f] for f in names}
        self.family_names = list(dict.fromkeys(self.families.values()))
        self.k, self.cfg = k, cfg
        self.used_position = position is not None and cfg.position_bias
        return X, y, offsets, position

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        group: np.ndarray,
        feature_names: Sequence[str],
        families: Mapping[str, str],
        cfg: LTRConfig,
        k: int,
        position: np.ndarray | None = None,
        progress: bool = True,
    ) -> LTRModel:
        """Train on grouped rows; early-stop on NDCG@k of a seeded holdout of whole groups.

        Args:
            X: float [N, F] features (NaN: missing).
            y: [N] non-negative integer relevance (0/1 or graded).
            group: [G] group sizes; the rows of one request are contiguous, groups in row order.
            feature_names: the F feature names.
            families: feature name -> family (graph, text, image, behaviour, context, query, ...);
                every feature needs one.
            cfg: LightGBM settings.
            k: cut-off of the main metric (early stopping on NDCG@k; default truncation k + 3).
            position: [N] 0-based display position of each row; used when
                ``cfg.position_bias`` (LightGBM's position-debiased LambdaRank), else ignored.
            progress: log the holdout metric every 50 rounds.

        Groups without a positive carry no LambdaRank gradient (and would score NDCG 1 in
        the holdout), so they are dropped and counted in ``n_groups_dropped``.
        """
        X, y, offsets, position = self.prepare(X, y, group, feature_names, families, cfg, k,
                                               position)
        sizes = np.diff(offsets)
        params = self.params(cfg, k)

        # One binned Dataset over all rows, then the training and holdout groups as subsets of
        # it: LightGBM copies binned rows (1 byte per feature), never the float matrix X.
        full = lgb.Dataset(X, label=y.astype(np.int32), group=sizes,
                           feature_name=lgb_names(self.feature_names), params=dict(params),
                           free_raw_data=True).construct()
        train_rows = rows_of(offsets, self.train_groups)
        train = full.subset(train_rows.tolist())  # rows are sorted: LightGBM sorts them again
        if self.used_position and position is not None:
            train.set_position(position[train_rows])  # a subset does not inherit positions
        hold = full.subset(rows_of(offsets, self.holdout_groups).tolist())
        train.construct()
        hold.construct()
        full._free_handle()  # both subsets hold copies of their binned rows; drop the parent's
        callbacks: list[Any] = [lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)]
        if progress:
            callbacks.append(lgb.log_evaluation(50))
        booster = lgb.train(params, train, num_boost_round=cfg.n_estimators, valid_sets=[hold],
                            valid_names=["holdout"], callbacks=callbacks)
        self.booster = booster
        self.best_iteration = int(booster.best_iteration or booster.current_iteration())
        score = booster.best_score.get("holdout", {}).get(f"ndcg@{k}")
        self.best_score = float(score) if score is not None else float("nan")
        log.info("LTR: best iteration %d of %d, holdout ndcg@%d=%.4f; %d train / %d holdout "
                 "groups, %d without a positive dropped%s", self.best_iteration,
                 booster.current_iteration(), k, self.best_score, len(self.train_groups),
                 len(self.holdout_groups), self.n_groups_dropped,
                 ", position-debiased" if self.used_position else "")
        return self

    def _booster(self) -> lgb.Booster:
        if self.booster is None:
            raise RuntimeError("LTRModel is not fitted (call fit or load first)")
        return self.booster

    def predict(self, X: np.ndarray) -> np.ndarray:
        """float64 [N] raw relevance scores at the best iteration (higher ranks first)."""
        booster = self._booster()
        X = check_matrix(X, len(self.feature_names))
        return np.asarray(booster.predict(X, num_iteration=self.best_iteration, raw_score=True),
                          dtype=np.float64)

    def _family_matrix(self) -> np.ndarray:
        """[F, n_families] one-hot feature -> family."""
        col = {fam: j for j, fam in enumerate(self.family_names)}
        onehot = np.zeros((len(self.feature_names), len(self.family_names)))
        for i, f in enumerate(self.feature_names):
            onehot[i, col[self.families[f]]] = 1.0
        return onehot

    def explain(self, X: np.ndarray, threads: int | None = None
                ) -> tuple[np.ndarray, list[str]]:
        """Per-row contributions by family: ``(contrib [N, n_families + 1], names)``.

        ``names`` is the families in order of first appearance in the feature names, then
        ``"bias"`` (the expected value). Each row sums to :meth:`predict` of that row.
        ``threads``: LightGBM threads (default: LightGBM's, every core).
        """
        booster = self._booster()
        X = check_matrix(X, len(self.feature_names))
        extra: dict[str, Any] = {} if threads is None else {"num_threads": threads}
        raw = np.asarray(booster.predict(X, num_iteration=self.best_iteration, pred_contrib=True,
                                         **extra), dtype=np.float64)
        per_family = raw[:, :-1] @ self._family_matrix()
        return np.column_stack([per_family, raw[:, -1]]), [*self.family_names, BIAS]

    def importance_by_family(
        self, kind: Literal["gain", "split"] = "gain"
    ) -> dict[str, float]:
        """Share of the total ``kind`` importance (gain or split count) of each family."""
        booster = self._booster()
        imp = np.asarray(booster.feature_importance(importance_type=kind,
                                                    iteration=self.best_iteration), dtype=float)
        per_family = imp @ self._family_matrix()
        total = per_family.sum()
        shares = per_family / total if total > 0 else per_family
        return {fam: float(v) for fam, v in zip(self.family_names, shares, strict=True)}

    def save(self, path: str | Path) -> None:
        """Write the model text to ``path`` and its metadata to ``<path>.meta.json``, both
        atomically; the sidecar holds the model text's SHA-256 so a mismatched pair fails to
        load."""
        booster = self._booster()
        path = Path(path)
        text = booster.model_to_string(num_iteration=self.best_iteration)
        meta = {
            "format": _FORMAT,
            "lightgbm": lgb.__version__,
            "model_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "feature_names": self.feature_names,
            "families": self.families,
            "k": self.k,
            "best_iteration": self.best_iteration,
            "best_score": self.best_score,
            "n_groups_dropped": self.n_groups_dropped,
            "used_position": self.used_position,
            "config": self.cfg.model_dump(),
        }
        atomic_write_text(path, text)
        atomic_write_text(_sidecar(path), json.dumps(meta, indent=2, allow_nan=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LTRModel:
        """Read a model written by :meth:`save`."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{_sidecar(path)}: unknown format {meta.get('format')!r}")
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != meta["model_sha256"]:
            raise ValueError(f"{path} does not match its sidecar {_sidecar(path)} "
                             "(written by different saves)")
        model = cls()
        model.booster = lgb.Booster(model_str=text)
        model.feature_names = list(meta["feature_names"])
        model.families = dict(meta["families"])
        model.family_names = list(dict.fromkeys(model.families[f] for f in model.feature_names))
        model.k = int(meta["k"])
        model.best_iteration = int(meta["best_iteration"])
        model.best_score = float(meta["best_score"])
        model.n_groups_dropped = int(meta["n_groups_dropped"])
        model.used_position = bool(meta["used_position"])
        model.cfg = LTRConfig.model_validate(meta["config"])
        return model


def top_reasons(contrib_row: np.ndarray, names: Sequence[str], n: int = 3) -> list[str]:
    """The (at most ``n``) families that push a result up the most, strongest first.

    Only positive contributions count and the ``bias`` column is skipped, so a result that no
    family pushes up gets no reason.
    """
    contrib_row = np.asarray(contrib_row, dtype=float)
    if contrib_row.shape != (len(names),):
        raise ValueError(f"contrib_row has shape {contrib_row.shape}, expected ({len(names)},)")
    order = np.argsort(-contrib_row, kind="stable")
    return [names[i] for i in order if names[i] != BIAS and contrib_row[i] > 0][:n]
