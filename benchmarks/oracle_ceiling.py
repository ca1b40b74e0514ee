"""How far can the demo shop's ranker get? LambdaRank on the run's own feature table plus one
oracle-derived column at a time.

``benchmarks/oracle_gap.py`` asks which term of the shop's true score the features miss; this
script asks what the ranker would reach if it were *given* such knowledge. It runs the demo
pipeline once (``kgrank run CONFIG``) and keeps the ranking stage's validation (training) and test
feature tables (``runs/<name>/tables.npz``; ``--reuse`` reads them back). Then, on exactly those
tables, it trains the run's LambdaRank configuration with one extra group of columns each:

* ``persona taste``: the persona-level oracle (:meth:`DemoOracle.persona_level`) without the
  context terms (regional brand, previous item, query): perfect knowledge of every item
  parameter and of the user's persona, for the terms a model of user taste could learn;
* ``persona all``: the persona-level oracle's whole score (context terms exact too);
* ``oracle all``: the oracle's own score (each user's individual preferences known);
* ``latent classes``: a learned stand-in for the first, with nothing from the oracle: a
  latent-class multinomial logit over item attributes (``LatentClassModel`` below; each user a
  mixture of ``--classes`` classes fitted by EM on the part's history). Its columns: the mixture's
  log-probability of the candidate and, per attribute, the posterior-expected class preference.

Each variant's per-user NDCG@10 on the test targets is compared with the base model's (paired
bootstrap over users); ranks are computed over the candidates exactly as the run's evaluator
does (a target outside the candidates scores 0), so the base row reproduces the run's
``fusion+ltr``.

    .venv/bin/python benchmarks/oracle_ceiling.py                 # ~12 min on 2 cores
    .venv/bin/python benchmarks/oracle_ceiling.py --reuse         # the saved tables: ~6 min

Ends with ``RESULT oracle_ceiling ...``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from kgrank.config import load_config
from kgrank.data.dataset import Dataset, load_dataset
from kgrank.data.demo import DemoOracle, oracle_requests
from kgrank.data.split import Part, Split, make_split
from kgrank.eval.metrics import paired_bootstrap_ci
from kgrank.features.clusters import item_clusters
from kgrank.pipeline import evaluate_oracle
from kgrank.ranking import stage as stage_module
from kgrank.ranking.ltr import LTRModel

PARTS: tuple[Part, Part] = ("valid", "test")
FIELDS = ("x", "req", "item", "user", "target")
EMBEDDINGS = ("image", "graph_kg")
"""Item embeddings kept with the tables, for the latent-class model's attribute clusters."""


def capture_tables(config: str, name: str, out: Path) -> None:
    """``kgrank run config name=<name>`` with the ranking stage's feature tables kept: each
    row's features, request row, candidate item, request user and target item, per part."""
    from kgrank.cli import main

    store: dict[str, list[tuple[np.ndarray, ...]]] = {p: [] for p in PARTS}
    names: list[str] = []
    embeddings: dict[str, np.ndarray] = {}
    table = stage_module.RankingStage.table

    def keep(self: Any, data: Any, rows: np.ndarray, shuffle_seed: int | None = None) -> Any:
        result = table(self, data, rows, shuffle_seed)
        x, cols, _, cells, items = result
        if data.part in store and len(rows) > 1:  # the stage's chunks, not explanation calls
            req = np.asarray(rows)[cells[:, 0]]
            store[data.part].append((x.copy(), req, items.copy(), data.requests.user_idx[req],
                                     data.requests.target[req]))
            names[:] = cols
            for key in EMBEDDINGS:  # the part's item embeddings (graph models differ by part)
                embeddings.setdefault(f"{data.part}_emb_{key}", self._embeddings(data.part)[key][0])
        return result

    stage_module.RankingStage.table = keep  # type: ignore[method-assign]
    try:
        if main(["run", config, f"name={name}"]) != 0:
            raise SystemExit("the pipeline run failed")
    finally:
        stage_module.RankingStage.table = table  # type: ignore[method-assign]
    arrays = {f"{p}_{f}": np.concatenate(col) for p in PARTS
              for f, col in zip(FIELDS, zip(*store[p], strict=True), strict=True)}
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, names=np.array(names), **{**arrays, **embeddings})  # type: ignore[arg-type]
    os.replace(tmp, out)


