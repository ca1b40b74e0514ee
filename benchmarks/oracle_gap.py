"""Where the demo shop's ranker falls short of the oracle: which preference term its features miss.

The demo shop's true score is a sum of terms (``kgrank.data.demo.TERMS``: leaf-category taste,
favourite brands, colour and pattern preference, price fit, hidden cluster, regional brand,
leaf transition, quality, query match). For the exported run's test requests this script

1. ranks the whole catalogue with the oracle and with the oracle minus one term at a time
   (NDCG@10: how much each term matters for the ranking),
2. ranks it with the persona-level oracle (:meth:`DemoOracle.persona_level`): every item
   parameter, context term and the user's persona known, the user's own deviations from the
   persona not; then with each family of the user's own parameters put back in turn. A learner
   that pools users into segments cannot be expected to beat the persona-level oracle;
   and with each user's persona inferred from their history instead
   (:meth:`DemoOracle.persona_inferred`): the shop's score function, every item parameter and
   every persona's preferences known, the user's segment told from their own positives;
3. for a sample of test requests, regresses each term's value on the candidates, centred within
   each request (only the order inside a request matters), on the ranker's own feature table
   (a LightGBM regressor fitted on 2/3 of the sampled requests, scored on the other 1/3):
   the unexplained within-request variance is what the features do not tell about that term.

A term with a large unexplained variance (in the score's own units: logits of the click model)
is where new features would help; a term the features already explain is not.

    .venv/bin/python benchmarks/oracle_gap.py --export runs/export/demo --dataset runs/data/demo-shop

Ends with ``RESULT oracle_gap ...``. Needs a demo-shop export (``kgrank export runs/demo
runs/export/demo``) and the generated shop, whose ``oracle/`` holds the true parameters.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np

from kgrank.data.dataset import load_dataset
from kgrank.data.demo import TERMS, USER_PREFERENCES, DemoOracle, oracle_requests
from kgrank.export import load
from kgrank.pipeline import evaluate_oracle
from kgrank.serve.searcher import Searcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=Path("runs/export/demo"))
    parser.add_argument("--dataset", type=Path, default=Path("runs/data/demo-shop"),
                        help="the generated demo shop (with oracle/) the export was trained on")
    parser.add_argument("--requests", type=int, default=1500,
                        help="test requests sampled for the regression (all for the NDCG table)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()

    searcher = Searcher(load(args.export), threads=2)
    dataset = load_dataset(args.dataset)
    if dataset.fingerprint != searcher.export.manifest.dataset_fingerprint:
        raise SystemExit(f"{args.dataset} (fingerprint {dataset.fingerprint}) is not the dataset "
                         f"of {args.export} ({searcher.export.manifest.dataset_fingerprint})")
    oracle = DemoOracle.load(args.dataset)
    split = searcher.split
    targets = split.test.sort_values("user_idx", kind="stable")
    requests = oracle_requests(dataset.interactions, targets["event_row"].to_numpy())
    users = targets["user_idx"].to_numpy()

    # 1. the oracle with and without each term, and the persona-level oracle (with each
    # family of the user's own preferences put back in turn): the run's evaluator (full
    # ranking, history masked, ties broken by its fixed item permutation)
    def oracle_ndcg(model: DemoOracle, without: tuple[str, ...] = ()) -> float:
        result = evaluate_oracle(model, dataset, split, searcher.cfg, without)
        return float(result.metrics["ndcg@10"])

    full = oracle_ndcg(oracle)
    without = {t: oracle_ndcg(oracle, (t,)) for t in TERMS}
    level = oracle.persona_level(dataset.users["age"].to_numpy())
    pooled = oracle_ndcg(level)
    own = {key: oracle_ndcg(DemoOracle({**level.params, key: oracle.params[key]}, oracle.meta))
           for key in USER_PREFERENCES}
    # the persona told from each user's test-time history (their distinct positives before
    # the test target) by the shop's own score function, instead of known
    history = split.history("test")
    inferred = oracle.persona_inferred(dataset.users["age"].to_numpy(),
                                       history["user_idx"].to_numpy(),
                                       history["item_idx"].to_numpy())
    post = inferred.params["user_persona_posterior"]
    persona_acc = float((post.argmax(axis=1) == oracle.params["user_persona"]).mean())
    guessed = oracle_ndcg(inferred)

    # 2. the ranker's features on a sample of test requests: what they explain of each term
    stage = searcher.stage
    stage.keep_fitted, stage.progress = False, False
    stage._fit_cache.clear()
    part = stage.build_part("test")
    if not (part.requests.user_idx == users).all():
        raise RuntimeError("the test part's requests are not the users' test targets")
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(users), min(args.requests, len(users)), replace=False))
    x, names, _, cells, items = stage.table(part, rows)
    req_of_cell = cells[:, 0]
    counts = np.bincount(req_of_cell, minlength=len(rows))
    sample = requests.iloc[rows].reset_index(drop=True)
    fit_cells = req_of_cell < int(len(rows) * 2 / 3)
    table = []
    for term in (*TERMS, "all"):
        others = [t for t in TERMS if t != term] if term != "all" else []
        value = oracle.score(sample, without=others)[req_of_cell, items].astype(np.float64)
        value -= (np.bincount(req_of_cell, weights=value, minlength=len(rows))
                  / counts)[req_of_cell]
        reg = lgb.LGBMRegressor(n_estimators=300, learning_rate=0.1, num_leaves=63,
                                n_jobs=2, verbose=-1, random_state=args.seed)
        reg.fit(x[fit_cells], value[fit_cells])
        resid = value[~fit_cells] - reg.predict(x[~fit_cells])
        var = float(value[~fit_cells].var())
        table.append((term, var, float((resid ** 2).mean())))

    print(f"\nOracle NDCG@10 over {len(users)} test requests (full catalogue): {full:.4f}")
    print("\n| term | weight | oracle NDCG@10 without it | within-request variance | "
          "unexplained by the ranker's features | R^2 |")
    print("|---|---|---|---|---|---|")
    for term, var, res in table:
        weight = f"{oracle.weights[term]:g}" if term in oracle.weights else ""
        drop = f"{without[term]:.4f}" if term in without else f"{full:.4f} (all terms)"
        print(f"| {term} | {weight} | {drop} | {var:.3f} | {res:.3f} | {1 - res / var:.3f} |")
    print(f"\nPersona-level oracle (every item parameter, context term and user's persona "
          f"known; no individual deviations): NDCG@10 {pooled:.4f} = {pooled / full:.3f}x the "
          "oracle")
    print(f"Persona inferred from the user's history (the shop's score function, every item "
          f"parameter and every persona's preferences known): NDCG@10 {guessed:.4f}; the "
          f"posterior's top persona is the true one for {persona_acc:.3f} of the users")
    print("\n| the user's own parameter put back | oracle NDCG@10 |\n|---|---|")
    for key, value in own.items():
        print(f"| {key} | {value:.4f} |")
    print(f"\n{len(rows)} requests, {len(x):,} candidate rows x {len(names)} features; "
          f"{time.perf_counter() - t0:.0f} s")
    worst = max(table[:-1], key=lambda r: r[2])
    all_var, all_res = table[-1][1], table[-1][2]
    print(f"RESULT oracle_gap oracle_ndcg10={full:.4f} persona_oracle_ndcg10={pooled:.4f} "
          f"persona_ratio={pooled / full:.3f} inferred_persona_ndcg10={guessed:.4f} "
          f"persona_accuracy={persona_acc:.3f} requests={len(rows)} "
          f"features={len(names)} r2_all={1 - all_res / all_var:.3f} "
          f"unexplained_all={all_res:.3f} worst_term={worst[0]} "
          f"worst_unexplained={worst[2]:.3f} "
          + " ".join(f"unexplained_{t}={r:.3f}" for t, _, r in table[:-1]))


if __name__ == "__main__":
    main()
