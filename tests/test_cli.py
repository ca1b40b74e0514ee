"""Tests for the ``kgrank`` command: config errors, config/data inspection, and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from kgrank.cli import main
from kgrank.config import ConfigError, RunConfig, load_config, parse_overrides
from kgrank.data.dataset import write_dataset
from kgrank.data.schema import TABLES

Capsys = pytest.CaptureFixture[str]


def _write_config(path: Path, data_path: Path, **extra: Any) -> Path:
    raw: dict[str, Any] = {
        "name": "t",
        "output_dir": str(path.parent / "runs"),
        "data": {"path": str(data_path), "split": {"method": "leave_last_out"}},
        "eval": {"ks": [5, 10], "main_metric": "ndcg@10", "bootstrap": 0},
    }
    for dotted, value in extra.items():
        node = raw
        *sections, leaf = dotted.split("__")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(capsys: Capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# Config errors and config commands
# --------------------------------------------------------------------------------------------


def test_run_unknown_key_in_yaml(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data", data__split__methd="random")
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "'data.split.methd'" in line and "unknown key" in line
    assert str(cfg) in line
    assert not (tmp_path / "runs").exists()


def test_run_unknown_top_level_key(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data", evaluation={"ks": [5]})
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "'evaluation'" in line and str(cfg) in line


def test_run_unknown_key_in_override(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    assert main(["run", str(cfg), "data.split.methd=random"]) == 2
    line = _one_error_line(capsys)
    assert "'data.split.methd'" in line and "unknown key" in line
    assert str(cfg) in line


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_run_mistyped_value(tmp_path: Path, capsys: Capsys, where: str) -> None:
    if where == "yaml":
        cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data", eval__bootstrap="abc")
        argv = ["run", str(cfg)]
    else:
        cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
        argv = ["run", str(cfg), "eval.bootstrap=abc"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "'eval.bootstrap'" in line and str(cfg) in line


def test_run_malformed_override(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    assert main(["run", str(cfg), "eval.bootstrap"]) == 2
    assert "eval.bootstrap" in _one_error_line(capsys)


def test_run_missing_config_file(tmp_path: Path, capsys: Capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_error_line(capsys)


def test_run_missing_dataset(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "no-such-data")
    assert main(["run", str(cfg)]) == 2
    assert "no-such-data" in _one_error_line(capsys)
    assert not (tmp_path / "runs" / "t").exists()


def test_override_values_are_typed(tmp_path: Path) -> None:
    assert parse_overrides(["eval.ks=[5,10]", "eval.bootstrap=7", "data.split.min_rating=4.5",
                            "data.demo=true", "name=abc", "eval.sampled_negatives=null"]) == [
        ("eval.ks", [5, 10]), ("eval.bootstrap", 7), ("data.split.min_rating", 4.5),
        ("data.demo", True), ("name", "abc"), ("eval.sampled_negatives", None),
    ]
    cfg_path = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    cfg = load_config(cfg_path, ["eval.ks=[5,10]", "eval.bootstrap=7", "baselines.models=[popularity]"])
    assert cfg.eval.ks == [5, 10]
    assert cfg.eval.bootstrap == 7
    assert cfg.baselines.models == ["popularity"]
    assert cfg.data.path == str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"eval\.main_metric"):
        load_config(cfg_path, ["eval.ks=[5]"])  # ndcg@10 needs 10 in ks


def test_config_show(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    assert main(["config", "show", str(cfg), "eval.bootstrap=7", "eval.ks=[5,10,20]"]) == 0
    out = capsys.readouterr().out
    assert "  bootstrap: 7" in out.splitlines()
    shown = yaml.safe_load(out)
    assert shown["eval"]["bootstrap"] == 7
    assert shown["eval"]["ks"] == [5, 10, 20]
    assert shown["data"]["split"]["method"] == "leave_last_out"
    # The printed YAML is itself a complete, valid config.
    assert RunConfig.model_validate(shown).eval.bootstrap == 7


def test_config_show_unknown_key(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    assert main(["config", "show", str(cfg), "eval.bootstrapp=7"]) == 2
    line = _one_error_line(capsys)
    assert "'eval.bootstrapp'" in line and str(cfg) in line


def _flatten(tree: dict[str, Any], prefix: str = "") -> tuple[set[str], dict[str, Any]]:
    sections: set[str] = set()
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = prefix + key
        if isinstance(value, dict) and not dotted.endswith("event_weights"):  # a dict-valued leaf
            sections.add(dotted)
            sub_sections, sub_leaves = _flatten(value, dotted + ".")
            sections |= sub_sections
            leaves.update(sub_leaves)
        else:
            leaves[dotted] = value
    return sections, leaves


def test_config_describe(capsys: Capsys) -> None:
    assert main(["config", "describe"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    defaults = RunConfig.model_validate({"name": "n", "data": {"path": "p"}}).model_dump()
    sections, leaves = _flatten(defaults)
    assert len(lines) == len(sections) + len(leaves)
    seen_leaves: set[str] = set()
    seen_sections: set[str] = set()
    for line in lines:
        if " = " in line.split("  # ", 1)[0]:
            key, rest = line.split(" = ", 1)
            default, sep, description = rest.partition("  # ")
            assert sep == "  # ", line
            assert description.strip() and description.strip() != "None", line
            if key in ("name", "data.path"):
                assert default == "(required)"
            else:
                assert default == repr(leaves[key]), line
            seen_leaves.add(key)
        else:
            key, sep, description = line.partition("  # ")
            assert sep and description.strip() and description.strip() != "None", line
            seen_sections.add(key)
    assert seen_leaves == set(leaves)
    assert seen_sections == sections


def test_data_schema(capsys: Capsys) -> None:
    assert main(["data", "schema"]) == 0
    out = capsys.readouterr().out
    for name in ("items.parquet", "users.parquet", "interactions.parquet", "triples.parquet"):
        assert f"`{name}`" in out
    for table in TABLES:
        for column in table.columns:
            assert f"| `{column.name}` |" in out


# --------------------------------------------------------------------------------------------
# Data commands on real datasets
# --------------------------------------------------------------------------------------------


def _structured_dataset(root: Path, n_users: int = 60, n_items: int = 40) -> None:
    """4 clusters of 10 items; each user walks its cluster in order, one event per day."""
    rng = np.random.default_rng(7)
    rows = []
    start = pd.Timestamp("2024-01-01", tz="UTC")
    for u in range(n_users):
        cluster = u % 4
        offset = int(rng.integers(10))
        n_events = 6 + u % 3
        for j in range(n_events):
            item = cluster * 10 + (offset + j) % 10
            rows.append(
                {
                    "user_id": f"user{u:03d}",
                    "item_id": f"item{item:03d}",
                    "timestamp": start + pd.Timedelta(days=j, minutes=u),
                    "event": "view" if j == 0 else "purchase",
                    "device": ["mobile", "desktop"][u % 2],
                }
            )
    items = pd.DataFrame(
        {
            "item_id": [f"item{i:03d}" for i in range(n_items)],
            "title": [f"Product {i}" for i in range(n_items)],
            "categories": [[f"Cluster {i // 10}"] for i in range(n_items)],
            "price": [float(i % 7) for i in range(n_items)],
        }
    )
    write_dataset(root, items, pd.DataFrame(rows))


def test_data_stats(tmp_path: Path, capsys: Capsys) -> None:
    _structured_dataset(tmp_path / "shop")
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path / "shop")]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    n_events = sum(6 + u % 3 for u in range(60))
    assert summary["name"] == "shop"
    assert summary["users"] == 60
    assert summary["items"] == 40
    assert summary["interactions"] == n_events
    assert summary["triples"] == 0
    assert summary["events"] == {"purchase": n_events - 60, "view": 60}
    assert summary["density"] == pytest.approx(n_events / (60 * 40))
    assert summary["items_with_image"] == 0
    assert len(summary["fingerprint"]) == 16


def test_evaluate(tmp_path: Path, capsys: Capsys) -> None:
    _structured_dataset(tmp_path / "shop")
    capsys.readouterr()
    code = main(["-q", "evaluate", str(tmp_path / "shop"),
                 "--models", "popularity", "itemknn", "transition",
                 "--set", "eval.bootstrap=50"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "error:" not in err
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert "ndcg@10" in lines[head]
    assert lines[head + 1].startswith("|---|")
    rows = {line.split("|")[1].strip(): line for line in lines[head + 2:] if line.startswith("|")}
    assert list(rows) == ["popularity", "itemknn", "transition"]
    ndcg = {}
    for name, row in rows.items():
        cell = row.split("|")[2].strip()  # "0.1234 [0.1000, 0.1500]": bootstrap CI is shown
        value, ci = cell.split(" ", 1)
        low, high = (float(v) for v in ci.strip("[]").split(", "))
        ndcg[name] = float(value)
        assert 0.0 <= low <= ndcg[name] <= high <= 1.0, row
    # Each user walks its cluster in order: the transition model should find the next item.
    assert ndcg["transition"] > ndcg["popularity"]
    # The split line reports 60 test users.
    assert "'test': 60" in out


def test_evaluate_bad_set(tmp_path: Path, capsys: Capsys) -> None:
    _structured_dataset(tmp_path / "shop")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "shop"), "--set", "eval.bootstrapp=5"]) == 2
    assert "'eval.bootstrapp'" in _one_error_line(capsys)


def test_evaluate_bad_dataset(tmp_path: Path, capsys: Capsys) -> None:
    _structured_dataset(tmp_path / "shop")
    (tmp_path / "shop" / "items.parquet").write_bytes(b"")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "shop"), "--models", "popularity"]) == 2
    assert "items.parquet" in _one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# kgrank encode
# --------------------------------------------------------------------------------------------


def test_encode_tiny_config(tmp_path: Path, capsys: Capsys) -> None:
    from tests.encoders.test_stage import make_shop, make_tiny_bert, make_tiny_clip

    make_shop(tmp_path / "shop", n_users=80, n_items=40)
    cfg = _write_config(
        tmp_path / "cfg.yaml", tmp_path / "shop",
        data__split__positive_events=["click", "cart", "purchase"],
        encoders__modalities=["text", "image"],
        encoders__text__model=str(make_tiny_bert(tmp_path / "bert")),
        encoders__image__model_name=make_tiny_clip(tmp_path / "clip"),
        encoders__cache_dir=str(tmp_path / "cache"),
        encoders__profile_half_life=[1.0],
    )
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "report.md").write_text("from an earlier run")
    for attempt in range(2):
        capsys.readouterr()
        assert main(["-q", "encode", str(cfg)]) == 0
        out = capsys.readouterr().out
        text_line = out.splitlines()[0]
        assert text_line.startswith("text: encoder bert@") and ", dim 16, 40 items: " in text_line
        assert ("0 encoded, 40 cached" if attempt else "40 encoded, 0 cached") in text_line
        assert "image: encoder local-dir:" in out and "missing" in out
        assert "| text-only |" in out and "| image-only |" in out
    for modality in ("text", "image"):
        meta = json.loads((run_dir / "encoders" / modality / "meta.json").read_text())
        assert meta["n_encoded"] == 0 and meta["n_items"] == 40
        assert (run_dir / "encoders" / modality / "embeddings.safetensors").is_file()
    # only the encoders folder was replaced, and no temporary directory is left behind
    assert (run_dir / "report.md").read_text() == "from an earlier run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["encoders", "report.md"]


def test_encode_without_modalities_is_one_error_line(tmp_path: Path, capsys: Capsys) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "data")
    assert main(["encode", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "encoders.modalities is empty" in line and str(cfg) in line
    assert not (tmp_path / "runs").exists()


def test_encode_unloadable_model_is_one_error_line(tmp_path: Path, capsys: Capsys) -> None:
    _structured_dataset(tmp_path / "shop")
    cfg = _write_config(tmp_path / "cfg.yaml", tmp_path / "shop",
                        encoders__modalities=["text"],
                        encoders__text__model=str(tmp_path / "no-such-model"),
                        encoders__cache_dir=str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["-q", "encode", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "encoders.text: cannot load the encoder" in line and "no-such-model" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- export / serve -----------------------------------------------------------------------------


def test_export_of_a_non_run_is_one_error_line(tmp_path: Path, capsys: Capsys) -> None:
    assert main(["-q", "export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml is missing" in err
    assert not (tmp_path / "out").exists()


def test_serve_bad_arguments_are_one_error_line(tmp_path: Path, capsys: Capsys) -> None:
    assert main(["-q", "serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["-q", "serve", str(tmp_path), "--port", "8123"]) == 2
    assert "not an export directory" in capsys.readouterr().err
