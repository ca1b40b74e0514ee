"""``kgrank run``: dataset -> split -> models -> evaluation -> report, in one run directory.

At this stage the models are the baselines; later stages (graph, encoders, fusion, ranking) plug in
as further steps that read the same :class:`~kgrank.data.split.Split` and are judged by the same
:func:`~kgrank.eval.protocol.evaluate`.

The run directory ``<output_dir>/<name>/`` gets ``config.yaml`` (the resolved config),
``metrics.json`` (test metrics per model), ``tuning.json`` (validation trials), ``report.md`` and
``plots/``. It is built in a temporary sibling and renamed into place when the run completes, so a
failed run leaves no half-written directory behind.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kgrank.baselines import ItemKNN, Popularity, RandomScores, Transition
from kgrank.config import RunConfig
from kgrank.data.dataset import Dataset, load_dataset
from kgrank.data.split import Split, make_split
from kgrank.eval.protocol import EvalResult, Tuned, evaluate, tune_and_test
from kgrank.eval.report import (
    metrics_table,
    plot_bars,
    plot_ndcg_curves,
    write_metrics_json,
)
from kgrank.io import staged_dir

log = logging.getLogger("kgrank")


@dataclass
class RunResult:
    run_dir: Path
    dataset: Dataset
    split: Split
    tuned: list[Tuned]
    results: list[EvalResult]
    seconds: float


def prepare_data(cfg: RunConfig) -> Dataset:
    """Load the configured dataset, generating the demo shop first when asked to."""
    path = Path(cfg.data.path)
    if cfg.data.demo and not path.exists():
        from kgrank.data.demo import DemoConfig, generate_demo

        log.info("generating the demo shop at %s", path)
        generate_demo(
            path, DemoConfig(n_users=cfg.data.demo_users, n_items=cfg.data.demo_items, seed=cfg.seed)
        )
    return load_dataset(path)


def baseline_searches(cfg: RunConfig) -> dict[str, tuple[Callable[..., Any], dict[str, list[Any]]]]:
    """Model factory and validation grid of each configured baseline."""
    b = cfg.baselines
    knn: dict[str, list[Any]] = {"neighbors": b.itemknn.neighbors, "shrink": b.itemknn.shrink,
           "half_life": b.itemknn.half_life}
    return {
        "random": (RandomScores, {"seed": [cfg.seed]}),
        "popularity": (Popularity, {"half_life_days": b.popularity_half_life_days}),
        "itemknn": (ItemKNN, knn),
        "transition": (Transition, {"backoff": b.transition.backoff,
                                    "half_life": b.transition.half_life}),
    }


def oracle_result(dataset: Dataset, split: Split, cfg: RunConfig) -> EvalResult | None:
    """The demo shop's ground-truth scorer on the test requests: an upper bound for any model."""
    from kgrank.data.demo import DemoOracle, has_oracle, oracle_requests

    if not has_oracle(dataset.root):
        return None
    oracle = DemoOracle.load(dataset.root)
    test = split.test.drop_duplicates("user_idx", keep="last")
    requests = oracle_requests(dataset.interactions, test["event_row"].to_numpy())
    requests.index = test["user_idx"].to_numpy()

    def score(users: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(oracle.score(requests.loc[users].reset_index(drop=True)))

    return evaluate(score, split, "test", cfg.eval, name="oracle", progress=False)


def run_baselines(cfg: RunConfig, split: Split, progress: bool) -> list[Tuned]:
    """Tune each configured baseline on validation and evaluate it on test."""
    searches = baseline_searches(cfg)
    tuned: list[Tuned] = []
    for name in cfg.baselines.models:
        make, space = searches[name]
        if name == "transition" and tuned and tuned[-1].name == "itemknn":
            knn = tuned[-1].params  # back off to the ItemKNN tuned on validation
            space = {**space, "knn_neighbors": [knn["neighbors"]], "knn_shrink": [knn["shrink"]],
                     "knn_half_life": [knn["half_life"]]}
        t0 = time.perf_counter()
        result = tune_and_test(name, make, space, split, cfg.eval, progress=progress)
        log.info("%s: %s=%.4f (valid %.4f) params=%s in %.1fs", name, cfg.eval.main_metric,
                 result.test.metrics[cfg.eval.main_metric],
                 result.valid.metrics[cfg.eval.main_metric], result.params,
                 time.perf_counter() - t0)
        tuned.append(result)
    return tuned


def run(cfg: RunConfig, progress: bool = True, stages: tuple[str, ...] = ("baselines", "graph"),
        ) -> RunResult:
    """Run the configured pipeline end to end and write the run directory atomically.

    Stage outputs (embeddings, checkpoints) are written into a temporary sibling of the run
    directory, which replaces ``runs/<name>`` only when every stage and the report succeeded.
    """
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dataset = prepare_data(cfg)
    split = make_split(dataset, cfg.data.split)
    log.info("split %s: %s", cfg.data.split.method, split.stats)
    with staged_dir(cfg.run_dir) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        tuned = run_baselines(cfg, split, progress) if "baselines" in stages else []
        results = [t.test for t in tuned]
        if "graph" in stages and cfg.graph.models:
            from kgrank.graph.stage import run_graph_stage

            results += run_graph_stage(dataset, split, cfg, tmp / "graph", progress)
        oracle = oracle_result(dataset, split, cfg)
        if oracle is not None:
            results.append(oracle)
        seconds = time.perf_counter() - start
        write_report(tmp, cfg, dataset, split, tuned, results, seconds)
    return RunResult(cfg.run_dir, dataset, split, tuned, results, seconds)


def write_report(
    out: Path,
    cfg: RunConfig,
    dataset: Dataset,
    split: Split,
    tuned: list[Tuned],
    results: list[EvalResult],
    seconds: float,
) -> None:
    """metrics.json, tuning.json, plots and report.md into the (staged) run directory."""
    write_metrics_json(out / "metrics.json", results)
    trials = {t.name: {"best": t.params, "valid": t.valid.flat(),
                       "trials": [{"params": p, cfg.eval.main_metric: v} for p, v in t.trials]}
              for t in tuned}
    (out / "tuning.json").write_text(json.dumps(trials, indent=2, default=str) + "\n")
    ks = sorted(set(cfg.eval.ks))
    plot_ndcg_curves(out / "plots" / "ndcg_at_k.png", results, ks)
    plot_bars(out / "plots" / "main_metric.png", results, cfg.eval.main_metric)
    (out / "report.md").write_text(render_report(cfg, dataset, split, tuned, results, seconds))


def report_keys(cfg: RunConfig) -> list[str]:
    main = cfg.eval.main_metric
    k = main.partition("@")[2]
    keys = [main, f"hr@{k}", f"recall@{k}", f"mrr@{k}"]
    return list(dict.fromkeys(keys))


def render_report(
    cfg: RunConfig,
    dataset: Dataset,
    split: Split,
    tuned: list[Tuned],
    results: list[EvalResult],
    seconds: float,
) -> str:
    keys = report_keys(cfg)
    lines = [
        f"# kgrank run `{cfg.name}`",
        "",
        f"Dataset `{dataset.root}` (fingerprint `{dataset.fingerprint}`): {dataset.n_users:,} users, "
        f"{dataset.n_items:,} items, {len(dataset.interactions):,} events. Split "
        f"`{split.method}`: {split.stats}.",
        "",
        f"Test metrics, full ranking over all {dataset.n_items:,} items with each user's history "
        "masked; mean [bootstrap 95% CI]; ties broken by a fixed random item permutation. "
        "Same-time users: the test event shares its timestamp with the user's latest history "
        "event (their within-timestamp order is unknown).",
        "",
        metrics_table(results, keys),
        "",
        "## Tuned on validation",
        "",
        "| model | best params | valid " + cfg.eval.main_metric + " |",
        "|---|---|---|",
    ]
    for t in tuned:
        lines.append(f"| {t.name} | `{t.params}` | {t.valid.metrics[cfg.eval.main_metric]:.4f} |")
    lines += [
        "",
        "## Plots",
        "",
        "![NDCG@k](plots/ndcg_at_k.png)",
        "",
        f"![{cfg.eval.main_metric}](plots/main_metric.png)",
        "",
        f"Run time {seconds:.1f} s.",
        "",
    ]
    return "\n".join(lines)
