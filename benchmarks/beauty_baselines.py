"""Amazon Beauty 5-core baselines: popularity, ItemKNN and transition, tuned on validation.

Leave-last-out, full ranking over all 12,101 items, each user's history masked; for the test item
the history includes the validation item. Prints NDCG@10 / HR@10 with bootstrap 95% CIs, overall
and for same-time / later-time users (test event on the same day as the previous one, whose
within-day order in the source is an ASIN sort).

    .venv/bin/python benchmarks/beauty_baselines.py
"""

from __future__ import annotations

from common import REPO, dataset, machine

from kgrank.config import load_config
from kgrank.eval.report import metrics_table
from kgrank.pipeline import report_keys, run


def main() -> None:
    ds = dataset("amazon-5core", "amazon-beauty-2014-5core", "beauty")
    cfg = load_config(REPO / "configs" / "beauty.yaml",
                      [f"data.path={ds.root}", f"output_dir={REPO / 'runs'}",
                       "baselines.models=[random,popularity,itemknn,transition]"])
    result = run(cfg, progress=False)
    print(f"{machine()}; {result.seconds:.0f} s; run dir {result.run_dir}")
    print(metrics_table(result.results, report_keys(cfg)))
    for t in result.tuned:
        print(f"{t.name}: {t.params}")
    by = {r.name: r for r in result.results}
    fields = []
    for name in ("popularity", "itemknn", "transition"):
        r = by[name]
        fields += [f"{name}_ndcg10={r.metrics['ndcg@10']:.4f}", f"{name}_hr10={r.metrics['hr@10']:.4f}",
                   f"{name}_ndcg10_same={r.groups['same_time']['ndcg@10']:.4f}",
                   f"{name}_ndcg10_later={r.groups['later_time']['ndcg@10']:.4f}"]
    print("RESULT beauty_baselines " + " ".join(fields))


if __name__ == "__main__":
    main()
