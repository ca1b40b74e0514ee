"""kgrank LightGCN on Gowalla with the paper's split and settings, against the published numbers.

He et al., LightGCN, SIGIR 2020: Gowalla (29,858 users, 40,981 items, 810,128 training and
217,242 test interactions), 3 layers, d = 64, Adam lr 1e-3, batch 2048, L2 1e-4 on the batch's
ego embeddings, full ranking of all items with the training items masked. Published (best epoch
of ~1000): Recall@20 0.1830, NDCG@20 0.1554.

The split is the predefined train/test one with NO validation part, so -- exactly as the
authors' code does -- the TEST Recall@20 / NDCG@20 are printed after every epoch. They are
labelled as such: choosing an epoch from them would be tuning on test. Metrics come from
kgrank's judge (:func:`kgrank.eval.protocol.evaluate`, random tie-breaking); Recall@20 divides
by the user's number of test items and NDCG@20's ideal DCG uses min(|test items|, 20), as in the
authors' code. On CPU only a few epochs fit; ``--device cuda`` runs unchanged.

    .venv/bin/python benchmarks/gowalla_lightgcn.py --epochs 3
    .venv/bin/python benchmarks/gowalla_lightgcn.py --epochs 1000 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import dataset, machine

from kgrank.config import EvalConfig, GraphTrainConfig, SplitConfig
from kgrank.data.split import make_split
from kgrank.eval.protocol import Scorer, evaluate
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.train import train_graph_model

PAPER = {"recall@20": 0.1830, "ndcg@20": 0.1554}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--reg", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    ds = dataset("lightgcn", "lightgcn-gowalla", "gowalla")
    split = make_split(ds, SplitConfig(method="predefined", positive_events=["click"],
                                       valid_ratio=0.0))
    assert len(split.valid) == 0, "expected the paper's train/test split without validation"
    train = split.train
    kg = KnowledgeGraph(ds.n_users, ds.n_items, train["user_idx"].to_numpy(),
                        train["item_idx"].to_numpy(), np.ones(len(train), np.float32))
    print(f"{machine()}; device {args.device}")
    print(f"Gowalla: {ds.n_users:,} users, {ds.n_items:,} items, {len(split.train):,} train, "
          f"{len(split.test):,} test interactions; loaded in {time.perf_counter() - start:.0f} s")
    cfg = GraphTrainConfig(dim=args.dim, layers=args.layers, lr=args.lr,
                           batch_size=args.batch_size, reg=args.reg, epochs=args.epochs,
                           seed=args.seed, device=args.device, eval_metric="ndcg@20")
    eval_cfg = EvalConfig(ks=[20], main_metric="ndcg@20", bootstrap=0, batch_size=2048)

    def on_epoch(epoch: int, score: Scorer) -> dict[str, float]:
        res = evaluate(score, split, "test", eval_cfg, name="lightgcn", progress=False)
        return {"test_recall@20": res.metrics["recall@20"], "test_ndcg@20": res.metrics["ndcg@20"]}

    result = train_graph_model("lightgcn", kg, split, cfg, eval_cfg, None, progress=True,
                               on_epoch=on_epoch)
    print("\n| epoch | BPR loss | TEST Recall@20 | TEST NDCG@20 | epoch s | eval s |")
    print("|---|---|---|---|---|---|")
    for r in result.history:
        print(f"| {r.epoch} | {r.loss:.4f} | {r.extra['test_recall@20']:.4f} | "
              f"{r.extra['test_ndcg@20']:.4f} | {r.seconds:.1f} | {r.eval_seconds:.1f} |")
    print(f"| paper (best of ~1000 epochs) | | {PAPER['recall@20']:.4f} | "
          f"{PAPER['ndcg@20']:.4f} | | |")
    last = result.history[-1]
    print(f"\nRESULT gowalla_lightgcn epochs={len(result.history)} device={args.device} "
          f"test_recall20={last.extra['test_recall@20']:.4f} "
          f"test_ndcg20={last.extra['test_ndcg@20']:.4f} "
          f"paper_recall20={PAPER['recall@20']} paper_ndcg20={PAPER['ndcg@20']} "
          f"epoch_s={result.mean_epoch_seconds:.1f}")


if __name__ == "__main__":
    main()
