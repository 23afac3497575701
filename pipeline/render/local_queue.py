"""The in-process job queue: a bounded priority queue run by worker threads of this process;
job state lives in memory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import NotFound, ServerFull
from media_tracks.priority import RENDER_JOB_NICE, background_thread
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import (
    CANCEL_WAIT_S,
    JobState,
    Outcome,
    ProgressThrottle,
    QueueFull,
    RunFn,
    check_submission,
    execute,
    new_job_id,
    worker_name,
)
from pipeline.render.spec import RenderSpec

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------- local backend


@dataclass(slots=True)
class _LocalJob:
    state: JobState
    spec: RenderSpec
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    watchers: set[asyncio.Event] = dataclasses.field(default_factory=set)

    def notify(self) -> None:
        for event in self.watchers:
            event.set()


class LocalJobQueue:
    """Jobs run by ``workers`` threads of this process; state lives in memory.

    ``clock`` gives Unix time s for the job times and for forgetting finished jobs after
    ``keep_finished_s`` (checked on every call)."""

    backend = "local"

    def __init__(
        self,
        run: RunFn,
        cache: RenderCache,
        *,
        workers: int,
        max_queue: int,
        keep_finished_s: float,
        cancel_wait_s: float = CANCEL_WAIT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if workers < 1:
            raise ValueError("the local job queue needs at least one worker")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._run = run
        self._cache = cache
        self._workers = workers
        self._max_queue = max_queue
        self._keep_finished_s = keep_finished_s
        self._cancel_wait_s = cancel_wait_s
        self._clock = clock
        self._jobs: dict[str, _LocalJob] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._seq = itertools.count()
        self._queued = 0
        self._running = 0
        self._finished: deque[tuple[float, str]] = deque()
        self._ready = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._mean_run_s = 10.0

    async def start(self) -> None:
        if self._tasks:
            return
        # clips wait for calls: render jobs run below even the calls' own video work
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="render-job",
                                            initializer=background_thread,
                                            initargs=(RENDER_JOB_NICE,))
        self._tasks = [
            asyncio.create_task(self._work(worker_name(n)), name=f"render-worker-{n}")
            for n in range(self._workers)
        ]

    async def aclose(self) -> None:
        """Cancel queued and running jobs and stop the workers (running renders get a few
        seconds to stop and clean up)."""
        self._closed = True
        now = self._clock()
        for job in self._jobs.values():
            if job.state.status == "queued":
                self._end(job, Outcome("cancelled"), now)
            elif job.state.status == "running":
                job.cancel.set()
        async with self._ready:
            self._ready.notify_all()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=self._cancel_wait_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks = []
        for job in self._jobs.values():
            if job.state.status == "running":  # a render ignoring its cancel event
                self._running -= 1
                self._end(job, Outcome("cancelled"), self._clock())
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, spec: RenderSpec, *, priority: int = 0) -> JobState:
        check_submission(spec, priority)
        self._forget_old()
        if self._closed:
            raise ServerFull("the render queue is shutting down", retry_after_s=5)
        if self._queued >= self._max_queue:
            retry = max(1, min(60, math.ceil(self._mean_run_s / self._workers)))
            raise QueueFull(
                f"{self._queued} render jobs are already waiting; try again later",
                retry_after_s=retry,
            )
        state = JobState(
            id=new_job_id(), status="queued", priority=priority, spec=spec.to_dict(),
            created=self._clock(),
        )
        self._jobs[state.id] = _LocalJob(state=state, spec=spec)
        heapq.heappush(self._heap, (-priority, next(self._seq), state.id))
        self._queued += 1
        async with self._ready:
            self._ready.notify()
        return dataclasses.replace(state)

    async def get(self, job_id: str) -> JobState | None:
        self._forget_old()
        job = self._jobs.get(job_id)
        return None if job is None else dataclasses.replace(job.state)

    async def cancel(self, job_id: str) -> JobState | None:
        self._forget_old()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.state.status == "queued":
            self._end(job, Outcome("cancelled"), self._clock())
        elif job.state.status == "running":
            job.cancel.set()
            return await self.wait(job_id, self._cancel_wait_s)
        return dataclasses.replace(job.state)

    async def subscribe(self, job_id: str) -> AsyncGenerator[JobState, None]:
        job = self._job(job_id)
        changed = asyncio.Event()
        job.watchers.add(changed)
        try:
            last: JobState | None = None
            while True:
                state = dataclasses.replace(job.state)
                if state != last:
                    yield state
                    last = state
                if state.terminal:
                    return
                await changed.wait()
                changed.clear()
        finally:
            job.watchers.discard(changed)

    async def wait(self, job_id: str, timeout: float) -> JobState:  # noqa: ASYNC109 - see JobQueue
        job = self._job(job_id)
        changed = asyncio.Event()
        job.watchers.add(changed)
        try:
            async with asyncio.timeout(timeout):
                while not job.state.terminal:
                    await changed.wait()
                    changed.clear()
        except TimeoutError:
            pass
        finally:
            job.watchers.discard(changed)
        return dataclasses.replace(job.state)

    def stats(self) -> dict[str, object]:
        self._forget_old()
        return {
            "backend": self.backend,
            "queued": self._queued,
            "running": self._running,
            "workers": self._workers,
            "max_queue": self._max_queue,
        }

    # ------------------------------------------------------------------ internals

    def _job(self, job_id: str) -> _LocalJob:
        self._forget_old()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no render job {job_id!r}")
        return job

    def _forget_old(self) -> None:
        horizon = self._clock() - self._keep_finished_s
        while self._finished and self._finished[0][0] <= horizon:
            _t, job_id = self._finished.popleft()
            self._jobs.pop(job_id, None)

    async def _next(self) -> _LocalJob | None:
        async with self._ready:
            while True:
                if self._closed:
                    return None
                while self._heap:
                    _p, _s, job_id = heapq.heappop(self._heap)
                    job = self._jobs.get(job_id)
                    if job is not None and job.state.status == "queued":
                        return job
                await self._ready.wait()

    async def _work(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        while (job := await self._next()) is not None:
            self._queued -= 1
            self._running += 1
            state = job.state
            state.status, state.started, state.worker = "running", self._clock(), name
            state.stage = "starting"
            job.notify()

            def report(percent: float, stage: str, job: _LocalJob = job) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self._progress, job, percent, stage)

            t0 = time.monotonic()
            try:
                outcome = await loop.run_in_executor(
                    self._executor, execute, self._run, self._cache, job.spec,
                    ProgressThrottle(report), job.cancel,
                )
            except Exception:  # execute() catches render errors; this is a bug
                logger.exception("render worker %s", name)
                outcome = Outcome("failed", error={"error": "render_failed",
                                                   "detail": "the render failed"})
            finally:
                self._running -= 1
            self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * (time.monotonic() - t0)
            self._end(job, outcome, self._clock())

    def _progress(self, job: _LocalJob, percent: float, stage: str) -> None:
        if job.state.status == "running":
            job.state.percent, job.state.stage = percent, stage
            job.notify()

    def _end(self, job: _LocalJob, outcome: Outcome, now: float) -> None:
        state = job.state
        if state.status == "queued":
            self._queued -= 1
        state.status, state.finished, state.stage = outcome.status, now, outcome.status
        state.result, state.error = outcome.result, outcome.error
        if outcome.status == "done":
            state.percent = 100.0
        self._finished.append((now, state.id))
        job.notify()



