"""``kgrank export RUN_DIR OUT_DIR``: a self-contained serving bundle of a finished run.

Layout (all written into a temporary sibling of ``OUT_DIR`` and renamed into place)::

    manifest.json                 schema version, kgrank version, config hash, dataset
                                  fingerprint, embeddings (dims, normalisation), files, ONNX check
    config.yaml                   the run's resolved config
    tuning.json                   the baselines' tuned parameters (refitted at serving start)
    dataset/                      copy of the run's dataset (Parquet tables + product images):
                                  serving refits the history-based models (ItemKNN, transition,
                                  popularity, behaviour features) on it with the same code as the
                                  ranking stage, deterministically
    embeddings/<stage>_<kind>.parquet   id + fixed-size float32 vector (graph models, text,
                                  image, fusion items; graph users; fusion users in a neutral
                                  context: no query / device / location, at the end of history)
    index/fusion_items.faiss      FAISS IndexFlatIP over the fused item embeddings (unit rows)
    onnx/{user,item}_tower.onnx   the fusion towers (checked against torch, max abs diff <= 1e-5)
    fusion/fusion.json            fusion spec, context vocabulary, cached query texts
    fusion/queries.safetensors    the cached query vectors
    encoders/image/queries.safetensors   the same queries through the image model's text tower
    ranking/ltr_model.txt (+ .meta.json)   the LightGBM LambdaRank model as text
    encoders/<m>/meta.json        encoder ids (+ the LiT-aligned image weights when used)

Nothing is pickled: Parquet, JSON, safetensors, ONNX, LightGBM text, FAISS's own format.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_np
from tqdm.auto import tqdm

import kgrank
from kgrank.config import RunConfig, load_config
from kgrank.data.dataset import load_dataset
from kgrank.data.split import make_split
from kgrank.export.manifest import (
    SCHEMA_VERSION,
    EmbeddingEntry,
    ExportError,
    Manifest,
    config_hash,
    now_utc,
    write_manifest,
)
from kgrank.export.tables import write_embeddings
from kgrank.features.requests import Requests
from kgrank.io import staged_dir

log = logging.getLogger("kgrank")

FULL = "fusion+ltr"


def _copy_dataset(src: Path, dst: Path) -> None:
    """The dataset's tables and images (not the demo oracle: serving never needs it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("oracle", ".*"))


def run_config(run_dir: Path, data_path: Path | None = None) -> RunConfig:
    """The resolved config a run wrote (``data.path`` replaced by ``data_path`` when given)."""
    overrides = [f"data.path={data_path}"] if data_path is not None else []
    return load_config(run_dir / "config.yaml", overrides)


