"""``ModelFrames``: a frame's preparation, model and paste chained off the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.lipsync.batching import BatchWorker, WorkerClosed
from pipeline.lipsync.model_frames import ModelFrames


class Steps:
    """prepare: x -> (x, x * 10); model: y -> y + 1; finish: (x, y) -> (x, y). Records the
    thread of every step and can hold the model until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.threads: dict[str, set[int]] = {"prepare": set(), "model": set(), "finish": set()}
        self.prepared: list[int] = []
        self.finished: list[int] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.batches: list[list[int]] = []

    def prepare(self, x: int) -> tuple[int, int]:
        self.threads["prepare"].add(threading.get_ident())
        if x < 0:
            raise ValueError(f"bad frame {x}")
        self.prepared.append(x)
        return x, x * 10

    def model(self, items: list[int]) -> list[int]:
        self.threads["model"].add(threading.get_ident())
        self.release.wait(10)
        self.batches.append(list(items))
        return [y + 1 for y in items]

    def finish(self, x: int, y: int) -> tuple[int, int]:
        self.threads["finish"].add(threading.get_ident())
        self.finished.append(x)
        return x, y


@pytest.fixture
def pool():
    executor = ThreadPoolExecutor(2, thread_name_prefix="frames-test")
    yield executor
    executor.shutdown(wait=True)


def make(steps: Steps, executor, **worker_kw) -> tuple[ModelFrames, BatchWorker]:
    kw = {"max_batch": 8, "max_wait_s": 0.001, "max_hold_s": 5.0, **worker_kw}
    worker: BatchWorker[int, int] = BatchWorker(steps.model, **kw)
    return ModelFrames(steps.prepare, steps.finish, worker, executor), worker


async def test_a_group_goes_through_every_step_off_the_loop_and_wakes_it_once(pool, monkeypatch):
    steps = Steps()
    frames, worker = make(steps, pool)
    settles: list[int] = []
    real_settle = ModelFrames._settle

    def settle(results):
        settles.append(len(results))
        real_settle(results)

    monkeypatch.setattr(ModelFrames, "_settle", staticmethod(settle))
    wakes: list[list[int]] = []
    try:
        for pair in range(3):
            settles.clear()
            a, b = 2 * pair + 1, 2 * pair + 2
            out = await asyncio.wait_for(asyncio.gather(frames(a), frames(b)), 10)
            assert out == [(a, a * 10 + 1), (b, b * 10 + 1)]
            wakes.append(list(settles))
    finally:
        worker.close()
    # both announced: each pair met in one batch
    assert steps.batches == [[10, 20], [30, 40], [50, 60]]
    loop_thread = threading.get_ident()
    assert all(steps.threads.values())
    for step, threads in steps.threads.items():
        assert loop_thread not in threads, step
    assert steps.threads["model"].isdisjoint(steps.threads["prepare"] | steps.threads["finish"])
    # the loop is handed a pair's frames at once; only a worker thread descheduled between
    # setting the two predictions could let a paste job start with the first alone
    assert all(w in ([2], [1, 1]) for w in wakes) and [2] in wakes, wakes


async def test_a_failed_preparation_fails_its_frame_only_and_withdraws_it(pool):
    steps = Steps()
    frames, worker = make(steps, pool)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(frames(-1), frames(3), return_exceptions=True), 10)
    finally:
        worker.close()
    assert isinstance(results[0], ValueError) and results[1] == (3, 31)
    # the batch did not wait max_hold_s (5 s) for the failed frame's announcement
    assert steps.batches == [[30]]
    assert worker._coming == 0


async def test_a_frame_given_up_in_the_model_queue_is_dropped_there(pool):
    steps = Steps(hold=True)
    frames, worker = make(steps, pool, max_batch=1)
    try:
        first = asyncio.ensure_future(frames(1))  # the worker holds it in the model
        second = asyncio.ensure_future(frames(2))  # queued behind it
        for _ in range(200):
            await asyncio.sleep(0.01)
            if worker.queue_depth == 1 and 2 in steps.prepared:
                break
        assert worker.queue_depth == 1
        second.cancel()
        # the cancellation reaches the worker's queue through the future's done callback,
        # which the loop runs on its next turn: only then may the worker go on
        for _ in range(3):
            await asyncio.sleep(0)
        steps.release.set()
        assert await asyncio.wait_for(first, 10) == (1, 11)
        with pytest.raises(asyncio.CancelledError):
            await second
        for _ in range(100):  # the worker takes its next batch
            if worker.stats.cancelled:
                break
            await asyncio.sleep(0.01)
    finally:
        worker.close()
    assert worker.stats.cancelled == 1
    assert steps.batches == [[10]] and steps.finished == [1]


async def test_a_frame_given_up_before_its_turn_ends_is_never_prepared(pool):
    steps = Steps()
    frames, worker = make(steps, pool)
    try:
        task = asyncio.ensure_future(frames(5))
        await asyncio.sleep(0)  # it announced itself and waits for the hand-over
        task.cancel()
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(frames(6), 10) == (6, 61)
    finally:
        worker.close()
    assert steps.prepared == [6] and worker._coming == 0
    assert task.cancelled()


async def test_a_closed_worker_or_executor_fails_the_frames_clearly():
    steps = Steps()
    executor = ThreadPoolExecutor(1)
    frames, worker = make(steps, executor)
    worker.close()
    with pytest.raises(WorkerClosed):
        await asyncio.wait_for(frames(1), 10)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        await asyncio.wait_for(frames(2), 10)


async def test_without_an_executor_the_steps_still_leave_the_loop():
    steps = Steps()
    frames, worker = make(steps, None)
    try:
        assert await asyncio.wait_for(asyncio.gather(frames(1), frames(2)), 10) == [
            (1, 11), (2, 21)]
    finally:
        worker.close()
    assert threading.get_ident() not in set().union(*steps.threads.values())


async def test_frames_whose_jobs_an_executor_drops_at_shutdown_fail_instead_of_waiting():
    """``shutdown(cancel_futures=True)`` drops queued jobs unrun: a frame whose preparation
    (or paste) was among them fails with a clear error instead of waiting for ever."""
    steps = Steps()
    executor = ThreadPoolExecutor(1)
    frames, worker = make(steps, executor)
    busy = threading.Event()
    executor.submit(busy.wait, 10)  # the one thread is taken: the preparation queues
    try:
        frame = asyncio.ensure_future(frames(1))
        await asyncio.sleep(0.05)
        executor.shutdown(wait=False, cancel_futures=True)
        busy.set()
        with pytest.raises(RuntimeError, match="render executor was shut down"):
            await asyncio.wait_for(frame, 10)
        assert worker._coming == 0 and steps.prepared == []
    finally:
        busy.set()
        worker.close()
