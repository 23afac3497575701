"""A lip-sync model's frames from first step to last without the event loop in between.

A Wav2Lip frame takes three steps on three kinds of thread: its preparation (idle render, face
crop) on the session's render executor, the model on the device's batching worker, and the
paste on the render executor again. Awaiting each step from the event loop costs three
hand-offs a frame, each a wake-up of the loop through its self-pipe, a future chained across
threads and a task step: 0.42 CPU-ms of the event loop a frame, against 0.24 chained as
below (``bench.model_handoffs``, a model that costs nothing, paced like a call).

``ModelFrames`` chains the steps off the loop instead: the frames handed over in one turn of
the loop (a call's frame group) are prepared in one executor job, which hands each to the
worker; the worker's thread, as a frame's prediction is set, queues its paste on the
executor, where one job finishes every frame whose prediction is in (``_drain``); and the
loop is woken once for all of them. A frame given up (its awaiting task cancelled: the
producer's deadline, an interruption) is dropped at whichever step it has reached: before
its preparation its announcement is withdrawn, in the worker's queue it is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

from pipeline.lipsync.batching import BatchWorker

P = TypeVar("P")  # what a frame is asked with (a plan)
S = TypeVar("S")  # what its preparation keeps for the paste
I = TypeVar("I")  # noqa: E741 - the model's item
O = TypeVar("O")  # noqa: E741 - the model's output
R = TypeVar("R")  # the frame


class _Job(Generic[P, S]):
    __slots__ = ("arg", "future", "state", "model", "cancelled")

    def __init__(self, arg: P, future: asyncio.Future[Any]) -> None:
        self.arg = arg
        self.future = future
        self.state: S | None = None
        self.model: Future[Any] | None = None  # its item in the worker's hands
        self.cancelled = False  # set on the loop; read by the threads at each step


class ModelFrames(Generic[P, S, I, O, R]):
    """``await frames(arg)``: ``prepare(arg) -> (state, item)`` on ``executor``, the item
    through ``worker``, then ``finish(state, output)`` on ``executor``, the loop woken once
    per group of frames. Each frame is announced to the worker when it is asked for, so a
    batch waits for the frames of a group still being prepared. With ``executor`` None the
    preparation runs on the loop's default executor and the paste on the worker's thread."""

    def __init__(
        self,
        prepare: Callable[[P], tuple[S, I]],
        finish: Callable[[S, O], R],
        worker: BatchWorker[I, O],
        executor: Executor | None,
        *,
        max_group: int = 4,
    ) -> None:
        self._prepare = prepare
        self._finish = finish
        self._worker = worker
        self._executor = executor
        self._max_group = max(1, max_group)
        self._pending: list[_Job[P, S]] = []  # asked for in this turn of the loop
        self._lock = threading.Lock()
        self._finishing: list[tuple[_Job[P, S], Future[O]]] = []  # predicted, to paste
        self._draining = False  # a job pasting ``_finishing`` is queued or running

    async def __call__(self, arg: P) -> R:
        loop = asyncio.get_running_loop()
        job: _Job[P, S] = _Job(arg, loop.create_future())
        self._worker.announce()
        self._pending.append(job)
        if len(self._pending) == 1:
            loop.call_soon(self._submit, loop)
        job.future.add_done_callback(lambda f: self._given_up(job) if f.cancelled() else None)
        result: R = await job.future
        return result

    @staticmethod
    def _given_up(job: _Job[Any, Any]) -> None:
        job.cancelled = True  # the threads drop it at their next step ...
        if job.model is not None:
            job.model.cancel()  # ... and the worker if it has not started it

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        pending, self._pending = self._pending, []
        live = []
        for job in pending:
            if job.future.done():  # given up before it was handed over
                self._worker.withdraw()
            else:
                live.append(job)
        for i in range(0, len(live), self._max_group):
            group = live[i : i + self._max_group]
            try:
                if self._executor is None:
                    loop.run_in_executor(None, self._prepare_group, group, loop)
                else:
                    self._executor.submit(self._prepare_group, group, loop).add_done_callback(
                        functools.partial(self._never_prepared, loop, group))
            except RuntimeError as exc:  # the executor is shut down: the frames fail with it
                for job in group:
                    self._worker.withdraw()
                    job.future.set_exception(exc)

    def _never_prepared(self, loop: asyncio.AbstractEventLoop, group: list[_Job[P, S]],
                        job_future: Future[None]) -> None:
        """The preparation job was dropped unrun (its executor shut down, cancelling what it
        still held): its frames fail rather than wait for ever."""
        if not job_future.cancelled():
            return
        for _ in group:
            self._worker.withdraw()
        lost = RuntimeError("the render executor was shut down")
        self._deliver(loop, [(job, False, lost) for job in group])

    def _prepare_group(self, group: list[_Job[P, S]], loop: asyncio.AbstractEventLoop) -> None:
        """(executor) Prepare each frame and hand it to the worker."""
        failed: list[tuple[_Job[P, S], bool, Any]] = []
        for job in group:
            if job.cancelled:
                self._worker.withdraw()
                continue
            try:
                job.state, item = self._prepare(job.arg)
            except Exception as exc:  # noqa: BLE001 - it belongs to that one frame
                self._worker.withdraw()
                failed.append((job, False, exc))
                continue
            if job.cancelled:
                self._worker.withdraw()
                continue
            model = self._worker.submit(item, announced=True)
            model.add_done_callback(functools.partial(self._predicted, loop, job))
            job.model = model
            if job.cancelled:  # given up meanwhile: the worker drops it if not started
                model.cancel()
        self._deliver(loop, failed)

    def _predicted(self, loop: asyncio.AbstractEventLoop, job: _Job[P, S],
                   model: Future[O]) -> None:
        """(the worker's thread) The frame's prediction is in: queue its paste."""
        if model.cancelled():
            return
        with self._lock:
            self._finishing.append((job, model))
            if self._draining:
                return
            self._draining = True
        if self._executor is None:
            self._drain(loop)
            return
        try:
            self._executor.submit(self._drain, loop).add_done_callback(
                functools.partial(self._never_drained, loop))
        except RuntimeError as exc:  # the executor is shut down
            self._fail_finishing(loop, exc)

    def _never_drained(self, loop: asyncio.AbstractEventLoop, job_future: Future[None]) -> None:
        if job_future.cancelled():  # dropped unrun by the executor's shutdown
            self._fail_finishing(loop, RuntimeError("the render executor was shut down"))

    def _fail_finishing(self, loop: asyncio.AbstractEventLoop, exc: Exception) -> None:
        with self._lock:
            jobs, self._finishing, self._draining = self._finishing, [], False
        self._deliver(loop, [(j, False, exc) for j, _ in jobs])

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """(executor) Paste every frame whose prediction is in, those that come in
        meanwhile too; then wake the loop once for all of them."""
        done: list[tuple[_Job[P, S], bool, Any]] = []
        while True:
            with self._lock:
                if not self._finishing:
                    self._draining = False
                    break
                batch, self._finishing = self._finishing, []
            for job, model in batch:
                if job.cancelled:
                    continue
                try:
                    assert job.state is not None
                    done.append((job, True, self._finish(job.state, model.result())))
                except Exception as exc:  # noqa: BLE001 - the model's or the paste's, the frame's
                    done.append((job, False, exc))
                job.state = job.model = None
        self._deliver(loop, done)

    def _deliver(self, loop: asyncio.AbstractEventLoop,
                 results: list[tuple[_Job[P, S], bool, Any]]) -> None:
        if not results:
            return
        try:
            loop.call_soon_threadsafe(self._settle, results)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    @staticmethod
    def _settle(results: list[tuple[_Job[Any, Any], bool, Any]]) -> None:
        for job, ok, value in results:
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
