"""ONNX tower export of fusion models with and without a query input (Amazon Beauty has no
queries: the exporter prunes the unused ``query`` input, and the feed must follow the graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kgrank.export.onnx import (
    USER_INPUTS,
    batch_arrays,
    check_towers,
    example_batch,
    export_towers,
    session,
)
from tests.fusion.test_model import model, spec


@pytest.mark.parametrize("query_dim", [10, 0])
def test_towers_export_and_match_torch(tmp_path: Path, query_dim: int) -> None:
    m = model(spec(query_dim=query_dim))
    paths = export_towers(m, tmp_path, history_len=6)
    batch = example_batch(m, n=5, history_len=6)
    diff = check_towers(m, paths, batch)
    assert diff["user_tower_max_abs_diff"] <= 1e-5
    assert diff["user_rows_checked"] == 5
    user = session(paths["user"])
    feed = batch_arrays(batch, user)
    assert set(feed) == {i.name for i in user.get_inputs()} <= set(USER_INPUTS)
    if query_dim == 0:  # the exporter dropped the unused query input
        assert "query" not in feed
    with torch.no_grad():
        expect = m.users_with_items(batch, m.all_items()).numpy()
    got = user.run(None, feed)[0]
    assert abs(got - expect).max() <= 1e-5
