"""Ranking processes for :class:`~kgrank.serve.batching.MicroBatcher`.

``kgrank serve --workers N`` runs one HTTP process whose own :class:`Searcher` ranks on a
thread, plus ``N - 1`` ranking processes, each a single-process executor holding a
:class:`Searcher` of the same export (loaded once by the executor's initializer, in a *spawned*
process: no forked copies of torch / onnxruntime thread pools). Batches go to them as
:class:`~kgrank.serve.searcher.SearchArgs` lists and come back as
:class:`~kgrank.serve.searcher.SearchResult` lists (plain dataclasses; Python's
multiprocessing pickles them between the processes, nothing is stored).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kgrank.serve.batching import Slot
from kgrank.serve.responses import answering
from kgrank.serve.searcher import SearchArgs, Searcher, SearchResult

_SEARCHER: Searcher | None = None
"""This ranking process's searcher (set by :func:`_load`)."""


def _load(export_dir: str, candidates: int | None, threads: int, cpu: int | None = None
          ) -> None:
    from kgrank.export.loader import load

    global _SEARCHER
    _exit_with_parent(os.getppid())
    if cpu is not None:  # before loading: every thread started from here inherits it
        os.sched_setaffinity(0, {cpu})
    _SEARCHER = Searcher(load(Path(export_dir)), candidates=candidates, threads=threads)
    freeze_loaded()


def freeze_loaded() -> None:
    """Move everything loaded so far out of the garbage collector's sight (``gc.freeze``).

    A loaded searcher is ~600,000 GC-tracked objects (the text encoder's modules, tokenizer,
    data frames), which live as long as the process. Every full collection walked them all:
    250-320 ms (Beauty), and one ran in a serving process during a 2,000-request load test
    (268 ms), stalling the batch in progress and every request queued behind it. Frozen, they
    are never scanned; requests' own garbage is still collected."""
    gc.collect()
    gc.freeze()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this process when ``parent`` is gone (killed without shutting its executors down:
    an idle executor process would otherwise wait on its queue forever, holding a searcher)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="kgrank-parent-watch", daemon=True).start()


def serving_cpus(n_rankers: int) -> list[int]:
    """The CPU of the HTTP process, then of each of ``n_rankers`` ranking processes, for
    ``kgrank serve --pin-cpus``: this process's allowed CPUs in turn (wrapping around).

    Pinned, a ranking process keeps its core and its caches; unpinned, the scheduler moved the
    rankers, the HTTP process and the load threads between the 2 cores of the benchmark machine
    (Amazon Beauty, 8 clients, runs of one series: p99 49.9 / 51.6 ms pinned, 52.9-60.3 ms in 3
    unpinned runs; later pinned checks on a slower VM period 51.0-60.0 ms,
    ``benchmarks/RESULTS.md``)."""
    cpus = _cpus()
    return [cpus[i % len(cpus)] for i in range(n_rankers + 1)]


def _cpus() -> list[int]:
    """This process's allowed CPUs (a start-up check of pinning)."""
    return sorted(os.sched_getaffinity(0))


def _ready() -> int:
    """Number of items of the loaded searcher (a start-up check)."""
    assert _SEARCHER is not None
    return len(_SEARCHER.item_ids)


def search_many(batch: Sequence[SearchArgs]) -> list[SearchResult]:
    """:meth:`Searcher.search_many` in a ranking process."""
    if _SEARCHER is None:
        raise RuntimeError("this process has no searcher (not started by ranker_slots)")
    return _SEARCHER.search_many(batch)


def search_many_json(batch: Sequence[SearchArgs]) -> list[bytes]:
    """:func:`search_many` answered with the JSON bytes of the API
    (:mod:`kgrank.serve.responses`)."""
    return answering(search_many)(batch)


def ranker_slots(export_dir: Path, n: int, candidates: int | None = None, threads: int = 1,
                 cpus: Sequence[int] | None = None) -> list[Slot[SearchArgs, bytes]]:
    """Start ``n`` ranking processes over ``export_dir`` (they load in the background:
    :func:`wait_ready` blocks until they have); ``cpus``: the CPU each is pinned to (None: not
    pinned). They answer with JSON bytes (:func:`search_many_json`)."""
    if cpus is not None and len(cpus) != n:
        raise ValueError(f"{len(cpus)} CPUs for {n} ranking processes")
    ctx = multiprocessing.get_context("spawn")
    slots: list[Slot[SearchArgs, bytes]] = []
    for i in range(n):
        executor = ProcessPoolExecutor(1, mp_context=ctx, initializer=_load, initargs=(
            str(Path(export_dir).resolve()), candidates, threads,
            None if cpus is None else cpus[i]))
        executor.submit(_ready)  # starts the process, which loads its searcher
        slots.append((executor, search_many_json))
    return slots


def wait_ready(slots: Sequence[Slot[SearchArgs, bytes]]) -> None:
    """Block until every ranking process has loaded its searcher; a failure to load raises here
    (and stops them all)."""
    try:
        for fut in [executor.submit(_ready) for executor, _ in slots]:
            fut.result()
    except BaseException:
        stop(slots)
        raise


def stop(slots: Sequence[Slot[SearchArgs, bytes]]) -> None:
    """Stop ranking processes without waiting for them (a failed start-up)."""
    for executor, _ in slots:
        executor.shutdown(wait=False, cancel_futures=True)
