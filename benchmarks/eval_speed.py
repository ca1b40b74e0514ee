"""Full-ranking evaluation speed on Amazon Beauty against the floor measured in the same run.

Floor: for the same test users and batch size, one users x items score product plus top-k, the
least any full-ranking evaluator must do. kgrank: :func:`kgrank.eval.protocol.evaluate` with the
same scorer (history masking, random tie-breaking, all metrics at 3 cut-offs, coverage), with and
without the 1000-resample bootstrap CIs. Bar: ratio <= 3.

    .venv/bin/python benchmarks/eval_speed.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import dataset, machine

from kgrank.config import EvalConfig, SplitConfig
from kgrank.data.split import make_split
from kgrank.eval.protocol import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ds = dataset("amazon-5core", "amazon-beauty-2014-5core", "beauty")
    split = make_split(ds, SplitConfig())
    gen = torch.Generator().manual_seed(0)
    user_emb = torch.randn(ds.n_users, args.dim, generator=gen)
    item_emb = torch.randn(ds.n_items, args.dim, generator=gen)
    users = np.unique(split.test["user_idx"].to_numpy())
    cfg = EvalConfig()

    def floor() -> None:
        for lo in range(0, len(users), cfg.batch_size):
            scores = user_emb[users[lo : lo + cfg.batch_size]] @ item_emb.T
            torch.topk(scores, max(cfg.ks), dim=1)

    def kgrank(bootstrap: int) -> None:
        evaluate(lambda u: user_emb[u] @ item_emb.T, split, "test",
                 cfg.model_copy(update={"bootstrap": bootstrap}), progress=False)

    timings: dict[str, list[float]] = {"floor": [], "kgrank_no_ci": [], "kgrank_ci1000": []}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        for name, fn in (("floor", floor), ("kgrank_no_ci", lambda: kgrank(0)),
                         ("kgrank_ci1000", lambda: kgrank(1000))):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in timings.items()}
    print(f"Amazon Beauty: {len(users):,} test users x {ds.n_items:,} items, dim {args.dim}, "
          f"batch {cfg.batch_size}; {machine()}; best of {args.repeats}")
    print("| step | seconds | ratio to floor |")
    print("|---|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.3f} | {sec / best['floor']:.2f} |")
    print(f"RESULT eval_speed users={len(users)} items={ds.n_items} floor_s={best['floor']:.3f} "
          f"kgrank_s={best['kgrank_no_ci']:.3f} kgrank_ci_s={best['kgrank_ci1000']:.3f} "
          f"ratio={best['kgrank_no_ci'] / best['floor']:.2f} "
          f"ratio_with_ci={best['kgrank_ci1000'] / best['floor']:.2f}")


if __name__ == "__main__":
    main()
