"""Training checkpoints as safetensors + JSON (never pickle), and the workers' collectives.

A checkpoint directory holds::

    model.safetensors      current weights (rank 0)
    best.safetensors       best-validation weights so far (rank 0)
    optimizer.safetensors  the optimizer's tensors, ``<param index>.<key>`` (rank 0)
    state.json             epoch, early stopping, history, optimizer param groups and scalars
    rng_rank<r>.json       each worker's numpy Generator state (every rank)

Every file is written to a temporary name in the directory and renamed (atomic), so a directory
never holds a half-written safetensors file; Ray Train then uploads the directory to storage and
registers it only when the upload is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kgrank.io import atomic_write_text

STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None
                 ) -> None:
    """safetensors, written to a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=meta)
    os.replace(tmp, path)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                   dict[str, Any]]:
    """(tensors, JSON-able rest) of ``optimizer.state_dict()``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_files` into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
              for g in rest["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's bit-generator state (JSON-able)."""
    return dict(rng.bit_generator.state)


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    """Inverse of :func:`rng_state`."""
    bit_gen = getattr(np.random, state["bit_generator"])()
    bit_gen.state = state
    return np.random.Generator(bit_gen)


def rng_to_json(rng: np.random.Generator) -> str:
    return json.dumps(rng_state(rng))


def rng_from_json(text: str) -> np.random.Generator:
    return rng_from_state(json.loads(text))


def torch_rng_state(gen: torch.Generator) -> list[int]:
    """A torch Generator's state as a list of byte values (JSON-able)."""
    return [int(b) for b in gen.get_state().tolist()]


def set_torch_rng_state(gen: torch.Generator, state: list[int]) -> None:
    gen.set_state(torch.tensor(state, dtype=torch.uint8))


def write_checkpoint(
    directory: Path,
    rank: int,
    rank_state: dict[str, Any],
    model: dict[str, torch.Tensor] | None = None,
    best: dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Write this worker's part of a checkpoint into ``directory``: every rank its RNG states
    (``rank_state``, JSON); rank 0 also the model, best weights, optimizer and state."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / rng_file(rank), json.dumps(rank_state))
    if model is not None:
        save_tensors(model, directory / MODEL_FILE)
    if best is not None:
        save_tensors(best, directory / BEST_FILE)
    extra: dict[str, Any] = {}
    if optimizer is not None:
        tensors, extra = optimizer_to_files(optimizer)
        save_tensors(tensors, directory / OPTIMIZER_FILE)
    if state is not None:
        atomic_write_text(directory / STATE_FILE,
                          json.dumps({**state, "optimizer": extra}, indent=1))


def read_rank_state(directory: Path, rank: int, world: int) -> dict[str, Any] | None:
    """This rank's RNG states, or None when the checkpoint was written by another number of
    workers (the shards differ, so the streams start afresh)."""
    path = directory / rng_file(rank)
    if not path.exists() or int(read_state(directory).get("world", -1)) != world:
        return None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def read_state(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))


def complete_checkpoint(directory: Path) -> bool:
    """Whether a checkpoint directory holds a full, readable checkpoint and no temporary file."""
    names = {p.name for p in directory.iterdir()}
    if any(n.startswith(".") and ".tmp-" in n for n in names):
        return False
    if not {STATE_FILE, MODEL_FILE, BEST_FILE, OPTIMIZER_FILE} <= names:
        return False
    for name in (MODEL_FILE, BEST_FILE, OPTIMIZER_FILE):
        load_tensors(directory / name)  # raises on a truncated file
    read_state(directory)
    return True


# ------------------------------------------------------------------------------- collectives


def _distributed(world: int) -> bool:
    return world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_float(value: float | None, world: int, device: torch.device) -> float | None:
    """Rank 0's ``value`` on every worker (None travels as NaN)."""
    if not _distributed(world):
        return value
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64,
                     device=device)
    torch.distributed.broadcast(t, src=0)
    out = float(t.item())
    return None if np.isnan(out) else out


def mean_over_workers(value: float, world: int, device: torch.device) -> float:
    """The mean of ``value`` over the workers."""
    if not _distributed(world):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


# ------------------------------------------------------------------------------- in a worker


def report_epoch(
    rank: int,
    metrics: dict[str, Any],
    rank_state: dict[str, Any],
    model: torch.nn.Module | None = None,
    best: dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Write this worker's part of the epoch's checkpoint to a temporary directory and report it
    with ``metrics`` (``ray.train.report`` is collective: every rank calls it; Ray Train merges
    the ranks' files into one checkpoint directory in storage)."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="kgrank-ckpt-") as tmp:
        weights = None if model is None else {k: v.detach().cpu().clone()
                                              for k, v in model.state_dict().items()}
        write_checkpoint(Path(tmp), rank, rank_state, weights, best, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the weights and optimizer state of a checkpoint into ``model`` / ``optimizer``;
    returns (state.json, best weights on CPU)."""
    state = read_state(directory)
    model.load_state_dict(load_tensors(directory / MODEL_FILE, device))
    optimizer_from_files(optimizer, load_tensors(directory / OPTIMIZER_FILE, device),
                         state["optimizer"])
    return state, load_tensors(directory / BEST_FILE)
