"""Typed run configuration: YAML files in ``configs/`` plus dotted command-line overrides.

Every field carries a one-line description (``kgrank config show`` prints them). Unknown or
mistyped keys are errors that name the key and the file: the models forbid extra fields, and
:class:`ConfigError` wraps pydantic's message with the source. Override values are parsed as YAML
scalars (``train.epochs=3`` -> int, ``eval.ks=[5,10]`` -> list); nothing is ever ``eval``-ed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Strict):
    method: Literal["leave_last_out", "time_cut", "random", "predefined"] = Field(
        "leave_last_out",
        description="leave_last_out: per user, last positive -> test, second-to-last -> valid; "
        "time_cut: events after valid_start/test_start; random: per-event ratios; "
        "predefined: the dataset's `split` column.",
    )
    positive_events: list[str] = Field(
        default_factory=lambda: ["click", "cart", "purchase", "rating"],
        description="Events that count as positive feedback (targets and history); others "
        "(e.g. views) are context only.",
    )
    min_rating: float | None = Field(
        None, description="For `rating` events, keep only weight >= this as positive (None: all)."
    )
    valid_start: str | None = Field(None, description="time_cut: ISO time where validation starts.")
    test_start: str | None = Field(None, description="time_cut: ISO time where the test starts.")
    valid_ratio: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="random: share of events for validation; predefined without a valid part: "
        "share of each user's training events held out for validation.",
    )
    test_ratio: float = Field(0.2, ge=0.0, lt=1.0, description="random: share of events for test.")
    seed: int = Field(0, description="Seed of the random and predefined-holdout splits.")


class DataConfig(_Strict):
    path: str = Field(description="Dataset directory (Parquet tables), relative to the CWD.")
    demo: bool = Field(
        False, description="Generate the embedded demo shop at `path` when it does not exist."
    )
    demo_users: int = Field(5000, gt=0, description="Demo shop: number of users.")
    demo_items: int = Field(3000, gt=0, description="Demo shop: number of items.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How to split the events.")


class EvalConfig(_Strict):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs k of @k metrics.")
    main_metric: str = Field("ndcg@10", description="Metric used for tuning and headlines.")
    batch_size: int = Field(1024, gt=0, description="Users scored per batch in full ranking.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% CIs (0: none).")
    sampled_negatives: int | None = Field(
        None, description="Score each target against this many sampled negatives instead of "
        "the full catalog (labelled 'sampled' in reports; None: full ranking).",
    )
    seed: int = Field(0, description="Seed for tie-breaking, sampling and the bootstrap.")


class ItemKNNConfig(_Strict):
    neighbors: list[int] = Field(
        default_factory=lambda: [50, 200], description="Grid: neighbours kept per item (0: all)."
    )
    shrink: list[float] = Field(
        default_factory=lambda: [0.0, 10.0], description="Grid: cosine shrinkage term."
    )
    half_life: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 1000.0],
        description="Grid: recency half-life of history weights, in distinct timestamps from the end.",
    )


class TransitionConfig(_Strict):
    backoff: list[float] = Field(
        default_factory=lambda: [0.01, 0.1, 1.0],
        description="Grid: weight of the ItemKNN back-off added to the transition score.",
    )
    half_life: list[float] = Field(
        default_factory=lambda: [0.5, 2.0],
        description="Grid: decay (in timestamp groups from the end) over the last items used.",
    )


BaselineName = Literal["random", "popularity", "itemknn", "transition"]
BASELINE_NAMES: tuple[BaselineName, ...] = ("random", "popularity", "itemknn", "transition")


class BaselinesConfig(_Strict):
    models: list[BaselineName] = Field(
        default_factory=lambda: list(BASELINE_NAMES),
        description="Baselines to fit, tune on validation and evaluate on test.",
    )
    popularity_half_life_days: list[float] = Field(
        default_factory=lambda: [0.0, 30.0, 365.0],
        description="Grid: recency half-life of popularity counts in days (0: plain counts).",
    )
    itemknn: ItemKNNConfig = Field(default_factory=ItemKNNConfig, description="ItemKNN grid.")
    transition: TransitionConfig = Field(
        default_factory=TransitionConfig, description="Transition model grid."
    )


class GraphBuildConfig(_Strict):
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 0.25, "click": 1.0, "cart": 1.5, "purchase": 2.0,
                                 "rating": 1.0},
        description="Weight of a user-item edge per event type (before recency decay).",
    )
    recency_half_life_days: float = Field(
        0.0, ge=0.0, description="Half-life of interaction edge weights in days (0: no decay)."
    )
    categories: bool = Field(True, description="Add item-in-category and category-parent edges.")
    brands: bool = Field(True, description="Add item-brand edges.")
    price_bands: int = Field(5, ge=0, description="Quantile price bands as attribute nodes (0: off).")
    attributes: list[str] | None = Field(
        None, description="Item columns whose values become attribute nodes (None: auto-detect "
        "low-cardinality string columns).",
    )
    triples: bool = Field(True, description="Add the dataset's knowledge triples.")
    bought_next: bool = Field(
        True, description="Directed item->item edges between consecutive distinct timestamps."
    )
    bought_together: bool = Field(
        True, description="Undirected item-item edges within one session or one timestamp."
    )
    min_pair_count: int = Field(1, ge=1, description="Minimum co-occurrences for an item-item edge.")
    max_item_neighbors: int = Field(
        20, ge=0, description="Keep at most this many item-item edges per item and relation "
        "(strongest first; 0: all).",
    )


class GraphTrainConfig(_Strict):
    dim: int = Field(64, gt=0, description="Embedding dimension.")
    layers: int = Field(3, ge=0, description="Propagation layers.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(2048, gt=0, description="BPR triples per step.")
    reg: float = Field(1e-4, ge=0, description="L2 weight on the batch's ego embeddings.")
    epochs: int = Field(100, ge=1, description="Maximum epochs.")
    eval_every: int = Field(1, ge=1, description="Validate every this many epochs.")
    patience: int = Field(5, ge=1, description="Stop after this many validations without gain.")
    eval_metric: str = Field("ndcg@20", description="Validation metric for early stopping.")
    seed: int = Field(0, description="Seed of initialisation and sampling.")
    device: str = Field("cpu", description="torch device (cpu, cuda, cuda:1, ...).")
    weighted: bool = Field(
        False, description="Use event/recency weights of user-item edges in the adjacency."
    )
    attention: bool = Field(
        True, description="KG model only: relation-aware attention over neighbours."
    )
    kg_weight: float = Field(
        4.0, ge=0, description="KG model only: weight of knowledge edges relative to "
        "interactions in propagation (4: best on Amazon Beauty validation).",
    )


class GraphConfig(_Strict):
    models: list[Literal["lightgcn", "kg"]] = Field(
        default_factory=list, description="Graph models to train (empty: no graph stage)."
    )
    build: GraphBuildConfig = Field(
        default_factory=GraphBuildConfig, description="Graph construction."
    )
    lightgcn: GraphTrainConfig = Field(
        default_factory=GraphTrainConfig, description="LightGCN training."
    )
    kg: GraphTrainConfig = Field(
        default_factory=GraphTrainConfig, description="Relation-aware KG model training."
    )


class RunConfig(_Strict):
    name: str = Field(description="Run name; outputs go to <output_dir>/<name>/.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, description="Global seed.")
    data: DataConfig = Field(description="Dataset and split.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation protocol.")
    baselines: BaselinesConfig = Field(
        default_factory=BaselinesConfig, description="Baseline models."
    )
    graph: GraphConfig = Field(default_factory=GraphConfig, description="Graph stage.")

    @model_validator(mode="after")
    def _main_metric_known(self) -> RunConfig:
        name, _, k = self.eval.main_metric.partition("@")
        if name not in {"ndcg", "recall", "hr", "precision", "mrr"} or not k.isdigit():
            raise ValueError(f"eval.main_metric {self.eval.main_metric!r} is not like 'ndcg@10'")
        if int(k) not in self.eval.ks:
            raise ValueError(f"eval.main_metric {self.eval.main_metric!r}: k not in eval.ks")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=[1,2]"]`` -> ``[("a.b", 3), ("c", [1, 2])]`` with YAML-typed values."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        parsed.append((key, value))
    return parsed


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"key '{key}': {err['msg']}")
    return f"{source}: " + "; ".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config and apply dotted overrides; raise :class:`ConfigError` if invalid."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    source = str(path)
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        set_dotted(raw, key, value)
    if pairs:
        source += " (with overrides " + ", ".join(k for k, _ in pairs) + ")"
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def describe_config(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, description (for docs and ``kgrank config``)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{key}  # {field.description}")
            lines.extend(describe_config(ann, key + "."))
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"{key} = {default}  # {field.description}")
    return lines
