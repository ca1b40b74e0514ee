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

    train = sub.add_parser("train", help="train one stage of the pipeline")
    tsub = train.add_subparsers(dest="stage", required=True)
    tgraph = tsub.add_parser("graph", help="build the graph and train the configured GNNs")
    _add_run_args(tgraph)

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


def _cmd_train(args: argparse.Namespace) -> int:
    from kgrank.eval.report import metrics_table
    from kgrank.pipeline import report_keys, run

    cfg = load_config(args.config, args.overrides)
    if not cfg.graph.models:
        raise ConfigError(f"{args.config}: graph.models is empty, nothing to train")
    result = run(cfg, progress=not args.quiet, stages=("graph",))
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
                "config": _cmd_config}
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
