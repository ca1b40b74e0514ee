"""BPR training of the graph models, with validation, early stopping and checkpoints.

Objective (as in the LightGCN authors' code), for a batch ``B`` of sampled triples ``(u, i, j)``::

    L = mean_B -log sigmoid(<e_u, e_i> - <e_u, e_j>)
        + reg * (||e_u^(0)||^2 + ||e_i^(0)||^2 + ||e_j^(0)||^2) / 2 / |B|

where ``e`` are the propagated embeddings and ``e^(0)`` the batch's EGO embeddings: the L2 term
covers only the rows used in the batch, never all parameters (weight decay on every table would
shrink the embeddings of users and items that are not in the batch; see PyG issue #7196). The
whole graph is propagated at every step, as in the paper's code; Adam with ``lr``.

Every ``eval_every`` epochs the model is scored on the validation part with the project's judge
(:func:`kgrank.eval.protocol.evaluate`, on ``eval_metric``, without bootstrap) and training stops
after ``patience`` validations without gain; the best weights are kept. Without a validation part
(e.g. a predefined train/test split), all epochs run and the last weights are used.

Test-time graph: the final embeddings come from propagating the best weights over the TRAINING
graph PLUS the validation interactions (``kg.with_interactions(valid users, valid items)``, weight
1.0 each), without any retraining, so a user's latest (validation) item shapes the embedding used
to rank their test item, the same information the baselines get when refitted on train + valid.
Test interactions never enter any graph.

The per-epoch step (:func:`bpr_epoch` over :class:`BPRLoss`), the early stopping
(:class:`EarlyStopping`) and the final propagation (:func:`finish_result`) are shared with the Ray
Train runner (:mod:`kgrank.distributed.train_graph`), which wraps the loss module in DDP.

Checkpoints: ``out_dir/checkpoints/epoch_NNN.safetensors`` after every epoch (the last two are
kept) and ``out_dir/best.safetensors``; all written to a temporary name and renamed (atomic), in
safetensors format (no pickle).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kgrank.config import EvalConfig, GraphTrainConfig
from kgrank.data.split import Split
from kgrank.eval.protocol import Scorer, evaluate
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.kg import KGModel
from kgrank.graph.lightgcn import LightGCN
from kgrank.graph.sampling import BPRSampler

ModelName = Literal["lightgcn", "kg"]
GraphModel = LightGCN | KGModel
EpochCallback = Callable[[int, Scorer], "dict[str, float] | None"]
"""Called after each epoch with the epoch number and a scorer over the training graph; the dict it
returns (if any) is stored in :attr:`EpochRecord.extra`."""


@dataclass
class EpochRecord:
    """One epoch: mean BPR loss, validation metric (None when not validated), seconds."""

    epoch: int
    loss: float
    valid: float | None
    seconds: float  # sampling + optimisation steps
    eval_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class GraphModelResult:
    """A trained graph model: test-time embeddings (train + valid graph, best weights)."""

    name: str
    user_emb: torch.Tensor  # [n_users, d], CPU
    item_emb: torch.Tensor  # [n_items, d], CPU
    entity_emb: torch.Tensor | None  # [n_entities, d] for the KG model
    history: list[EpochRecord]
    best_epoch: int
    best_valid: float | None
    metric: str
    config: GraphTrainConfig
    model: GraphModel = field(repr=False)
    valid_user_emb: torch.Tensor | None = field(default=None, repr=False)
    """[n_users, d]: best weights propagated over the training graph only (validation-time)."""
    valid_item_emb: torch.Tensor | None = field(default=None, repr=False)

    def embeddings(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(user, item) embeddings a model may use when scoring ``part``: the training graph for
        ``valid``, training + validation interactions for ``test``."""
        if part == "valid":
            if self.valid_user_emb is None or self.valid_item_emb is None:
                raise ValueError(f"{self.name}: no training-graph embeddings were kept")
            return self.valid_user_emb, self.valid_item_emb
        return self.user_emb, self.item_emb

    @property
    def mean_epoch_seconds(self) -> float:
        return float(np.mean([r.seconds for r in self.history])) if self.history else 0.0

    def score(self, users: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``<e_u, e_i>`` of the given users against all items, [B, n_items] (float32, CPU)."""
        idx = torch.as_tensor(np.asarray(users), dtype=torch.int64)
        return self.user_emb[idx] @ self.item_emb.T


def build_model(name: ModelName, kg: KnowledgeGraph, cfg: GraphTrainConfig) -> GraphModel:
    """An untrained model for ``kg``, initialised from ``cfg.seed``, on ``cfg.device``."""
    torch.manual_seed(cfg.seed)
    model: GraphModel
    if name == "lightgcn":
        model = LightGCN(kg.n_users, kg.n_items, cfg.dim, cfg.layers)
    elif name == "kg":
        model = KGModel(kg.n_users, kg.n_items, kg.n_entities, kg.n_relations, cfg.dim,
                        cfg.layers, attention=cfg.attention, kg_weight=cfg.kg_weight)
    else:
        raise ValueError(f"unknown graph model {name!r} (lightgcn, kg)")
    return model.to(torch.device(cfg.device))


def inference_graph(kg: KnowledgeGraph, split: Split) -> KnowledgeGraph:
    """The training graph plus the validation interactions (weight 1.0); never test ones."""
    valid = split.valid
    return kg.with_interactions(valid["user_idx"].to_numpy(), valid["item_idx"].to_numpy())


def propagate(model: GraphModel, g: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(user, item) final embeddings without gradient."""
    with torch.no_grad():
        return model.propagate(g)


def scorer(model: GraphModel, g: Any) -> Scorer:
    """An evaluator scorer over one propagation of ``g`` (users -> [B, n_items] CPU scores)."""
    user, item = propagate(model, g)
    item_t = item.T.contiguous()

    def score(users: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.asarray(users, dtype=np.int64)).to(user.device)
        return (user[idx] @ item_t).cpu()

    return score


def bpr_loss(
    model: GraphModel, g: Any, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor, reg: float
) -> torch.Tensor:
    """BPR loss of a batch plus ``reg`` x the batch's ego-embedding L2 (see module docstring)."""
    n = len(u)
    rows = torch.cat([u, model.n_users + i, model.n_users + j])
    emb = model.layer_sum(g).index_select(0, rows) / (model.layers + 1)
    eu, ei, ej = emb[:n], emb[n : 2 * n], emb[2 * n :]
    loss = F.softplus((eu * ej).sum(-1) - (eu * ei).sum(-1)).mean()  # = -log sigmoid(pos - neg)
    if reg > 0:
        user0, item0 = model.ego_rows(u, torch.cat([i, j]))
        loss = loss + reg * (user0.pow(2).sum() + item0.pow(2).sum()) / 2 / n
    return loss


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam; the fused kernel where torch has one (CPU, CUDA): one pass over the embedding
    tables instead of a dozen, which on CPU is most of the optimizer's cost."""
    device = next(model.parameters()).device
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused)


