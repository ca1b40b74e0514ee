"""Ranking processes: a spawned process with its own searcher answers as the local one, behind
the same queue."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from kgrank.export import load
from kgrank.serve.batching import MicroBatcher
from kgrank.serve.rankers import (
    _cpus,
    ranker_slots,
    search_many,
    serving_cpus,
    stop,
    wait_ready,
)
from kgrank.serve.searcher import Context, SearchArgs, Searcher, SearchResult
from tests.export.tiny import TinyExport, tiny_export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)


def test_a_ranking_process_answers_as_the_local_searcher(tiny: TinyExport) -> None:
    slots = ranker_slots(tiny.export_dir, 1)
    local = Searcher(load(tiny.export_dir))
    wait_ready(slots)
    users = [*list(local.user_row)[:5], "nobody-ever"]
    batch = [SearchArgs(users[i % len(users)], ["shoes", None][i % 2], Context(), k=5)
             for i in range(12)]
    batcher: MicroBatcher[SearchArgs, SearchResult] = MicroBatcher(
        max_batch=4, slots=[(slots[0][0], search_many)])

    async def all_remote() -> list[SearchResult]:
        return list(await asyncio.gather(*(batcher.submit(a) for a in batch)))

    processes = list(slots[0][0]._processes.values())  # type: ignore[attr-defined]
    try:
        remote = asyncio.run(all_remote())
    finally:
        batcher.close()
    assert processes and not any(p.is_alive() for p in processes)  # closed with the batcher
    assert batcher.batches == 3  # 12 queued requests, batches of 4, one process
    for a, got in zip(batch, remote, strict=True):
        want = local.search_many([a])[0]
        assert [h.item_id for h in got.hits] == [h.item_id for h in want.hits]
        assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits],
                                                            abs=1e-9)
        assert [h.why for h in got.hits] == [h.why for h in want.hits]


def test_pinned_ranking_processes_run_on_their_cpu(tiny: TinyExport) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    cpus = serving_cpus(len(allowed) + 1)  # one more process than CPUs: wraps around
    assert cpus == [allowed[i % len(allowed)] for i in range(len(allowed) + 2)]
    slots = ranker_slots(tiny.export_dir, 1, cpus=[allowed[-1]])
    try:
        wait_ready(slots)
        assert slots[0][0].submit(_cpus).result() == [allowed[-1]]
    finally:
        stop(slots)
    with pytest.raises(ValueError, match="2 CPUs for 1"):
        ranker_slots(tiny.export_dir, 1, cpus=[0, 0])


def test_a_process_without_a_searcher_says_so() -> None:
    with pytest.raises(RuntimeError, match="no searcher"):
        search_many([SearchArgs()])


def test_a_ranking_process_ends_with_its_parent() -> None:
    # a process whose recorded parent is not its parent (the parent died: it was re-parented)
    code = ("from kgrank.serve.rankers import _exit_with_parent; import time; "
            "_exit_with_parent(-5, 0.05); time.sleep(60)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert done.returncode == 0 and time.perf_counter() - t0 < 30
