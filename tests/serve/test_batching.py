"""MicroBatcher: requests that queue while a batch runs are ranked together, each caller gets
its own answer, and one bad request fails alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from kgrank.serve.batching import MicroBatcher, thread_slot


class Recorder:
    """A batch function that squares its items, records each batch and takes ``seconds``."""

    def __init__(self, seconds: float = 0.02, bad: int | None = None) -> None:
        self.seconds, self.bad = seconds, bad
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if self.bad is not None and self.bad in items:
            raise ValueError(f"bad item {self.bad}")
        return [i * i for i in items]


async def _gather(batcher: MicroBatcher[int, int], items: list[int]) -> list[object]:
    return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)


async def _staggered(batcher: MicroBatcher[int, int], first: int) -> list[int]:
    """Submit ``first .. first + 4``, 10 ms apart."""
    async def later(i: int) -> int:
        await asyncio.sleep(0.01 * (i - first))
        return await batcher.submit(i)
    return list(await asyncio.gather(*(later(i) for i in range(first, first + 5))))


def test_queued_requests_are_batched_and_answered_in_place() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch=4)
    out = asyncio.run(_gather(batcher, list(range(10))))
    assert out == [i * i for i in range(10)]
    # all ten queued before the first batch started: batches of <= 4, in arrival order
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batcher.batches == 3 and batcher.items == 10
    assert len(fn.threads) == 1  # batches run one at a time, on the batcher's thread
    batcher.close()


def test_max_wait_lets_a_batch_fill_under_load_only() -> None:
    fn = Recorder(seconds=0.0)
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=200)

    # light load (nothing batched yet): the first request does not wait for others
    t0 = time.perf_counter()
    assert asyncio.run(_staggered(batcher, 0)) == [0, 1, 4, 9, 16]
    assert fn.batches[0] == [0] and time.perf_counter() - t0 < 0.2
    # under load (the last batch held several requests): a batch waits for later arrivals,
    # as many as the recent peak demand (3), then the rest wait in their turn
    fn.batches.clear()
    assert asyncio.run(_gather(batcher, [10, 11, 12])) == [100, 121, 144]
    assert asyncio.run(_staggered(batcher, 20)) == [i * i for i in range(20, 25)]
    assert fn.batches == [[10, 11, 12], [20, 21, 22], [23, 24]]
    batcher.close()


def test_the_awaited_demand_is_the_recent_peak_decaying() -> None:
    fn = Recorder(seconds=0.0)
    batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=200)

    async def scenario() -> None:  # one event loop (the batcher's events bind to it)
        await _gather(batcher, [0, 1, 2, 3])  # demand 4
        await _gather(batcher, [10, 11])  # waits for 4, takes 2: the peak decays to 3.6
        await _staggered(batcher, 20)  # still waits for 4 (not for the last demand, 2)

    asyncio.run(scenario())
    assert fn.batches == [[0, 1, 2, 3], [10, 11], [20, 21, 22, 23], [24]]
    batcher.close()


def test_a_freed_slot_takes_a_fair_share_of_the_demand_not_the_whole_queue() -> None:
    fast, slow = Recorder(seconds=0.05), Recorder(seconds=0.3)
    batcher = MicroBatcher(max_batch=8, slots=[thread_slot(fast), thread_slot(slow)])

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(_gather(batcher, [0, 1]))  # one each: demand 2, 2 slots
        await asyncio.sleep(0.01)
        rest = await _gather(batcher, list(range(2, 8)))  # queue while both slots are busy
        return [*await first, *rest]

    assert asyncio.run(scenario()) == [i * i for i in range(8)]
    # the fast slot freed with 6 queued and 1 running: demand 7, its share 4 (not all 6)
    assert fast.batches[:2] == [[0], [2, 3, 4, 5]] and slow.batches[0] == [1]
    assert sorted(i for b in fast.batches + slow.batches for i in b) == list(range(8))
    batcher.close()


def test_a_failing_request_fails_alone() -> None:
    fn = Recorder(bad=5)
    batcher = MicroBatcher(fn, max_batch=8)
    out = asyncio.run(_gather(batcher, list(range(8))))
    assert isinstance(out[5], ValueError)
    assert [o for i, o in enumerate(out) if i != 5] == [i * i for i in range(8) if i != 5]
    # the failed batch was re-run item by item
    assert [5] in fn.batches and any(len(b) > 1 and 5 in b for b in fn.batches)
    batcher.close()


def test_max_batch_one_ranks_one_at_a_time() -> None:
    fn = Recorder(seconds=0.001)
    batcher = MicroBatcher(fn, max_batch=1)
    assert asyncio.run(_gather(batcher, [3, 1, 2])) == [9, 1, 4]
    assert fn.batches == [[3], [1], [2]]
    batcher.close()
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, max_batch=0)


def test_a_fault_in_the_batching_loop_fails_the_queued_requests() -> None:
    batcher = MicroBatcher(Recorder(seconds=0.0), max_batch=8, max_wait_ms=50)

    async def first() -> None:
        await _gather(batcher, [0, 1, 2])
        await _gather(batcher, [3, 4])  # waits to fill (for 3) on an event of this loop

    asyncio.run(first())
    # in another event loop that wait raises inside the batching loop
    out = asyncio.run(_gather(batcher, [5, 6]))
    assert all(isinstance(o, RuntimeError) for o in out), out
    batcher.close()