class BPRLoss(torch.nn.Module):
    """:func:`bpr_loss` as a module, so that DDP (``ray.train.torch.prepare_model``) sees the
    loss go through ``forward`` and all-reduces the gradients of ``model``; used unwrapped by the
    in-process trainer. ``g`` is the propagation graph (not a parameter or buffer)."""

    def __init__(self, model: GraphModel, g: Any, reg: float) -> None:
        super().__init__()
        self.model = model
        self.g = g
        self.reg = reg

    def forward(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return bpr_loss(self.model, self.g, u, i, j, self.reg)


def bpr_epoch(
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    triples: tuple[np.ndarray, np.ndarray, np.ndarray],
    batch_size: int,
    device: torch.device,
    desc: str = "",
    progress: bool = False,
) -> float:
    """One epoch of BPR steps over ``triples`` (u, i, j) in order, ``batch_size`` at a time;
    returns the mean loss. The single training step of both the in-process trainer and the Ray
    Train workers (where ``loss_fn`` is the DDP-wrapped :class:`BPRLoss` and ``triples`` the
    worker's shard, of the same length on every worker)."""
    users, pos, neg = (torch.from_numpy(a).to(device) for a in triples)
    n, total = len(users), 0.0
    bar = tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)
    for lo in bar:
        sl = slice(lo, lo + batch_size)
        loss = loss_fn(users[sl], pos[sl], neg[sl])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(users[sl])
        bar.set_postfix(loss=f"{total / min(lo + batch_size, n):.4f}")
    return total / max(n, 1)


