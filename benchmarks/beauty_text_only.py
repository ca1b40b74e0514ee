"""Amazon Beauty 5-core, text only: a MiniLM profile of each user's history vs popularity.

Item texts (title, brand, categories, description) are encoded once with the bundled
all-MiniLM-L6-v2 (:class:`~kgrank.encoders.text.TextEncoder`) and cached in
``runs/cache/embeddings``, so reruns skip the encoding. :class:`EmbeddingProfile` scores items by
the dot product with the recency-weighted, normalised mean of the user's history embeddings; its
half-life (in distinct timestamps from the end) is tuned on validation, as is popularity's.
Leave-last-out, full ranking over all 12,101 items, each user's history masked.

    .venv/bin/python benchmarks/beauty_text_only.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time  # noqa: E402

from common import REPO, dataset, machine  # noqa: E402

from kgrank.baselines import Popularity  # noqa: E402
from kgrank.config import EvalConfig, SplitConfig  # noqa: E402
from kgrank.data.split import make_split  # noqa: E402
from kgrank.encoders.recommend import EmbeddingProfile  # noqa: E402
from kgrank.encoders.store import EmbeddingStore  # noqa: E402
from kgrank.encoders.text import TextEncoder, item_text  # noqa: E402
from kgrank.eval.protocol import tune_and_test  # noqa: E402
from kgrank.eval.report import metrics_table  # noqa: E402

CACHE = REPO / "runs" / "cache" / "embeddings"


def main() -> None:
    start = time.perf_counter()
    ds = dataset("amazon-5core", "amazon-beauty-2014-5core", "beauty")
    split = make_split(ds, SplitConfig(method="leave_last_out"))
    cfg = EvalConfig(ks=[5, 10, 20], main_metric="ndcg@10", bootstrap=1000)

    texts = item_text(ds.items)
    encoder = TextEncoder()
    store = EmbeddingStore(CACHE)
    t0 = time.perf_counter()
    emb = store.get_or_encode(encoder.encoder_id, texts,
                              lambda batch: encoder.encode(batch, progress=True))
    enc_s = time.perf_counter() - t0
    print(f"{machine()}")
    print(f"encoder {encoder.encoder_id}: {len(texts)} item texts, {store.last_encoded} encoded, "
          f"{store.last_cached} cached, {enc_s:.1f} s")

    text = tune_and_test("text_profile", lambda half_life: EmbeddingProfile(emb, half_life),
                         {"half_life": [0.5, 1.0, 3.0, 1000.0]}, split, cfg, progress=False)
    pop = tune_and_test("popularity", Popularity, {"half_life_days": [0.0, 30.0, 365.0]},
                        split, cfg, progress=False)
    print(f"total {time.perf_counter() - start:.0f} s; split {split.stats}")
    print()
    print(metrics_table([pop.test, text.test], ["ndcg@10", "hr@10"]))
    print()
    for t in (pop, text):
        trials = ", ".join(f"{p} -> {v:.4f}" for p, v in t.trials)
        print(f"{t.name}: chosen {t.params}; valid ndcg@10 per trial: {trials}")
    fields = []
    for t in (text, pop):
        r = t.test
        fields += [f"{t.name}_ndcg10={r.metrics['ndcg@10']:.4f}",
                   f"{t.name}_hr10={r.metrics['hr@10']:.4f}",
                   f"{t.name}_ndcg10_same={r.groups['same_time']['ndcg@10']:.4f}",
                   f"{t.name}_ndcg10_later={r.groups['later_time']['ndcg@10']:.4f}"]
    fields.append(f"text_half_life={text.params['half_life']:g}")
    fields.append(f"encode_s={enc_s:.1f}")
    print("RESULT beauty_text_only " + " ".join(fields))


if __name__ == "__main__":
    main()
