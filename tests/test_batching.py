"""The cross-session batch worker: batches fill from every submitter, results go back to the
right caller, cancelled items are skipped, failures reach every waiter of their batch."""

import asyncio
import threading
import time

import pytest

from pipeline.lipsync.batching import BatchWorker, WorkerClosed


class Model:
    """Doubles its inputs; the first call can be held until the test releases it."""

    def __init__(self, hold_first=False):
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        self.release.wait(10)
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


async def test_items_queued_while_busy_run_as_one_batch_and_answer_their_callers():
    model = Model(hold_first=True)
    worker = BatchWorker(model, max_batch=8, max_wait_s=0.0)
    first = asyncio.ensure_future(worker.run(100))
    await asyncio.to_thread(model.entered.wait, 5)
    # ten "sessions" submit while the worker is busy with the first batch
    rest = [asyncio.ensure_future(worker.run(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    model.release.set()
    assert await first == 200
    assert await asyncio.gather(*rest) == [2 * i for i in range(10)]
    assert model.batches[0] == [100]
    assert model.batches[1] == list(range(8))  # a full batch, in submission order
    assert model.batches[2] == [8, 9]
    assert worker.stats.batches == 3 and worker.stats.items == 11
    assert worker.stats.sizes == {1: 1, 8: 1, 2: 1}
    worker.close()


async def test_the_first_item_waits_up_to_max_wait_for_company():
    model = Model()
    worker = BatchWorker(model, max_batch=4, max_wait_s=1.0)
    a = asyncio.ensure_future(worker.run(1))
    await asyncio.sleep(0.02)
    b = asyncio.ensure_future(worker.run(2))
    assert await asyncio.gather(a, b) == [2, 4]
    assert model.batches == [[1, 2]]
    worker.close()


async def test_a_full_batch_does_not_wait():
    model = Model()
    worker = BatchWorker(model, max_batch=2, max_wait_s=30.0)
    # would hang the test for 30 s if a full batch still waited
    assert await asyncio.wait_for(asyncio.gather(worker.run(1), worker.run(2)), 5) == [2, 4]
    worker.close()


async def test_cancelled_items_are_skipped_and_failures_reach_every_waiter():
    model = Model(hold_first=True)
    worker = BatchWorker(model, max_batch=8, max_wait_s=0.0)
    first = asyncio.ensure_future(worker.run(1))
    await asyncio.to_thread(model.entered.wait, 5)
    gone = asyncio.ensure_future(worker.run(5))
    bad = [asyncio.ensure_future(worker.run(i)) for i in (3, -1)]
    await asyncio.sleep(0.01)
    gone.cancel()  # the session was interrupted before its frame ran
    await asyncio.sleep(0.01)  # (the cancellation reaches the queue on the next loop turn)
    model.release.set()
    assert await first == 2
    for fut in bad:
        with pytest.raises(ValueError, match="negative"):
            await fut
    assert [5] not in model.batches and all(5 not in b for b in model.batches)
    assert worker.stats.cancelled == 1 and worker.stats.failed_batches == 1
    assert await worker.run(4) == 8  # the worker carries on
    worker.close()


async def test_close_fails_what_is_still_queued():
    model = Model(hold_first=True)
    worker = BatchWorker(model, max_batch=1, max_wait_s=0.0)
    first = asyncio.ensure_future(worker.run(1))
    await asyncio.to_thread(model.entered.wait, 5)
    queued = asyncio.ensure_future(worker.run(2))
    await asyncio.sleep(0.01)
    closer = asyncio.get_running_loop().run_in_executor(None, worker.close)
    await asyncio.sleep(0.01)
    model.release.set()
    await closer
    assert await first == 2
    with pytest.raises(WorkerClosed):
        await queued
    with pytest.raises(WorkerClosed):
        await worker.run(3)


async def test_an_announced_item_is_waited_for_beyond_max_wait():
    """A frame group prepared on two threads: the second frame comes later than max_wait,
    but it was announced, so the batch waits for it (up to max_hold)."""
    model = Model()
    worker = BatchWorker(model, max_batch=4, max_wait_s=0.001, max_hold_s=30.0)
    worker.announce()
    worker.announce()
    a = asyncio.ensure_future(worker.run(1, announced=True))
    await asyncio.sleep(0.1)  # a hundred times max_wait
    assert not a.done()
    b = asyncio.ensure_future(worker.run(2, announced=True))
    assert await asyncio.wait_for(asyncio.gather(a, b), 5) == [2, 4]
    assert model.batches == [[1, 2]]
    worker.close()


async def test_without_an_announcement_the_batch_leaves_after_max_wait():
    model = Model()
    worker = BatchWorker(model, max_batch=4, max_wait_s=0.001, max_hold_s=30.0)
    a = asyncio.ensure_future(worker.run(1))
    await asyncio.sleep(0.1)
    b = asyncio.ensure_future(worker.run(2))
    assert await asyncio.wait_for(asyncio.gather(a, b), 5) == [2, 4]
    assert model.batches == [[1], [2]]
    worker.close()


async def test_a_withdrawn_announcement_releases_the_waiting_batch():
    model = Model()
    worker = BatchWorker(model, max_batch=4, max_wait_s=0.001, max_hold_s=30.0)
    worker.announce()
    worker.announce()
    a = asyncio.ensure_future(worker.run(1, announced=True))
    await asyncio.sleep(0.05)
    assert not a.done()  # still holding for the second one
    worker.withdraw()  # its preparation failed or was cancelled
    assert await asyncio.wait_for(a, 5) == 2  # long before the 30 s hold
    assert model.batches == [[1]]
    worker.close()


async def test_several_workers_run_batches_at_the_same_time():
    """workers=2: two batches run at once (each call waits at a barrier for the other; one
    worker alone would break the barrier)."""
    for workers, together in ((2, True), (1, False)):
        barrier = threading.Barrier(2, timeout=1.0)
        threads: set[str] = set()

        def model(items, barrier=barrier, threads=threads):
            threads.add(threading.current_thread().name)
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return [-1 for _ in items]
            return [2 * i for i in items]

        worker = BatchWorker(model, max_batch=1, max_wait_s=0.0, workers=workers, name="w")
        assert worker.workers == workers
        out = await asyncio.wait_for(asyncio.gather(worker.run(1), worker.run(2)), 10)
        if together:
            assert out == [2, 4]
            assert threads == {"w-0", "w-1"}
        else:
            assert out == [-1, -1]  # the second batch waited for the first: no overlap
        assert worker.stats.batches == 2
        worker.close()


def test_worker_count_is_checked():
    with pytest.raises(ValueError, match="workers"):
        BatchWorker(Model(), max_batch=1, max_wait_s=0.0, workers=0)


def test_each_item_wakes_only_the_thread_that_needs_it():
    """Two threads, frames in announced pairs: the first frame wakes one idle thread, the
    second wakes only that one (filling the batch), never the other as well."""
    model = Model()
    worker = BatchWorker(model, max_batch=2, max_wait_s=0.0, max_hold_s=5.0, workers=2)
    pairs = 20
    try:
        for i in range(pairs):
            # a call's pairs come 80 ms apart: both threads are back waiting by then
            deadline = time.monotonic() + 5
            while worker._idle_waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            worker.announce()
            worker.announce()
            first = worker.submit(i, announced=True)
            threading.Event().wait(0.002)  # the second frame is still being prepared
            second = worker.submit(100 + i, announced=True)
            assert first.result(5) == 2 * i and second.result(5) == 2 * (100 + i)
        assert worker.stats.sizes == {2: pairs}
        assert worker.stats.wakeups <= 2 * pairs  # waking both threads each time: 4 a pair
    finally:
        worker.close()


def test_what_a_batch_leaves_over_goes_to_an_idle_thread_at_once():
    """Three frames for batches of two: the first thread takes two and is held in the model;
    the third frame wakes the other thread, which runs it meanwhile."""
    model = Model(hold_first=True)
    worker = BatchWorker(model, max_batch=2, max_wait_s=0.0, max_hold_s=5.0, workers=2)
    try:
        for _ in range(3):
            worker.announce()
        futures = [worker.submit(i, announced=True) for i in (1, 2, 3)]
        deadline = time.monotonic() + 5
        while len(model.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert model.batches == [[1, 2], [3]]  # both in the model, the first still held
        model.release.set()
        assert [f.result(5) for f in futures] == [2, 4, 6]
    finally:
        model.release.set()
        worker.close()