@dataclass
class EarlyStopping:
    """Best validation value so far and validations without gain (stop at ``patience``).

    Without validation (``validate`` False) every epoch counts as an improvement, so the last
    weights are kept. Serialisable with :func:`dataclasses.asdict` (checkpoints)."""

    patience: int
    validate: bool = True
    best_value: float | None = None
    best_epoch: int = 0
    bad: int = 0

    def update(self, epoch: int, value: float | None) -> bool:
        """Record an epoch's validation value (None: not validated); True when it is the new
        best."""
        improved = not self.validate or (
            value is not None and (self.best_value is None or value > self.best_value))
        if improved:
            self.best_value, self.best_epoch, self.bad = value, epoch, 0
        elif value is not None:
            self.bad += 1
        return improved

    @property
    def stop(self) -> bool:
        return self.validate and self.bad >= self.patience


def validation_value(
    model: GraphModel, g: Any, split: Split, cfg: GraphTrainConfig, valid_cfg: EvalConfig,
    name: str,
) -> float:
    """``cfg.eval_metric`` of the model on the validation part (the project's judge)."""
    res = evaluate(scorer(model, g), split, "valid", valid_cfg, name=name, progress=False)
    return float(res.metrics[cfg.eval_metric])


def finish_result(
    name: ModelName,
    model: GraphModel,
    kg: KnowledgeGraph,
    split: Split,
    cfg: GraphTrainConfig,
    g: Any,
    best_state: dict[str, torch.Tensor],
    history: list[EpochRecord],
    stopper: EarlyStopping,
) -> GraphModelResult:
    """Load the best weights and propagate them over the training graph (validation-time) and
    over train + validation interactions (test-time); shared by the in-process and Ray paths."""
    device = torch.device(cfg.device)
    model.load_state_dict({k: v.to(device) for k, v in best_state.items()})
    model.eval()
    valid_user, valid_item = (t.cpu() for t in propagate(model, g))
    g_test: Any = model.graph(inference_graph(kg, split), cfg.weighted)
    entity: torch.Tensor | None = None
    with torch.no_grad():
        if isinstance(model, KGModel):
            user, nodes = model.propagate_all(g_test)
            item, entity = nodes[: kg.n_items], nodes[kg.n_items :].cpu()
        else:
            user, item = model.propagate(g_test)
    return GraphModelResult(name, user.cpu(), item.cpu(), entity, history, stopper.best_epoch,
                            stopper.best_value, cfg.eval_metric, cfg, model, valid_user,
                            valid_item)


