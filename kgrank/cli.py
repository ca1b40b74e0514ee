"""The ``kgrank`` command. Thin: parse arguments, load config, call library functions.

Expected failures (bad data, bad config, existing output) print one ``error:`` line naming the
file, row and column or the config key, and exit with status 2; no Python traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kgrank import __version__
from kgrank.config import ConfigError, describe_config, load_config
from kgrank.data.schema import DatasetError


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.ks=[5,10]")


TRAIN_RAY_FLAGS = {"ray_address": "ray.address", "workers": "ray.workers",
                   "gpus_per_worker": "ray.gpus_per_worker",
                   "cpus_per_worker": "ray.cpus_per_worker",
                   "threads_per_worker": "ray.threads_per_worker",
                   "storage_path": "ray.storage_path", "max_failures": "ray.max_failures"}
"""``kgrank train`` flags and the ``ray`` config keys they override."""


def _add_train_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", help="auto (running cluster, e.g. under `ray job submit`), "
                   "local (start Ray here) or ray://host:port; default: ray.address (None: "
                   "in-process)")
    p.add_argument("--workers", type=int, help="Ray Train workers (ray.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (ray.gpus_per_worker)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (ray.cpus_per_worker)")
    p.add_argument("--threads-per-worker", type=int,
                   help="torch / OMP threads per worker (ray.threads_per_worker)")
    p.add_argument("--storage-path", help="checkpoint storage, local dir or URI (ray.storage_path)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts (ray.max_failures)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kgrank", description="Knowledge-graph-augmented multimodal ranker."
    )
    parser.add_argument("--version", action="version", version=f"kgrank {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import, generate and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    imp = dsub.add_parser("import", help="convert a source dataset into the kgrank format")
    imp.add_argument("format", help="amazon-5core | movielens-100k | lightgcn | kgat | "
                     "hm-catalog | tabular")
    imp.add_argument("src", type=Path, help="source folder (tabular: the interactions file)")
    imp.add_argument("dst", type=Path, help="dataset directory to write")
    imp.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    imp.add_argument("--items", type=Path, help="tabular: items file (CSV or Parquet)")
    imp.add_argument("--users", type=Path, help="tabular: users file (CSV or Parquet)")
    imp.add_argument("--map", action="append", default=[], metavar="TABLE.COLUMN=SOURCE",
                     help="tabular: take TABLE.COLUMN from source column SOURCE (repeatable)")
    imp.add_argument("--timestamp-unit", default="s", help="tabular: unit of numeric timestamps")
    demo = dsub.add_parser("demo", help="generate the embedded demo shop")
    demo.add_argument("dst", type=Path)
    demo.add_argument("--users", type=int, default=5000)
    demo.add_argument("--items", type=int, default=3000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true")
    stats = dsub.add_parser("stats", help="validate a dataset and print its summary")
    stats.add_argument("dataset", type=Path)
    dsub.add_parser("schema", help="print the dataset format")

    ev = sub.add_parser("evaluate", help="tune baselines on validation, print test metrics")
    ev.add_argument("dataset", type=Path)
    ev.add_argument("--models", nargs="+", default=["popularity", "itemknn", "transition"],
                    choices=["random", "popularity", "itemknn", "transition"])
    ev.add_argument("--split", default="leave_last_out",
                    choices=["leave_last_out", "time_cut", "random", "predefined"])
    ev.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="further dotted config overrides, e.g. eval.bootstrap=200")

    run = sub.add_parser("run", help="run the configured pipeline end to end")
    _add_run_args(run)

    train = sub.add_parser(
        "train", help="train the training stages (graph; fusion when enabled), in-process or "
        "on Ray", description="kgrank train CONFIG [overrides] trains graph (and fusion when "
        "enabled, after the encoders it needs); kgrank train graph|fusion CONFIG only that "
        "stage. With --ray-address (or ray.address in the YAML) through Ray Train.")
    _add_run_args(train)
    _add_train_ray_args(train)

    encode = sub.add_parser("encode", help="encode item texts/images (encoders.modalities), "
                            "evaluate text-only / image-only recommenders")
    _add_run_args(encode)

    graph = sub.add_parser("graph", help="inspect the knowledge graph of a dataset")
    gsub = graph.add_subparsers(dest="graph_command", required=True)
    gstats = gsub.add_parser("stats", help="node/edge counts, degrees, components")
    gstats.add_argument("dataset", type=Path)
    gstats.add_argument("--split", default="leave_last_out",
                        choices=["leave_last_out", "time_cut", "random", "predefined"],
                        help="the graph uses the training part of this split")
    gstats.add_argument("--export", type=Path, help="write nodes/edges Parquet (+ GraphML) here")

    exp = sub.add_parser("export", help="export a finished run for serving (embeddings, FAISS "
                         "index, ONNX towers, LightGBM model, manifest)")
    exp.add_argument("run_dir", type=Path, help="runs/<name> of a run with fusion + ranking")
    exp.add_argument("out_dir", type=Path, help="export directory to write (atomically)")
    exp.add_argument("--data", type=Path, help="the run's dataset directory, when data.path of "
                     "its config.yaml is relative to another working directory")
    exp.add_argument("--no-overwrite", action="store_true", help="fail if out_dir exists")
    srv = sub.add_parser("serve", help="serve an export over HTTP (search API + demo page)")
    srv.add_argument("export_dir", type=Path)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--candidates", type=int, help="top-N per candidate source (default: the "
                     "run's ranking.candidates)")
    srv.add_argument("--threads", type=int, default=1, help="torch / onnxruntime / LightGBM "
                     "threads per worker")
    srv.add_argument("--workers", type=int, default=1, help="rankers: the HTTP process's own "
                     "searcher plus workers - 1 ranking processes, each with its own searcher "
                     "(one per core), fed from one queue")
    srv.add_argument("--max-batch", type=int, default=8, help="most /search requests a worker "
                     "ranks in one batch (those that queued while it was busy; 1: no batching)")
    srv.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a worker waits "
                     "for a batch to fill before ranking it (0: never)")
    srv.add_argument("--pin-cpus", action="store_true", help="pin the HTTP process and each "
                     "ranking process to its own CPU (for a machine that serves only this)")

    cfg = sub.add_parser("config", help="show a resolved config or describe every field")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config as YAML")
    _add_run_args(show)
    csub.add_parser("describe", help="every config key with its default and meaning")
    return parser


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "schema":
        from kgrank.data.schema import describe_schema

        print(describe_schema())
        return 0
    if args.data_command == "stats":
        from kgrank.data.dataset import load_dataset

        print(json.dumps(load_dataset(args.dataset).summary(), indent=2))
        return 0
    if args.data_command == "demo":
        from kgrank.data.demo import DemoConfig, generate_demo

        ds = generate_demo(args.dst, DemoConfig(n_users=args.users, n_items=args.items,
                                                seed=args.seed), overwrite=args.overwrite)
        print(json.dumps(ds.summary(), indent=2))
        return 0
    from kgrank.data.adapters import import_dataset

    options: dict[str, object] = {}
    if args.format == "tabular":
        mapping = {}
        for item in args.map:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--map {item!r} is not of the form table.column=source")
            mapping[key] = value
        options = {"items": args.items, "users": args.users, "mapping": mapping,
                   "timestamp_unit": args.timestamp_unit}
    ds = import_dataset(args.format, args.src, args.dst, overwrite=args.overwrite, **options)
    print(json.dumps(ds.summary(), indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kgrank.config import RunConfig, _format_errors, parse_overrides, set_dotted
    from kgrank.data.dataset import load_dataset
    from kgrank.data.split import make_split
    from kgrank.eval.report import metrics_table
    from kgrank.pipeline import report_keys, run_baselines

    raw: dict[str, object] = {"name": "evaluate", "data": {"path": str(args.dataset),
                                                           "split": {"method": args.split}},
                              "baselines": {"models": args.models}}
    for key, value in parse_overrides(args.set):
        set_dotted(raw, key, value)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "--set")) from None
    dataset = load_dataset(args.dataset)
    split = make_split(dataset, cfg.data.split)
    tuned = run_baselines(cfg, split, progress=not args.quiet)
    results = [t.test for t in tuned]
    for t in tuned:
        print(f"{t.name}: best params {t.params} (valid {cfg.eval.main_metric} "
              f"{t.valid.metrics[cfg.eval.main_metric]:.4f})", file=sys.stderr)
    print(f"{dataset.name}: {split.method} split {split.stats}")
    print(metrics_table(results, report_keys(cfg)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kgrank.eval.report import metrics_table
    from kgrank.pipeline import report_keys, run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, progress=not args.quiet)
    print(metrics_table(result.results, report_keys(cfg)))
    print(f"\nrun directory: {result.run_dir} ({result.seconds:.1f} s)")
    return 0


def train_arguments(args: argparse.Namespace) -> tuple[str | None, str, list[str]]:
    """(only this stage or None, config path, overrides) of ``kgrank train``: ``kgrank train
    graph|fusion CONFIG ...`` trains one stage; the Ray flags become ``ray.*`` overrides."""
    config, overrides = str(args.config), list(args.overrides)
    only: str | None = None
    if config in ("graph", "fusion") and overrides:
        only, config, overrides = config, overrides[0], overrides[1:]
    for flag, key in TRAIN_RAY_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return only, config, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from kgrank.eval.report import metrics_table
    from kgrank.pipeline import report_keys, run

    only, config, overrides = train_arguments(args)
    cfg = load_config(config, overrides)
    if not cfg.graph.models and (only == "graph" or (only is None and not cfg.fusion.enabled)):
        raise ConfigError(f"{config}: graph.models is empty, nothing to train")
    stages: tuple[str, ...] = ("graph",)
    if only == "fusion" or (only is None and cfg.fusion.enabled):
        # the fusion towers read the graph embeddings and the encoders' item embeddings
        stages = ("graph", "encoders", "fusion")
    from kgrank.distributed.session import ray_session

    with ray_session(cfg.ray.address, cfg.ray.threads_per_worker):  # one Ray for all stages
        result = run(cfg, progress=not args.quiet, stages=stages)
    print(metrics_table(result.results, report_keys(cfg)))
    print(f"\nrun directory: {result.run_dir} ({result.seconds:.1f} s)")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from kgrank.data.split import make_split
    from kgrank.encoders.stage import run_encoder_stage, summary_line
    from kgrank.eval.report import metrics_table
    from kgrank.io import staged_dir
    from kgrank.pipeline import prepare_data, report_keys

    cfg = load_config(args.config, args.overrides)
    if not cfg.encoders.modalities:
        raise ConfigError(f"{args.config}: encoders.modalities is empty, nothing to encode "
                          "(e.g. encoders.modalities=[text,image])")
    dataset = prepare_data(cfg)
    split = make_split(dataset, cfg.data.split)
    out_dir = cfg.run_dir / "encoders"
    existed = cfg.run_dir.exists()
    try:
        with staged_dir(out_dir) as tmp:  # replaces only runs/<name>/encoders, when complete
            out = run_encoder_stage(dataset, split, cfg, tmp, progress=not args.quiet)
    except BaseException:
        if not existed and cfg.run_dir.is_dir() and not any(cfg.run_dir.iterdir()):
            cfg.run_dir.rmdir()  # leave no empty run directory behind
        raise
    for modality, emb in (("text", out.text), ("image", out.image)):
        if emb is not None:
            print(f"{modality}: {summary_line(emb)}")
    if out.results:
        print()
        print(metrics_table(out.results, report_keys(cfg)))
    print(f"\nencoders directory: {out_dir}")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from kgrank.config import GraphBuildConfig, SplitConfig
    from kgrank.data.dataset import load_dataset
    from kgrank.data.split import make_split
    from kgrank.graph.build import build_graph
    from kgrank.graph.stats import export_graph, format_stats, graph_stats

    dataset = load_dataset(args.dataset)
    split = make_split(dataset, SplitConfig(method=args.split))
    kg = build_graph(dataset, split, GraphBuildConfig())
    print(format_stats(graph_stats(kg)))
    if args.export:
        export_graph(kg, args.export, item_names=list(dataset.items["item_id"]),
                     user_names=list(dataset.users["user_id"]))
        print(f"exported to {args.export}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kgrank.export.writer import export_run

    out = export_run(args.run_dir, args.out_dir, data_path=args.data,
                     overwrite=not args.no_overwrite, progress=not args.quiet)
    print(f"export directory: {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kgrank.serve.app import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a TCP port (1..65535)")
    if args.candidates is not None and args.candidates < 1:
        raise ConfigError(f"--candidates {args.candidates}: must be at least 1")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: must be at least 1")
    if not args.max_wait_ms >= 0:
        raise ConfigError(f"--max-wait-ms {args.max_wait_ms}: must be at least 0")
    serve(args.export_dir, args.host, args.port, args.candidates, max(1, args.threads),
          args.workers, args.max_batch, args.max_wait_ms, args.pin_cpus)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "describe":
        print("\n".join(describe_config()))
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    handlers = {"data": _cmd_data, "evaluate": _cmd_evaluate, "run": _cmd_run,
                "train": _cmd_train, "encode": _cmd_encode, "graph": _cmd_graph,
                "config": _cmd_config, "export": _cmd_export, "serve": _cmd_serve}
    try:
        return handlers[args.command](args)
    except (DatasetError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
