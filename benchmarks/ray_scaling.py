"""Graph-model training in-process vs Ray Train (1 and 2 CPU workers) on the demo shop.

Same machine, same run, same LightGCN settings (``configs/demo.yaml``, a fixed number of
epochs). For each variant: the mean training-step seconds per epoch (BPR sampling + optimisation;
rank 0 on Ray), the mean checkpoint-report seconds per epoch (Ray only), the wall time of the
whole training call (Ray start-up, worker start, validation and checkpoints included), and the
test NDCG@10 with its bootstrap 95% CI (the project's judge, ``eval.bootstrap`` resamples). The
equivalence check: the 2-worker NDCG@10 (``split_batch``: the in-process optimisation) lies
inside the in-process CI and vice versa. A last row runs 2 workers with ``split_batch=False``
(each worker steps on ``batch_size`` triples: half the steps per epoch, a twice larger batch).

Threads: every process (the in-process trainer, each Ray worker) runs torch with ``--threads``
intra-op threads (default 1). On the shared 2-core VM, 2 threads in one process made a LightGCN
epoch 4-20x slower than 1 thread (OpenMP threads spinning against the other jobs), which would
swamp any comparison.

    RAY_AUTH_MODE=disabled nice -n 19 .venv/bin/python benchmarks/ray_scaling.py --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from kgrank.config import RayTrainConfig, load_config  # noqa: E402
from kgrank.data.split import make_split  # noqa: E402
from kgrank.eval.protocol import evaluate  # noqa: E402
from kgrank.graph.build import build_graph  # noqa: E402
from kgrank.graph.train import GraphModelResult, train_graph_model  # noqa: E402
from kgrank.pipeline import prepare_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", default="lightgcn", choices=["lightgcn", "kg"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fault-epoch", type=int, default=0,
                    help="also run 2 workers with the last worker crashing once at this epoch "
                    "(KGRANK_FAIL_AT_EPOCH) and compare with the uninterrupted 2-worker run")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    dataset = prepare_data(cfg)
    split = make_split(dataset, cfg.data.split)
    kg = build_graph(dataset, split, cfg.graph.build)
    base = cfg.graph.lightgcn if args.model == "lightgcn" else cfg.graph.kg
    train_cfg = base.model_copy(update={"epochs": args.epochs, "eval_every": args.eval_every,
                                        "patience": args.epochs})
    print(f"{machine()}; {dataset.n_users} users, {dataset.n_items} items, "
          f"{len(split.train)} training events; {args.model}, {args.epochs} epochs")

    import ray

    storage = Path(tempfile.mkdtemp(prefix="kgrank-ray-bench-"))
    rows: list[tuple[str, GraphModelResult, float]] = []
    t0 = time.perf_counter()
    rows.append(("in-process", train_graph_model(args.model, kg, split, train_cfg, cfg.eval, None,
                                                 progress=False), time.perf_counter() - t0))
    from kgrank.distributed.train_graph import train_graph_model_ray

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             logging_level=logging.ERROR)
    try:
        for workers, split_batch in ((1, True), (2, True), (2, False)):
            ray_cfg = RayTrainConfig(address="local", workers=workers,
                                     threads_per_worker=args.threads, cpus_per_worker=1.0,
                                     storage_path=str(storage), split_batch=split_batch)
            t0 = time.perf_counter()
            result = train_graph_model_ray(args.model, kg, split, train_cfg, cfg.eval, None,
                                           ray_cfg, progress=False)
            label = f"ray {workers} worker{'s' if workers > 1 else ''}"
            rows.append((label if split_batch else f"{label} full batch", result,
                         time.perf_counter() - t0))
        if args.fault_epoch:
            os.environ["KGRANK_FAIL_AT_EPOCH"] = str(args.fault_epoch)
            os.environ["KGRANK_FAIL_MARKER"] = str(storage / "fault-marker")
            ray_cfg = RayTrainConfig(address="local", workers=2, threads_per_worker=args.threads,
                                     storage_path=str(storage), max_failures=1)
            t0 = time.perf_counter()
            result = train_graph_model_ray(args.model, kg, split, train_cfg, cfg.eval, None,
                                           ray_cfg, progress=False)
            assert (storage / "fault-marker").exists(), "the injected failure did not happen"
            rows.append((f"ray 2 workers, crash at epoch {args.fault_epoch}", result,
                         time.perf_counter() - t0))
    finally:
        os.environ.pop("KGRANK_FAIL_AT_EPOCH", None)
        ray.shutdown()

    main_metric = "ndcg@10"
    base_step = rows[0][1].mean_epoch_seconds
    table = ["| variant | step s/epoch | ratio | report s/epoch | wall s (total) | "
             "test NDCG@10 [95% CI] |", "|---|---|---|---|---|---|"]
    found: dict[str, tuple[float, float, float]] = {}
    out: dict[str, float] = {}
    for label, result, wall in rows:
        test = evaluate(result.score, split, "test", cfg.eval, name=label, progress=False)
        value, (lo, hi) = test.metrics[main_metric], test.ci[main_metric]
        found[label] = (value, lo, hi)
        step = result.mean_epoch_seconds
        reports = [r.extra["report_seconds"] for r in result.history
                   if "report_seconds" in r.extra]
        report = float(np.mean(reports)) if reports else 0.0
        table.append(f"| {label} | {step:.2f} | {step / base_step:.2f} | {report:.2f} | "
                     f"{wall:.1f} | {value:.4f} [{lo:.4f}, {hi:.4f}] |")
        key = label.replace("-", "_").replace(" workers", "w").replace(" worker", "w") \
            .replace(" full batch", "_fullbatch").replace(", crash at epoch ", "_crash") \
            .replace(" ", "")
        out.update({f"{key}_step_s": step, f"{key}_ratio": step / base_step,
                    f"{key}_report_s": report, f"{key}_wall_s": wall, f"{key}_ndcg10": value})
    for label, result, _ in rows:
        print(f"{label}: step seconds per epoch " + " ".join(f"{r.seconds:.2f}"
                                                          for r in result.history))
    print("\n".join(table))
    v0, lo0, hi0 = found["in-process"]
    v2, lo2, hi2 = found["ray 2 workers"]
    equivalent = lo0 <= v2 <= hi0 and lo2 <= v0 <= hi2
    print(f"NDCG@10 in-process {v0:.4f} [{lo0:.4f}, {hi0:.4f}] vs 2 workers {v2:.4f} "
          f"[{lo2:.4f}, {hi2:.4f}]: {'within' if equivalent else 'NOT within'} each other's CIs")
    crashed = [label for label, _, _ in rows if "crash" in label]
    same = True
    if crashed:
        vc = found[crashed[0]][0]
        same = abs(vc - v2) < 1e-9
        print(f"fault tolerance: crashed-and-resumed 2-worker run NDCG@10 {vc:.4f} vs "
              f"uninterrupted {v2:.4f} ({'identical' if same else 'different'})")
    print("RESULT ray_scaling " + " ".join(f"{k}={v:.4f}" for k, v in out.items())
          + f" epochs={args.epochs} model={args.model} ndcg_equivalent={str(equivalent).lower()}"
          + (f" resumed_identical={str(same).lower()}" if crashed else ""))


if __name__ == "__main__":
    main()
