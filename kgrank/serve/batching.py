"""Dynamic (micro-)batching of ranking requests, over one or more rankers.

A request costs a fixed part (Python calls of the request path: candidate generation over every
source, ~90 feature columns, one LightGBM call) plus a part per candidate. Ranking the requests
that arrive while a ranker is busy in one :meth:`~kgrank.serve.searcher.Searcher.search_many`
call pays the fixed part once per batch (demo export, 1,000 candidates: 1 request ~11 ms,
4 requests ~29 ms). Under light load a batch is one request; under load the batches grow, and
so does the throughput. This is the dynamic batching of serving systems such as Triton and Ray
Serve's ``@serve.batch``: a batch is what queued while the rankers were busy, after an optional
short wait for it to fill (``max_wait_ms``, Triton's max queue delay; only while the batches
hold several requests, so that a request under light load never waits).

Rankers are *slots*: an executor plus the batch function to run on it (a thread of this process
with its :class:`~kgrank.serve.searcher.Searcher`, or a process with its own, see
:mod:`kgrank.serve.rankers`). One queue feeds every slot, so the load is balanced per request,
not per connection (uvicorn's worker processes each keep the connections they accepted: 8
keep-alive clients can split unevenly between 2 workers and leave a core short). A slot that
frees takes a fair share of the demand, ``ceil((queued + running) / slots)`` requests (at most
``max_batch``), not everything queued, and a batch waits (``max_wait_ms``) only for its share of
the recent peak demand to arrive (about the number of closed-loop clients, whose answered
requests come back a moment later): with 8 clients on 2 slots the batches are 4 + 4. Taking
the whole queue allowed 6 + 2 splits, and waited for ``max_batch`` requests that a closed loop
of 8 never sends (Amazon Beauty, 8 clients: 200-228 req/s and mean batch 4.1 of uneven sizes
before; 216-261 req/s and mean batch 3.9, at most 4, together with a cheaper request path,
``benchmarks/RESULTS.md``).

If a batch fails, its requests are run again one by one, so that one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger("kgrank")

T = TypeVar("T")
R = TypeVar("R")

DEMAND_DECAY = 0.9
"""Per batch, how much of the recent peak demand a batch still waits for (after a drop from 8
clients to 2, the waits stop within ~13 batches)."""

Slot = tuple[Executor, Callable[[Sequence[T]], Sequence[R]]]
"""A ranker: the executor that runs batches (one at a time) and the batch function it runs."""


def thread_slot(fn: Callable[[Sequence[T]], Sequence[R]]) -> Slot[T, R]:
    """A ranker on one thread of this process."""
    return ThreadPoolExecutor(1, thread_name_prefix="kgrank-rank"), fn


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` -> ``fn([..., item, ...])[its position]``.

    ``slots``: the rankers (default: ``fn`` on one thread of this process). Each runs one batch
    at a time; a batch holds the items that queued while the slots were busy (at most
    ``max_batch``; 1: no batching), taken after waiting up to ``max_wait_ms`` for it to fill
    (0: never wait). Use from one event loop.
    """

    def __init__(self, fn: Callable[[Sequence[T]], Sequence[R]] | None = None,
                 max_batch: int = 8, max_wait_ms: float = 0.0,
                 slots: Sequence[Slot[T, R]] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be at least 1 and max_wait_ms at least 0, got "
                             f"{max_batch} and {max_wait_ms}")
        if slots is None:
            if fn is None:
                raise ValueError("MicroBatcher needs fn or slots")
            slots = [thread_slot(fn)]
        if not slots:
            raise ValueError("MicroBatcher needs at least one slot")
        self.slots = list(slots)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._more = asyncio.Event()
        self._free: list[int] = list(range(len(self.slots)))
        self._freed = asyncio.Event()
        self._running = False
        self._last_size = 0
        self._in_flight = 0
        """Requests in running batches."""
        self._demand = 0.0
        """Queued + running requests when batches start, the recent peak (decaying by
        :data:`DEMAND_DECAY` a batch): about the number of clients of a closed loop, whose
        answered requests come back a moment later. A batch waits for its share of it."""
        self.batches = 0
        """Number of batches run so far (the mean batch size is ``items / batches``)."""
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
                while not self._free:  # every ranker is busy: the queue grows meanwhile
                    self._freed.clear()
                    await self._freed.wait()
                await self._fill(loop)
                slot = self._free.pop(0)
                # this slot's fair share of the demand (the other slots, free or busy, take the
                # rest): balanced batches, none long while another is short
                demand = len(self._queue) + self._in_flight
                self._demand = max(float(demand), self._demand * DEMAND_DECAY)
                n = min(len(self._queue), self._share(demand))
                batch = self._queue[:n]
                del self._queue[:n]
                live = [(item, fut) for item, fut in batch if not fut.done()]  # not cancelled
                self._last_size = len(live)
                if live:
                    self._in_flight += len(live)
                    loop.create_task(self._run_on(slot, live))
                else:
                    self._release(slot)
        except Exception as exc:  # noqa: BLE001 - a fault here must not leave callers waiting
            log.exception("the batching loop failed; failing the queued requests")
            queued, self._queue = self._queue, []
            for _, fut in queued:
                _settle(fut, exc=exc)
        finally:
            self._running = False

    def _share(self, demand: float) -> int:
        """A slot's fair share of ``demand`` requests (at most ``max_batch``)."""
        return min(self.max_batch, math.ceil(demand / len(self.slots)))

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to ``max_wait`` for the batch to fill to its share of the peak demand, when
        the previous batch held more than one request (under load: in a closed loop the clients
        just answered send their next requests a moment after the next batch would otherwise
        have started without them; under light load a request never waits)."""
        if self._last_size <= 1:  # light load: batches are single requests, nothing to wait for
            return
        deadline = loop.time() + self.max_wait
        while len(self._queue) < self._share(self._demand):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), left)
            except asyncio.TimeoutError:
                return

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._freed.set()

    async def _run_on(self, slot: int, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            await self._run(slot, batch)
        finally:
            self._in_flight -= len(batch)
            self._release(slot)

    async def _run(self, slot: int, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        executor, fn = self.slots[slot]
        items = [item for item, _ in batch]
        self.batches += 1
        self.items += len(items)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(executor, _call, fn, items)
        except Exception as exc:  # noqa: BLE001 - re-run one by one: only the bad one fails
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            log.warning("a batch of %d requests failed (%r); running them one by one",
                        len(batch), exc)
            for one in batch:
                await self._run(slot, [one])
            return
        for (_, fut), res in zip(batch, results, strict=True):
            _settle(fut, res)

    def close(self) -> None:
        """Stop the slots' executors (and wait for them: ranking processes exit with them)."""
        for executor, _ in self.slots:
            executor.shutdown(wait=True, cancel_futures=True)


def _call(fn: Callable[[Sequence[T]], Sequence[R]], items: list[T]) -> Sequence[R]:
    """``fn(items)``, checked (module-level: process executors pickle it by name)."""
    out = fn(items)
    if len(out) != len(items):
        raise RuntimeError(f"batch function returned {len(out)} results for {len(items)}")
    return out


def _settle(fut: asyncio.Future[R], res: R | None = None, exc: BaseException | None = None
            ) -> None:
    if fut.done():  # the caller went away (cancelled)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)  # type: ignore[arg-type]