class LatentClassModel:
    """A latent-class multinomial logit over item attributes (a mixture of "personas").

    Class ``k`` chooses item ``i`` with probability ``softmax_i(b_i + sum_a theta[k, a,
    v_a(i)])`` (``v_a(i)``: the item's value of attribute ``a``; ``b``: an item bias shared by
    the classes); a user's history is a bag of choices by one class, drawn from the class prior.
    Fitted by EM (Kamakura & Russell, "A probabilistic choice model for market segmentation",
    JMR 1989): the E-step is each user's class posterior, the M-step ``m_steps`` Adam steps on
    the posterior-weighted log-likelihood (L2 penalty ``lam``).
    """

    def __init__(self, n_classes: int = 30, iters: int = 30, m_steps: int = 40,
                 lam: float = 1e-2, seed: int = 0) -> None:
        self.n_classes, self.iters, self.m_steps, self.lam, self.seed = (
            n_classes, iters, m_steps, lam, seed)

    def fit(self, users: np.ndarray, items: np.ndarray, n_users: int,
            codes: Sequence[np.ndarray]) -> LatentClassModel:
        n_items, k = len(codes[0]), self.n_classes
        hist = _bag(users, items, n_users, n_items)
        sizes = [int(c.max()) + 2 for c in codes]  # the last value: attribute missing
        self.codes = [np.where(c >= 0, c, s - 1) for c, s in zip(codes, sizes, strict=True)]
        idx = [torch.from_numpy(c) for c in self.codes]
        theta = [torch.zeros(k, s, dtype=torch.float64, requires_grad=True) for s in sizes]
        bias = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([*theta, bias], lr=0.1)
        active = np.asarray(hist.sum(axis=1)).ravel() > 0
        post = np.random.default_rng(self.seed).dirichlet(np.ones(k), size=n_users)

        def log_probs() -> torch.Tensor:
            z = bias[None, :] + sum(t[:, i] for t, i in zip(theta, idx, strict=True))
            return z - torch.logsumexp(z, dim=1, keepdim=True)

        hist_t = hist.T.tocsr()
        for _ in range(self.iters):
            counts = torch.from_numpy(np.asarray((hist_t @ post).T))  # [k, n_items]
            prior = post[active].sum(axis=0) + 1.0
            self.log_prior = np.log(prior / prior.sum())
            for _ in range(self.m_steps):
                opt.zero_grad()
                penalty = (sum((t ** 2).sum() for t in theta) / k
                           + (bias ** 2).sum() / n_items)
                loss = -(counts * log_probs()).sum() / counts.sum() + self.lam * penalty
                loss.backward()
                opt.step()
            with torch.no_grad():
                self.log_p = log_probs().numpy()
            post = self.posterior(hist)
            post[~active] = np.exp(self.log_prior)
        self.theta = [t.detach().numpy() for t in theta]
        return self

    def posterior(self, hist: sp.csr_matrix) -> np.ndarray:
        """[rows, classes] class posterior of each row's bag of items (``hist`` [rows, items])."""
        ll = np.asarray(hist @ self.log_p.T) + self.log_prior[None, :]
        ll -= ll.max(axis=1, keepdims=True)
        post = np.exp(ll)
        return np.asarray(post / post.sum(axis=1, keepdims=True))

    def features(self, post: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Per (posterior row, item): the mixture's log-probability of the item, then per
        attribute the posterior-expected class preference for the item's value."""
        mix = np.log(np.einsum("rk,kr->r", post, np.exp(self.log_p)[:, items]) + 1e-30)
        per = [np.einsum("rk,kr->r", post, t[:, c[items]])
               for t, c in zip(self.theta, self.codes, strict=True)]
        return np.column_stack([mix, *per])


def _bag(users: np.ndarray, items: np.ndarray, n_rows: int, n_items: int) -> sp.csr_matrix:
    bag = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(n_rows, n_items))
    bag.data[:] = 1.0  # a bag of distinct items
    return bag


def attribute_codes(dataset: Dataset, image: np.ndarray, graph: np.ndarray) -> list[np.ndarray]:
    """Item attribute codes the ranker may use: leaf category, brand, colour, material, price
    band inside the leaf (octiles of log price minus the leaf's median), k-means cluster of the
    image and of the KG-model item embeddings (the print pattern and the hidden cluster show up
    only there)."""
    items = dataset.items
    leaf = pd.factorize(items["categories"].map(lambda c: c[-1] if len(c) else None))[0]
    log_price = np.log(items["price"].to_numpy())
    rel = log_price - pd.Series(log_price).groupby(leaf).transform("median").to_numpy()
    band = np.digitize(rel, np.quantile(rel, np.linspace(0, 1, 9)[1:-1]))
    return [leaf.astype(np.int64), *(pd.factorize(items[c])[0].astype(np.int64)
                                     for c in ("brand", "colour", "material")),
            band.astype(np.int64), item_clusters(image, 32), item_clusters(graph, 32)]


def oracle_column(model: DemoOracle, dataset: Dataset, split: Split, t: Any, part: str,
                  without: tuple[str, ...]) -> np.ndarray:
    """The oracle's score of each table row (its request's user and context, its item)."""
    targets = (split.valid if part == "valid" else split.test).drop_duplicates("user_idx",
                                                                                keep="last")
    req = oracle_requests(dataset.interactions, targets["event_row"].to_numpy())
    row_of_user = np.full(dataset.n_users, -1)
    row_of_user[targets["user_idx"].to_numpy()] = np.arange(len(targets))
    rows = row_of_user[t[f"{part}_user"]]
    items = t[f"{part}_item"]
    out = np.empty(len(rows), np.float32)
    for lo in range(0, len(targets), 512):
        scores = model.score(req.iloc[lo : lo + 512].reset_index(drop=True), without=without)
        sel = np.flatnonzero((rows >= lo) & (rows < lo + 512))
        out[sel] = scores[rows[sel] - lo, items[sel]]
    return out


