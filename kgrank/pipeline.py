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
import resource
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from kgrank.baselines import ItemKNN, Popularity, RandomScores, Transition
from kgrank.config import RunConfig
from kgrank.data.dataset import Dataset, load_dataset
from kgrank.data.split import Split, make_split
from kgrank.eval.protocol import EvalResult, Tuned, evaluate, paired_change, tune_and_test
from kgrank.eval.report import (
    json_safe,
    metrics_table,
    plot_bars,
    plot_changes,
    plot_family_importance,
    plot_ndcg_curves,
    write_metrics_json,
)
from kgrank.io import staged_dir
from kgrank.memory import release_free_memory

if TYPE_CHECKING:
    from kgrank.data.demo import DemoOracle

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
    """The demo shop's ground-truth scorer on the test requests: an upper bound for any model
    (None for a dataset without an oracle)."""
    from kgrank.data.demo import DemoOracle, has_oracle

    if not has_oracle(dataset.root):
        return None
    return evaluate_oracle(DemoOracle.load(dataset.root), dataset, split, cfg)


def evaluate_oracle(oracle: DemoOracle, dataset: Dataset, split: Split, cfg: RunConfig,
                    without: Collection[str] = (), name: str = "oracle") -> EvalResult:
    """Test metrics of a demo oracle (or a variant of one, e.g. :meth:`DemoOracle.persona_level`)
    through the run's evaluator; ``without``: terms left out (see :meth:`DemoOracle.score`),
    appended to ``name``."""
    from kgrank.data.demo import oracle_requests

    test = split.test.drop_duplicates("user_idx", keep="last")
    requests = oracle_requests(dataset.interactions, test["event_row"].to_numpy())
    requests.index = test["user_idx"].to_numpy()

    def score(users: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(oracle.score(requests.loc[users].reset_index(drop=True),
                                             without=without))

    name += "".join(f" -{t}" for t in without)
    return evaluate(score, split, "test", cfg.eval, name=name, progress=False)


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


STAGES = ("baselines", "graph", "encoders", "fusion", "ranking")


def enabled_stages(cfg: RunConfig) -> tuple[str, ...]:
    """The stages a config turns on (baselines always run: they are the reference)."""
    on = {"baselines": True, "graph": bool(cfg.graph.models),
          "encoders": bool(cfg.encoders.modalities), "fusion": cfg.fusion.enabled,
          "ranking": cfg.ranking.enabled}
    return tuple(s for s in STAGES if on[s])


@dataclass
class StageArtifacts:
    """What earlier stages hand to later ones within one run."""

    tuned: list[Tuned] = field(default_factory=list)
    graph: dict[str, Any] = field(default_factory=dict)
    encoders: Any | None = None
    fusion: Any | None = None
    fusion_without: dict[str, Any] = field(default_factory=dict)
    ranking: Any | None = None


def _ranking_baselines(cfg: RunConfig, tuned: list[Tuned]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Factories and tuned parameters of the baselines the ranker refits per part."""
    searches = baseline_searches(cfg)
    best = {t.name: t.params for t in tuned}
    out = {}
    for name in ("popularity", "itemknn", "transition"):
        make, space = searches[name]
        params = best.get(name, {k: v[0] for k, v in space.items()})
        if name == "transition" and "itemknn" in best and name not in best:
            knn = best["itemknn"]
            params.update(knn_neighbors=knn["neighbors"], knn_shrink=knn["shrink"],
                          knn_half_life=knn["half_life"])
        out[name] = (make, params)
    return out


def run(cfg: RunConfig, progress: bool = True, stages: tuple[str, ...] | None = None,
        ) -> RunResult:
    """Run the configured pipeline end to end and write the run directory atomically.

    ``stages`` (default: those the config enables, see :func:`enabled_stages`) picks a subset.
    Stage outputs (embeddings, checkpoints, models) are written into a temporary sibling of the
    run directory, which replaces ``runs/<name>`` only when every stage and the report succeeded.
    """
    start = time.perf_counter()
    stages = enabled_stages(cfg) if stages is None else stages
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
    torch.manual_seed(cfg.seed)
    dataset = prepare_data(cfg)
    split = make_split(dataset, cfg.data.split)
    log.info("split %s: %s", cfg.data.split.method, split.stats)
    art = StageArtifacts()
    timings: dict[str, float] = {"data": time.perf_counter() - start}
    lap = time.perf_counter()

    def mark(stage: str) -> None:
        # wall seconds and peak memory per stage, into timings.json: where time and memory go
        nonlocal lap
        release_free_memory()  # what the stage freed goes back to the OS (see kgrank.memory)
        now = time.perf_counter()
        timings[stage] = now - lap
        lap = now
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        timings[f"peak_rss_gib_after_{stage}"] = peak
        log.info("stage %s took %.1fs (peak RSS so far %.2f GiB)", stage, timings[stage], peak)

    with staged_dir(cfg.run_dir) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        art.tuned = run_baselines(cfg, split, progress) if "baselines" in stages else []
        results = [t.test for t in art.tuned]
        mark("baselines")
        if "graph" in stages and cfg.graph.models:
            from kgrank.graph.stage import run_graph_stage

            graph_results, art.graph = run_graph_stage(dataset, split, cfg, tmp / "graph",
                                                       progress)
            results += graph_results
            mark("graph")
        if "encoders" in stages and cfg.encoders.modalities:
            from kgrank.encoders.stage import run_encoder_stage

            art.encoders = run_encoder_stage(dataset, split, cfg, tmp / "encoders", progress)
            results += art.encoders.results
            mark("encoders")
        if "fusion" in stages:
            from kgrank.fusion.stage import run_fusion_stage

            ablate = "ranking" in stages and cfg.ranking.ablations
            fusion_results, art.fusion, art.fusion_without = run_fusion_stage(
                dataset, split, cfg, art, tmp / "fusion", progress, ablate)
            results += fusion_results
            mark("fusion")
        if "ranking" in stages:
            from kgrank.ranking.stage import RankingInputs, run_ranking_stage

            enc = art.encoders
            inputs = RankingInputs(
                baselines=_ranking_baselines(cfg, art.tuned),
                graph=art.graph,
                text=None if enc is None or enc.text is None else enc.text.emb,
                image=None if enc is None or enc.image is None else enc.image.emb,
                encode_query_text=None if enc is None or enc.text_encoder is None
                else enc.text_encoder.encode,
                encode_query_image=None if enc is None else enc.image_text_encoder,
                item_texts=item_texts(dataset),
                fusion=art.fusion,
                fusion_without=art.fusion_without,
            )
            art.ranking = run_ranking_stage(dataset, split, cfg, inputs, tmp / "ranking",
                                            progress)
            results += art.ranking.results
            mark("ranking")
        oracle = oracle_result(dataset, split, cfg)
        if oracle is not None:
            results.append(oracle)
        mark("oracle")
        seconds = time.perf_counter() - start
        timings["total"] = seconds
        (tmp / "timings.json").write_text(json.dumps(
            {k: round(v, 2) for k, v in timings.items()}, indent=2) + "\n")
        write_report(tmp, cfg, dataset, split, art.tuned, results, seconds, art.ranking)
    return RunResult(cfg.run_dir, dataset, split, art.tuned, results, seconds)


def item_texts(dataset: Dataset) -> list[str]:
    """The text of every catalog item (title, brand, categories, description)."""
    from kgrank.encoders.text import item_text

    return item_text(dataset.items)


def write_report(
    out: Path,
    cfg: RunConfig,
    dataset: Dataset,
    split: Split,
    tuned: list[Tuned],
    results: list[EvalResult],
    seconds: float,
    ranking: Any | None = None,
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
    text = render_report(cfg, dataset, split, tuned, results, seconds)
    if ranking is not None:
        plot_family_importance(out / "plots" / "feature_families.png", ranking.importance)
        changes = ablation_changes(cfg, results)
        if changes:
            (out / "ablations.json").write_text(
                json.dumps([json_safe(c) for c in changes], indent=2) + "\n")
            plot_changes(out / "plots" / "ablations.png", changes, cfg.eval.main_metric)
        text += render_ranking(cfg, results, ranking, changes)
    (out / "report.md").write_text(text)


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


def ablation_changes(cfg: RunConfig, results: list[EvalResult]) -> list[dict[str, Any]]:
    """Each leave-one-family-out ranker's change of the main metric against the full ranker,
    with its paired bootstrap CI (same test users); ``significant`` when the CI excludes 0."""
    main = cfg.eval.main_metric
    by_name = {r.name: r for r in results}
    full = by_name.get("fusion+ltr")
    if full is None:
        return []
    out = []
    for r in results:
        if not r.name.startswith("fusion+ltr -"):
            continue
        delta, low, high = paired_change(r, full, main, cfg.eval)
        out.append({"model": r.name, "family": r.name.removeprefix("fusion+ltr -"),
                    main: r.metrics[main], "change": delta, "change_ci_low": low,
                    "change_ci_high": high, "significant": bool(high < 0 or low > 0)})
    return out


def render_ranking(cfg: RunConfig, results: list[EvalResult], ranking: Any,
                   changes: list[dict[str, Any]] | None = None) -> str:
    """Report section of the ranking stage: candidate recall, ablations, importance, examples."""
    main = cfg.eval.main_metric
    by_name = {r.name: r for r in results}
    lines = ["", "## Ranking (fusion + LightGBM LambdaRank)", "",
             f"Trained on {ranking.info['train_requests']:,} validation requests whose target is "
             f"among the candidates ({ranking.info['train_rows']:,} rows, "
             f"{ranking.info['features']} features); never on test.", "",
             "Candidate recall (share of requests whose target is among the candidates; the "
             "ranker cannot do better):", "", "| source | valid | test |", "|---|---|---|"]
    rec = ranking.candidate_recall
    for key in rec["test"]:
        lines.append(f"| {key} | {rec['valid'].get(key, float('nan')):.4f} | "
                     f"{rec['test'][key]:.4f} |")
    full = by_name.get("fusion+ltr")
    if full is not None and changes:
        lo, hi = full.ci[main]
        lines += ["", "Leave-one-modality-out ablations (the ranker retrained without one "
                  "feature family, and the fusion score replaced by a fusion model trained "
                  "without that modality). The change is paired: both rankers score the same "
                  "test users, and its 95% bootstrap CI resamples users:", "",
                  f"| model | {main} [95% CI] | change [paired 95% CI] | drop beyond its CI "
                  "| ablation below the full model's CI |", "|---|---|---|---|---|"]
        lines.append(f"| fusion+ltr | {full.metrics[main]:.4f} [{lo:.4f}, {hi:.4f}] | | | |")
        for c in changes:
            r = by_name[c["model"]]
            drop = c["change_ci_high"] < 0
            lines.append(f"| {r.name} | {r.metrics[main]:.4f} [{r.ci[main][0]:.4f}, "
                         f"{r.ci[main][1]:.4f}] | {c['change']:+.4f} [{c['change_ci_low']:+.4f}, "
                         f"{c['change_ci_high']:+.4f}] | {'yes' if drop else 'no'} | "
                         f"{'yes' if r.ci[main][1] < lo else 'no'} |")
        lines += ["", "![ablations](plots/ablations.png)"]
    lines += ["", "Feature-family importance (share of total gain):", "",
              "| family | gain share |", "|---|---|"]
    for fam, share in sorted(ranking.importance.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {fam} | {share:.3f} |")
    lines += ["", "![feature families](plots/feature_families.png)", ""]
    if ranking.explanations:
        ex = ranking.explanations[0]
        lines += [f"Example explanation (user {ex['user']}, query {ex['query']!r}, device "
                  f"{ex['device']!r}, location {ex['location']!r}); per-family contributions "
                  "to the LightGBM score (they sum to the score):", "",
                  "| rank | item | score | " + " | ".join(ex["results"][0]["why"]) + " |",
                  "|---|---|---|" + "---|" * len(ex["results"][0]["why"])]
        for i, res in enumerate(ex["results"][:5], 1):
            lines.append(f"| {i} | {res['item']} | {res['score']:.3f} | "
                         + " | ".join(f"{v:+.3f}" for v in res["why"].values()) + " |")
        lines.append("")
    return "\n".join(lines)