def _state(model: GraphModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a state dict as safetensors, atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_state(model: GraphModel, path: Path) -> None:
    """Load weights written by :func:`save_state` (safetensors; never pickle)."""
    state = load_file(str(path), device=str(model.device))
    model.load_state_dict(state)


def _metric_eval_config(eval_cfg: EvalConfig, metric: str) -> EvalConfig:
    name, _, k = metric.partition("@")
    if name not in {"ndcg", "recall", "hr", "precision", "mrr"} or not k.isdigit() or int(k) < 1:
        raise ValueError(f"eval_metric {metric!r} is not like 'ndcg@20'")
    return eval_cfg.model_copy(update={"ks": sorted(set(eval_cfg.ks) | {int(k)}), "bootstrap": 0})


def train_graph_model(
    name: ModelName,
    kg: KnowledgeGraph,
    split: Split,
    cfg: GraphTrainConfig,
    eval_cfg: EvalConfig,
    out_dir: Path | None,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> GraphModelResult:
    """Train ``name`` on ``kg`` with BPR on ``split.train``; see the module docstring.

    ``on_epoch`` is called after every epoch (see :data:`EpochCallback`); ``initial_state``
    replaces the seeded initial weights (a state dict of the model, e.g. to start from another
    implementation's initialisation)."""
    if (kg.n_users, kg.n_items) != (split.n_users, split.n_items):
        raise ValueError("graph and split disagree on the number of users / items")
    device = torch.device(cfg.device)
    model = build_model(name, kg, cfg)
    if initial_state is not None:
        model.load_state_dict({k: v.to(device) for k, v in initial_state.items()})
    g: Any = model.graph(kg, cfg.weighted)
    train = split.train
    sampler = BPRSampler(train["user_idx"].to_numpy(), train["item_idx"].to_numpy(),
                         split.n_users, split.n_items)
    rng = np.random.default_rng(cfg.seed)
    optimizer = make_optimizer(model, cfg.lr)
    loss_fn = BPRLoss(model, g, cfg.reg)
    validate = len(split.valid) > 0
    valid_cfg = _metric_eval_config(eval_cfg, cfg.eval_metric)
    ckpt_dir = None if out_dir is None else Path(out_dir) / "checkpoints"
    history: list[EpochRecord] = []
    stopper = EarlyStopping(cfg.patience, validate)
    best_state = _state(model)
    meta = {"model": name, "config": cfg.model_dump_json()}
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        model.train()
        loss = bpr_epoch(loss_fn, optimizer, sampler.sample(rng), cfg.batch_size, device,
                         f"{name} epoch {epoch}", progress)
        seconds = time.perf_counter() - start
        model.eval()
        record = EpochRecord(epoch, loss, None, seconds)
        start = time.perf_counter()
        if on_epoch is not None:
            record.extra = dict(on_epoch(epoch, scorer(model, g)) or {})
        if validate and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            record.valid = validation_value(model, g, split, cfg, valid_cfg, name)
        record.eval_seconds = time.perf_counter() - start
        history.append(record)
        improved = stopper.update(epoch, record.valid)
        if improved:
            best_state = _state(model)
        if ckpt_dir is not None:
            epoch_meta = {**meta, "epoch": str(epoch)}
            save_state(_state(model), ckpt_dir / f"epoch_{epoch:03d}.safetensors", epoch_meta)
            for old in sorted(ckpt_dir.glob("epoch_*.safetensors"))[:-2]:
                old.unlink()
            if improved:
                save_state(best_state, ckpt_dir.parent / "best.safetensors", epoch_meta)
        if progress:
            log_epoch(name, record, cfg.eval_metric)
        if stopper.stop:
            break
    return finish_result(name, model, kg, split, cfg, g, best_state, history, stopper)


def log_epoch(name: str, record: EpochRecord, metric: str) -> None:
    """One progress line per epoch."""
    shown = "" if record.valid is None else f" valid {metric} {record.valid:.4f}"
    extra = "".join(f" {k} {v:.4f}" for k, v in record.extra.items())
    tqdm.write(f"{name} epoch {record.epoch}: loss {record.loss:.4f}{shown}{extra} "
               f"({record.seconds:.1f} s)")


def save_embeddings(
    result: GraphModelResult,
    out_dir: Path,
    user_ids: list[str] | None = None,
    item_ids: list[str] | None = None,
) -> Path:
    """Write ``embeddings.safetensors`` (user, item[, entity]) and ``embeddings.json``.

    Row ``i`` of ``item`` is the dataset's item ``i`` (and likewise for users); pass the id lists
    (``dataset.items["item_id"]``, ``dataset.users["user_id"]``) to also write ``item_ids.json`` /
    ``user_ids.json``. Returns the safetensors path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"user": result.user_emb.contiguous(), "item": result.item_emb.contiguous()}
    if result.entity_emb is not None:
        tensors["entity"] = result.entity_emb.contiguous()
    path = out_dir / "embeddings.safetensors"
    save_state(tensors, path, {"model": result.name})
    info = {
        "model": result.name,
        "dim": int(result.item_emb.shape[1]),
        "n_users": int(result.user_emb.shape[0]),
        "n_items": int(result.item_emb.shape[0]),
        "n_entities": 0 if result.entity_emb is None else int(result.entity_emb.shape[0]),
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "metric": result.metric,
        "epochs_run": len(result.history),
        "mean_epoch_seconds": result.mean_epoch_seconds,
        "test_graph": "training interactions + validation interactions (best weights)",
        "config": result.config.model_dump(),
    }
    files: dict[str, Any] = {"embeddings.json": info}
    if user_ids is not None:
        if len(user_ids) != len(result.user_emb):
            raise ValueError("user_ids length differs from the user embeddings")
        files["user_ids.json"] = list(map(str, user_ids))
    if item_ids is not None:
        if len(item_ids) != len(result.item_emb):
            raise ValueError("item_ids length differs from the item embeddings")
        files["item_ids.json"] = list(map(str, item_ids))
    for fname, content in files.items():
        tmp = out_dir / f".{fname}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(content, indent=1), encoding="utf-8")
        os.replace(tmp, out_dir / fname)
    return path