def export_run(run_dir: Path, out_dir: Path, data_path: Path | None = None,
               overwrite: bool = True, progress: bool = True) -> Path:
    """Export the run in ``run_dir`` to ``out_dir`` (atomically); returns ``out_dir``.

    ``data_path`` points at the run's dataset when ``data.path`` of its config is relative to
    another working directory. The run must have a fusion model and a ranking model.
    """
    from kgrank.export.onnx import check_towers, example_batch, export_towers
    from kgrank.fusion.train import FusionResult

    t0 = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for need in ("config.yaml", "metrics.json", "fusion/fusion.json", "ranking/ltr_model.txt"):
        if not (run_dir / need).is_file():
            raise ExportError(f"{run_dir}: not a complete run with fusion and ranking "
                              f"({need} is missing)")
    cfg = run_config(run_dir, data_path)
    dataset = load_dataset(cfg.data.path)
    split = make_split(dataset, cfg.data.split)
    item_ids = [str(i) for i in dataset.items["item_id"]]
    user_ids = [str(u) for u in dataset.users["user_id"]]
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if FULL not in metrics:
        raise ExportError(f"{run_dir}/metrics.json has no {FULL!r} result")
    steps = tqdm(total=7, desc="export", disable=not progress)
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        files: dict[str, str] = {}
        entries: list[EmbeddingEntry] = []

        def put_emb(stage: str, kind: str, ids: list[str], vec: np.ndarray, normalised: bool,
                    present: np.ndarray | None = None, note: str = "") -> None:
            rel = f"embeddings/{stage}_{kind}.parquet"
            write_embeddings(tmp / rel, ids, vec, present)
            entries.append(EmbeddingEntry(stage, kind, rel, int(vec.shape[1]), len(ids),
                                          normalised, note))

        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        files["config"] = "config.yaml"
        if (run_dir / "tuning.json").is_file():
            shutil.copy2(run_dir / "tuning.json", tmp / "tuning.json")
            files["tuning"] = "tuning.json"
        _copy_dataset(dataset.root, tmp / "dataset")
        files["dataset"] = "dataset"
        steps.update()

        for model_dir in sorted((run_dir / "graph").glob("*/embeddings.safetensors")):
            name = model_dir.parent.name
            emb = load_file(str(model_dir))
            note = "test-time propagation (training + validation interactions)"
            put_emb(f"graph_{name}", "items", item_ids, emb["item"], False, note=note)
            put_emb(f"graph_{name}", "users", user_ids, emb["user"], False, note=note)
        for modality in ("text", "image"):
            enc_dir = run_dir / "encoders" / modality
            if not (enc_dir / "embeddings.safetensors").is_file():
                continue
            emb = load_file(str(enc_dir / "embeddings.safetensors"))
            put_emb(modality, "items", item_ids, emb["item_emb"], True,
                    emb["mask"].astype(bool))
            (tmp / "encoders" / modality).mkdir(parents=True)
            for fname in ("meta.json", "item_ids.json"):
                shutil.copy2(enc_dir / fname, tmp / "encoders" / modality / fname)
            for aligned in enc_dir.glob("*.safetensors"):
                if aligned.name != "embeddings.safetensors":
                    shutil.copy2(aligned, tmp / "encoders" / modality / aligned.name)
                    files[f"{modality}_aligned"] = f"encoders/{modality}/{aligned.name}"
        steps.update()

        fusion = FusionResult.load(run_dir / "fusion")
        (tmp / "fusion").mkdir()
        shutil.copy2(run_dir / "fusion" / "fusion.json", tmp / "fusion" / "fusion.json")
        save_np({"queries": np.ascontiguousarray(fusion.queries.vectors, np.float32)},
                str(tmp / "fusion" / "queries.safetensors"))
        files["fusion_meta"] = "fusion/fusion.json"
        files["fusion_queries"] = "fusion/queries.safetensors"
        if fusion.queries.texts and "image" in cfg.encoders.modalities and (
                tmp / "encoders" / "image").is_dir():
            # the known queries through the image model's text tower, once (serving pins them:
            # ~37 ms a query on one core, measured at searcher start-up on the demo)
            from kgrank.encoders.stage import build_image_encoder

            lit = files.get("image_aligned")
            encoder = build_image_encoder(cfg.encoders.image, None if lit is None else tmp / lit)
            save_np({"queries": np.ascontiguousarray(
                encoder.encode_text(list(fusion.queries.texts)), np.float32)},
                str(tmp / "encoders" / "image" / "queries.safetensors"))
            files["image_queries"] = "encoders/image/queries.safetensors"
        fused = fusion.item_emb()
        put_emb("fusion", "items", item_ids, fused, True)
        history = split.history("test")
        t_end = int(history["timestamp"].max().timestamp()) if len(history) else 0
        n = dataset.n_users
        neutral = Requests(np.arange(n, dtype=np.int64), np.full(n, t_end, np.int64),
                           np.full(n, None, object), np.full(n, None, object),
                           np.full(n, None, object))
        put_emb("fusion", "users", user_ids, fusion.user_vectors(neutral, history), True,
                note="user tower in a neutral context: no query, device or location, at the "
                     "time of the last history event; serving recomputes it per request")
        steps.update()

        paths = export_towers(fusion.model, tmp / "onnx", fusion.config.history_len)
        check = check_towers(fusion.model, paths,
                             example_batch(fusion.model, 64, fusion.config.history_len))
        files["user_tower"] = "onnx/user_tower.onnx"
        files["item_tower"] = "onnx/item_tower.onnx"
        log.info("onnx towers: %s", check)
        steps.update()

        import faiss

        index = faiss.IndexFlatIP(int(fused.shape[1]))
        index.add(np.ascontiguousarray(fused, dtype=np.float32))
        (tmp / "index").mkdir()
        faiss.write_index(index, str(tmp / "index" / "fusion_items.faiss"))
        files["faiss_index"] = "index/fusion_items.faiss"
        steps.update()

        (tmp / "ranking").mkdir()
        for src in (run_dir / "ranking").glob("ltr_model.txt*"):
            shutil.copy2(src, tmp / "ranking" / src.name)
        for extra in ("info.json", "importance.json"):
            if (run_dir / "ranking" / extra).is_file():
                shutil.copy2(run_dir / "ranking" / extra, tmp / "ranking" / extra)
        files["ltr_model"] = "ranking/ltr_model.txt"
        steps.update()

        manifest = Manifest(
            schema_version=SCHEMA_VERSION, kgrank_version=kgrank.__version__,
            config_hash=config_hash(cfg.model_dump(mode="json", exclude={"data": {"path"}})),
            dataset_fingerprint=dataset.fingerprint, run_name=cfg.name,
            run_dir=str(run_dir.resolve()), created_at=now_utc(), n_users=dataset.n_users,
            n_items=dataset.n_items, similarity="inner_product (cosine: unit-norm fused items)",
            embeddings=entries, files=files, onnx_check=check,
            ltr_metric={k: float(v) for k, v in metrics[FULL].items()
                        if isinstance(v, (int, float))},
        )
        write_manifest(tmp, manifest)
        steps.update()
    steps.close()
    log.info("exported %s to %s in %.1fs", run_dir, out_dir, time.perf_counter() - t0)
    return out_dir
