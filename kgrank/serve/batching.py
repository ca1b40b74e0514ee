"""Dynamic (micro-)batching of ranking requests inside one server process.

A request costs a fixed part (Python calls of the request path: candidate generation over every
source, ~90 feature columns, one LightGBM call) plus a part per candidate. Ranking the requests
that arrive while the previous batch runs in one :meth:`~kgrank.serve.searcher.Searcher.
search_many` call pays the fixed part once per batch (demo export, 1,000 candidates: 1 request
~11 ms, 4 requests ~29 ms). Under light load a batch is one request and nothing waits for a
batch to fill; under load the batches grow, and so does the throughput. This is the dynamic
batching of serving systems such as Triton and Ray Serve's ``@serve.batch``, without a
batching timeout: a batch is what queued while the ranker was busy.

Batches run on one thread of the process (one core's worth of ranking), so the event loop keeps
accepting and parsing requests meanwhile. If a batch fails, its requests are run again one by
one, so that one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger("kgrank")

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` -> ``fn([..., item, ...])[its position]``, batching the items that
    queue while ``fn`` runs (at most ``max_batch`` per call; 1: no batching), after waiting up to
    ``max_wait_ms`` for a batch to fill (0: never wait). Use from one event loop."""

    def __init__(self, fn: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 8,
                 max_wait_ms: float = 0.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be at least 1 and max_wait_ms at least 0, got "
                             f"{max_batch} and {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._more = asyncio.Event()
        self._running = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kgrank-rank")
        self.batches = 0
        """Number of ``fn`` calls so far (the batch sizes are ``items / batches`` on average)."""
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        self._more.set()
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                await self._fill(loop)
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                live = [(item, fut) for item, fut in batch if not fut.done()]  # not cancelled
                if live:
                    await self._run(loop, live)
        finally:
            self._running = False

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to ``max_wait`` for the batch to fill (Triton's max queue delay, Ray Serve's
        batch_wait_timeout_s): in a closed loop the clients just answered send their next
        requests a moment after the next batch would otherwise have started without them."""
        deadline = loop.time() + self.max_wait
        while len(self._queue) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _run(self, loop: asyncio.AbstractEventLoop,
                   batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        self.items += len(items)
        try:
            results = await loop.run_in_executor(self._executor, self._call, items)
        except Exception as exc:  # noqa: BLE001 - re-run one by one: only the bad one fails
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            log.warning("a batch of %d requests failed (%r); running them one by one",
                        len(batch), exc)
            for one in batch:
                await self._run(loop, [one])
            return
        for (_, fut), res in zip(batch, results, strict=True):
            _settle(fut, res)

    def _call(self, items: list[T]) -> Sequence[R]:
        out = self.fn(items)
        if len(out) != len(items):
            raise RuntimeError(f"batch function returned {len(out)} results for {len(items)}")
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _settle(fut: asyncio.Future[R], res: R | None = None, exc: BaseException | None = None
            ) -> None:
    if fut.done():  # the caller went away (cancelled)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)  # type: ignore[arg-type]