def ndcg_per_request(req: np.ndarray, item: np.ndarray, target: np.ndarray,
                     score: np.ndarray) -> np.ndarray:
    """NDCG@10 of each request's target among its candidates (0 when it is not one)."""
    out = np.zeros(int(req.max()) + 1)
    order = np.lexsort((-score, req))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - np.searchsorted(req[order], req[order], side="left")
    hit = np.flatnonzero(item == target)
    out[req[hit]] = np.where(rank[hit] < 10, 1.0 / np.log2(rank[hit] + 2.0), 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--name", default="oracle-ceiling", help="the run's name (runs/<name>)")
    parser.add_argument("--reuse", action="store_true", help="read the saved tables back")
    parser.add_argument("--classes", type=int, default=30, help="latent classes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(args.config, [f"name={args.name}"])
    tables = Path(cfg.output_dir) / "tables.npz"
    if not (args.reuse and tables.exists()):
        capture_tables(args.config, args.name, tables)
    t = dict(np.load(tables))
    names = [str(n) for n in t["names"]]
    dataset = load_dataset(cfg.data.path)
    split = make_split(dataset, cfg.data.split)
    oracle = DemoOracle.load(dataset.root)
    level = oracle.persona_level(dataset.users["age"].to_numpy())

    def fit(extra: dict[str, np.ndarray] | None, label: str) -> np.ndarray:
        xv, xt, cols = t["valid_x"], t["test_x"], list(names)
        if extra is not None:
            xv = np.column_stack([xv, extra["valid"]]).astype(np.float32)
            xt = np.column_stack([xt, extra["test"]]).astype(np.float32)
            cols += [f"{label}_{j}" for j in range(extra["valid"].shape[1])]
        req = t["valid_req"]
        group = np.diff(np.flatnonzero(np.r_[True, req[1:] != req[:-1], True]))
        y = (t["valid_item"] == t["valid_target"]).astype(np.float32)
        model = LTRModel().fit(xv, y, group, cols, dict.fromkeys(cols, "behaviour"),
                               cfg.ranking.ltr, 10, progress=False)
        return ndcg_per_request(t["test_req"], t["test_item"], t["test_target"],
                                model.predict(xt))

    def oracle_extra(model: DemoOracle, without: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {p: oracle_column(model, dataset, split, t, p, without)[:, None] for p in PARTS}

    purity: dict[str, float] = {}

    def latent_extra() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for part in PARTS:
            history = split.history(part)  # the same events the part's features see
            users, items = history["user_idx"].to_numpy(), history["item_idx"].to_numpy()
            codes = attribute_codes(dataset, t[f"{part}_emb_image"], t[f"{part}_emb_graph_kg"])
            model = LatentClassModel(args.classes).fit(users, items, dataset.n_users, codes)
            post = model.posterior(_bag(users, items, dataset.n_users, dataset.n_items))
            # how well the classes recover the shop's personas (for the report only)
            persona = pd.Series(oracle.params["user_persona"])
            top = persona.groupby(post.argmax(axis=1)).agg(lambda s: s.value_counts().iloc[0])
            purity[part] = float(top.sum() / len(persona))
            out[part] = model.features(post[t[f"{part}_user"]], t[f"{part}_item"])
        return out

    variants: list[tuple[str, Callable[[], dict[str, np.ndarray] | None]]] = [
        ("base", lambda: None),
        ("persona taste", lambda: oracle_extra(level, ("regional", "sequence", "query"))),
        ("persona all", lambda: oracle_extra(level, ())),
        ("oracle all", lambda: oracle_extra(oracle, ())),
        ("latent classes", latent_extra),
    ]
    results: dict[str, np.ndarray] = {}
    for label, make in variants:
        results[label] = fit(make(), label.replace(" ", "_"))
        print(f"{label}: NDCG@10 {results[label].mean():.4f}", flush=True)
    base = results["base"]
    print("\n| variant | test NDCG@10 | change [paired 95% CI] |\n|---|---|---|")
    for label, nd in results.items():
        if label == "base":
            print(f"| base (the run's table) | {nd.mean():.4f} | |")
            continue
        mean, lo, hi = paired_bootstrap_ci(nd, base)
        print(f"| + {label} | {nd.mean():.4f} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    bar = 0.8 * float(evaluate_oracle(oracle, dataset, split, cfg).metrics["ndcg@10"])
    print(f"\nlatent classes: {args.classes}, share of users in their class's majority persona "
          f"{purity['valid']:.3f} (valid) / {purity['test']:.3f} (test); the 0.8x-oracle bar: "
          f"{bar:.4f}; {time.perf_counter() - t0:.0f} s")
    print("RESULT oracle_ceiling " + " ".join(
        f"{label.replace(' ', '_')}_ndcg10={nd.mean():.4f}" for label, nd in results.items())
        + f" bar_ndcg10={bar:.4f} classes={args.classes} class_purity={purity['test']:.3f}")


if __name__ == "__main__":
    main()
