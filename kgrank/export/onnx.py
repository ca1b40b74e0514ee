"""ONNX export of the fusion towers, checked numerically against torch with onnxruntime.

Two graphs are written:

* ``item_tower.onnx``: item ids ``int64 [N]`` -> fused, L2-normalised embeddings ``[N, dim]``
  (the fixed graph / text / image inputs are constants of the graph);
* ``user_tower.onnx``: the :class:`~kgrank.fusion.model.UserBatch` tensors (``users``,
  ``hist_items``, ``hist_mask``, ``hist_gap``, ``context``, ``time``, ``query``, ``has_query``)
  -> user-in-context vectors ``[B, dim]``; the catalog's fused item embeddings (for the history
  attention) are a constant of the graph, so serving needs no torch module.

Both are exported with the TorchScript-based exporter (``dynamo=False``), opset 17, a dynamic
batch axis, in eval mode (no modality dropout). :func:`check_towers` compares onnxruntime with
torch on the whole catalog and on a batch of request inputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kgrank.fusion.model import FusionModel, UserBatch

OPSET = 17
USER_INPUTS = ("users", "hist_items", "hist_mask", "hist_gap", "context", "time", "query",
               "has_query")
"""Input names of ``user_tower.onnx``, in order (the fields of a UserBatch)."""
TOLERANCE = 1e-5
"""Largest accepted |onnxruntime - torch| of any output value."""


class _ItemTower(nn.Module):
    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.model.item_tower(items)


class _UserTower(nn.Module):
    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("items", model.all_items().detach().clone())

    def forward(self, users: torch.Tensor, hist_items: torch.Tensor, hist_mask: torch.Tensor,
                hist_gap: torch.Tensor, context: torch.Tensor, time: torch.Tensor,
                query: torch.Tensor, has_query: torch.Tensor) -> torch.Tensor:
        batch = UserBatch(users, hist_items, hist_mask, hist_gap, context, time, query, has_query)
        return self.model.users_with_items(batch, self.get_buffer("items"))


def batch_arrays(batch: UserBatch, session: Any | None = None) -> dict[str, np.ndarray]:
    """The onnxruntime feed of a UserBatch (numpy, on CPU). With ``session``, only the inputs
    its graph declares: the exporter prunes inputs the tower never reads (``query`` and
    ``has_query`` of a model trained without queries), and onnxruntime rejects unknown names."""
    names = USER_INPUTS if session is None else [i.name for i in session.get_inputs()]
    return {name: getattr(batch, name).detach().cpu().numpy() for name in names}


def example_batch(model: FusionModel, n: int = 4, history_len: int = 20) -> UserBatch:
    """A small valid UserBatch (for tracing and checks): known and unknown users, some history."""
    spec = model.spec
    gen = torch.Generator().manual_seed(0)
    users = torch.randint(0, max(spec.n_users, 1), (n,), generator=gen)
    users[0] = -1
    mask = torch.rand(n, history_len, generator=gen) < 0.6
    mask[0] = False
    return UserBatch(
        users=users,
        hist_items=torch.randint(0, max(spec.n_items, 1), (n, history_len), generator=gen),
        hist_mask=mask,
        hist_gap=torch.randint(0, 8, (n, history_len), generator=gen),
        context=torch.zeros(n, 2, dtype=torch.int64),
        time=torch.rand(n, 4, generator=gen) * 2 - 1,
        query=torch.randn(n, spec.query_dim, generator=gen),
        has_query=torch.arange(n) % 2 == 1,
    )


def export_towers(model: FusionModel, out_dir: Path, history_len: int) -> dict[str, Path]:
    """Write ``item_tower.onnx`` and ``user_tower.onnx`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    paths = {"item": out_dir / "item_tower.onnx", "user": out_dir / "user_tower.onnx"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python ints in the graph (constants)
        torch.onnx.export(_ItemTower(model).eval(), (torch.arange(3),), str(paths["item"]),
                          input_names=["items"], output_names=["embedding"],
                          dynamic_axes={"items": {0: "n"}, "embedding": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
        batch = example_batch(model, history_len=history_len)
        args = tuple(getattr(batch, name) for name in USER_INPUTS)
        axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in USER_INPUTS}
        axes["user"] = {0: "batch"}
        torch.onnx.export(_UserTower(model).eval(), args, str(paths["user"]),
                          input_names=list(USER_INPUTS), output_names=["user"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return paths


def session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU inference session (``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_towers(model: FusionModel, paths: dict[str, Path], batch: UserBatch
                 ) -> dict[str, float]:
    """Max |onnxruntime - torch| of the item tower on the whole catalog and of the user tower on
    ``batch``; raises ValueError when either exceeds :data:`TOLERANCE`."""
    model = model.cpu().eval()
    with torch.no_grad():
        ids = torch.arange(model.spec.n_items)
        items_t = model.item_tower(ids).numpy()
        users_t = model.users_with_items(batch, model.all_items()).numpy()
    items_o = session(paths["item"]).run(None, {"items": ids.numpy()})[0]
    user_session = session(paths["user"])
    users_o = user_session.run(None, batch_arrays(batch, user_session))[0]
    diff = {"item_tower_max_abs_diff": float(np.abs(items_o - items_t).max(initial=0.0)),
            "user_tower_max_abs_diff": float(np.abs(users_o - users_t).max(initial=0.0)),
            "item_rows_checked": int(len(items_t)), "user_rows_checked": int(len(users_t))}
    for key in ("item_tower_max_abs_diff", "user_tower_max_abs_diff"):
        if not diff[key] <= TOLERANCE:
            raise ValueError(f"ONNX export: {key} = {diff[key]:.3g} > {TOLERANCE}")
    return diff
