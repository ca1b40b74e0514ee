"""`kgrank train` flags map onto the `ray` config section; no Ray needed."""

from __future__ import annotations

from pathlib import Path

from kgrank.cli import build_parser, train_arguments
from kgrank.config import load_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_ray_flags_become_ray_overrides() -> None:
    args = build_parser().parse_args(
        ["train", str(DEMO), "graph.kg.epochs=2", "--ray-address", "auto", "--workers", "3",
         "--gpus-per-worker", "1", "--threads-per-worker", "4", "--max-failures", "0"])
    only, config, overrides = train_arguments(args)
    assert only is None and config == str(DEMO)
    cfg = load_config(config, overrides)
    assert cfg.graph.kg.epochs == 2
    assert (cfg.ray.address, cfg.ray.workers, cfg.ray.gpus_per_worker) == ("auto", 3, 1.0)
    assert (cfg.ray.threads_per_worker, cfg.ray.max_failures) == (4, 0)


def test_stage_form_and_in_process_default() -> None:
    args = build_parser().parse_args(["train", "graph", str(DEMO)])
    only, config, overrides = train_arguments(args)
    assert (only, config, overrides) == ("graph", str(DEMO), [])
    assert load_config(config, overrides).ray.address is None  # in-process, Ray never started


def test_cluster_configs_parse() -> None:
    import yaml

    root = DEMO.parent / "ray"
    cfg = load_config(root / "demo-2workers.yaml")
    assert cfg.ray.address == "local" and cfg.ray.workers == 2
    cluster = yaml.safe_load((root / "cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local" and cluster["setup_commands"]



def test_ray_is_imported_only_inside_functions_of_kgrank_distributed() -> None:
    import ast

    package = DEMO.parents[1] / "kgrank"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside = path.parent.name == "distributed"
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                assert inside, f"{path}: imports ray outside kgrank/distributed"
                assert node not in tree.body, f"{path}: module-level ray import"
