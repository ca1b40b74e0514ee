"""Run reports: ``metrics.json``, ``report.md`` with the metrics table, and PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from kgrank.eval.protocol import EvalResult  # noqa: E402
from kgrank.io import atomic_write_text  # noqa: E402


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with NaN floats as None (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def write_metrics_json(path: Path, results: Sequence[EvalResult]) -> None:
    """``{model name: {"ndcg@10": ..., "hr@10": ..., ...}}`` (test part), NaN written as null."""
    payload = {res.name: json_safe(res.flat()) for res in results}
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def _fmt(res: EvalResult, key: str) -> str:
    low, high = res.ci[key]
    if math.isnan(low):
        return f"{res.metrics[key]:.4f}"
    return f"{res.metrics[key]:.4f} [{low:.4f}, {high:.4f}]"


def metrics_table(results: Sequence[EvalResult], keys: Sequence[str]) -> str:
    """Markdown table: one row per model, mean [95% CI] per metric, then same/later-time NDCG."""
    main = keys[0]
    head = ["model", *keys, f"{main} same-time", f"{main} later-time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        row = [res.name, *(_fmt(res, k) for k in keys)]
        row += [f"{res.groups[g][main]:.4f} (n={res.group_sizes[g]})" for g in ("same_time", "later_time")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_ndcg_curves(path: Path, results: Sequence[EvalResult], ks: Sequence[int]) -> None:
    """NDCG@k against k, one line per model, with CI bars."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for res in results:
        ys = [res.metrics[f"ndcg@{k}"] for k in ks]
        lo = [res.metrics[f"ndcg@{k}"] - res.ci[f"ndcg@{k}"][0] for k in ks]
        hi = [res.ci[f"ndcg@{k}"][1] - res.metrics[f"ndcg@{k}"] for k in ks]
        if any(math.isnan(v) for v in lo + hi):
            ax.plot(ks, ys, marker="o", label=res.name)
        else:
            ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=3, label=res.name)
    ax.set_xlabel("k")
    ax.set_ylabel("NDCG@k (test)")
    ax.set_xticks(list(ks))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_bars(path: Path, results: Sequence[EvalResult], key: str) -> None:
    """One bar per model with its 95% CI, split by same-time / later-time users."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [r.name for r in results]
    xs = range(len(results))
    width = 0.27
    for offset, (label, get) in zip(
        (-width, 0.0, width),
        (
            ("all", lambda r: r.metrics[key]),
            ("same-time", lambda r: r.groups["same_time"][key]),
            ("later-time", lambda r: r.groups["later_time"][key]),
        ),
        strict=True,
    ):
        ax.bar([x + offset for x in xs], [get(r) for r in results], width, label=label)
    for x, r in zip(xs, results, strict=True):
        low, high = r.ci[key]
        if not math.isnan(low):
            ax.errorbar(x - width, r.metrics[key], yerr=[[r.metrics[key] - low], [high - r.metrics[key]]],
                        color="black", capsize=3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{key} (test)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_family_importance(path: Path, importance: dict[str, float]) -> None:
    """Horizontal bars: each feature family's share of the ranker's total gain."""
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(5.5, 0.4 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("share of LightGBM gain")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_changes(path: Path, changes: Sequence[dict[str, Any]], key: str) -> None:
    """Horizontal bars: each ablation's change of ``key`` with its paired 95% CI (red when the
    CI excludes 0)."""
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(changes) + 1.3))
    ys = range(len(changes))
    for y, c in zip(ys, changes, strict=True):
        err = [[c["change"] - c["change_ci_low"]], [c["change_ci_high"] - c["change"]]]
        color = "tab:red" if c["significant"] else "tab:gray"
        ax.barh(y, c["change"], color=color)
        if not (math.isnan(err[0][0]) or math.isnan(err[1][0])):
            ax.errorbar(c["change"], y, xerr=err, color="black", capsize=3)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([c["model"] for c in changes], fontsize=8)
    ax.set_xlabel(f"change of {key} vs fusion+ltr (paired 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
