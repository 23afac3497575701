"""Render jobs: a bounded priority queue of ``RenderSpec`` jobs with progress and cancel.

Two backends behind ``JobQueue``: ``LocalJobQueue`` (worker threads in this process, state in
memory) and ``RedisJobQueue`` (state in Redis/Valkey, shared by worker processes,
``python -m pipeline.render.worker``, and surviving a restart of the API). Both run a job the
same way (:func:`execute`): render into a cache staging folder in a worker thread, then move
the folder into the cache under the spec's key, so a finished job's result is a cache entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

from common.errors import AvatarServerError, BadRequest, NotFound, PipelineError, ServerFull
from media_tracks.priority import RENDER_JOB_NICE, background_thread
from pipeline.render.cache import RenderCache, check_key
from pipeline.render.spec import RenderSpec

if TYPE_CHECKING:
    from config.settings import Settings

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
PROGRESS_INTERVAL_S = 0.1  # progress reaches subscribers at most ~10 times a second
CANCEL_WAIT_S = 10.0  # cancel() of a running job waits this long for the worker to stop
_JOB_ID_RE = re.compile(r"job_[0-9a-f]{16}")

Progress = Callable[[float, str], None]
RunFn = Callable[[RenderSpec, Path, Progress, threading.Event], dict[str, object]]


@dataclass(slots=True)
class JobState:
    """One job. spec: ``RenderSpec.to_dict()``; percent: 0..100; stage: what runs now;
    created/started/finished: Unix time s; error: {"error": code, "detail": text} when
    failed; result: the cache entry's manifest plus "cache_key" when done; worker: the id
    of the worker that took it."""

    id: str
    status: JobStatus
    priority: int
    spec: dict[str, object]
    created: float
    started: float | None = None
    finished: float | None = None
    percent: float = 0.0
    stage: str = "queued"
    error: dict[str, str] | None = None
    result: dict[str, object] | None = None
    worker: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobState:
        """The state from ``to_dict()`` output; unknown keys are ignored."""
        status = d.get("status")
        if status not in get_args(JobStatus):
            raise ValueError(f"job status {status!r} is not one of {get_args(JobStatus)}")
        return cls(
            id=str(d["id"]),
            status=cast(JobStatus, status),
            priority=int(d.get("priority") or 0),
            spec=dict(d.get("spec") or {}),
            created=float(d.get("created") or 0.0),
            started=None if d.get("started") is None else float(d["started"]),
            finished=None if d.get("finished") is None else float(d["finished"]),
            percent=float(d.get("percent") or 0.0),
            stage=str(d.get("stage") or status),
            error=None if d.get("error") is None else dict(d["error"]),
            result=None if d.get("result") is None else dict(d["result"]),
            worker=None if d.get("worker") is None else str(d["worker"]),
        )


class QueueFull(ServerFull):
    """Too many jobs are waiting: answer 429 with Retry-After."""

    status = 429
    code = "queue_full"


class JobQueue(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def submit(self, spec: RenderSpec, *, priority: int = 0) -> JobState:
        """Queue a job (higher priority runs first, FIFO within one); QueueFull when full."""
        ...

    async def get(self, job_id: str) -> JobState | None: ...

    async def cancel(self, job_id: str) -> JobState | None:
        """Queued: cancelled at once. Running: stops the render and waits (about 10 s at
        most) until its staging folder is gone. Finished: unchanged. None if unknown."""
        ...

    def subscribe(self, job_id: str) -> AsyncIterator[JobState]:
        """The current state, then every change (progress at most ~10/s), ending after a
        terminal state. Raises NotFound for an unknown job."""
        ...

    async def wait(self, job_id: str, timeout: float) -> JobState:  # noqa: ASYNC109 - see JobQueue
        """The terminal state, or the current one after ``timeout`` s; NotFound if unknown.
        (A timeout argument, not asyncio.timeout around the call: a timeout is an answer.)"""
        ...

    def stats(self) -> dict[str, object]:
        """{backend, queued, running, workers, max_queue}."""
        ...


# ---------------------------------------------------------------------------- running a job


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: status done, failed or cancelled, with result or error."""

    status: JobStatus
    result: dict[str, object] | None = None
    error: dict[str, str] | None = None


def is_cancellation(exc: BaseException) -> bool:
    """True for pipeline.render.core.RenderCancelled (or any class of that name)."""
    return any(c.__name__ == "RenderCancelled" for c in type(exc).__mro__)


def execute(
    run: RunFn, cache: RenderCache, spec: RenderSpec, progress: Progress, cancel: threading.Event
) -> Outcome:
    """Run one job (blocking: call it in a worker thread). Renders into a new staging folder
    and puts it into the cache under ``spec.cache_key``; the staging folder never outlives a
    cancel or a failure. A result already cached is returned without rendering."""
    cached = cache.peek(spec.cache_key)
    if cached is not None:
        progress(100.0, "cached")
        return Outcome("done", result={**cached.manifest, "cache_key": cached.key})
    staging: Path | None = None
    try:
        staging = cache.staging_dir()
        manifest = run(spec, staging, progress, cancel)
        if cancel.is_set():
            cache.discard(staging)
            return Outcome("cancelled")
        entry = cache.put(spec.cache_key, staging, manifest)
    except Exception as exc:
        if staging is not None:
            cache.discard(staging)
        if cancel.is_set() or is_cancellation(exc):
            return Outcome("cancelled")
        if isinstance(exc, AvatarServerError):
            return Outcome("failed", error={"error": exc.code, "detail": exc.detail})
        logger.exception("render job for %s failed", spec.cache_key[:12])
        detail = f"the render failed ({type(exc).__name__}); the server log has the details"
        return Outcome("failed", error={"error": "render_failed", "detail": detail})
    return Outcome("done", result={**entry.manifest, "cache_key": entry.key})


class ProgressThrottle:
    """Passes progress on at most every ``interval_s``, and always on a stage change or at
    100 %. percent is clamped to 0..100. Thread-safe."""

    def __init__(
        self,
        emit: Progress,
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_t = -math.inf
        self._last_stage: str | None = None

    def __call__(self, percent: float, stage: str) -> None:
        percent = min(100.0, max(0.0, float(percent))) if math.isfinite(percent) else 0.0
        with self._lock:
            now = self._clock()
            if (stage == self._last_stage and percent < 100.0
                    and now - self._last_t < self._interval_s):
                return
            self._last_t, self._last_stage = now, stage
        self._emit(percent, stage)


def new_job_id() -> str:
    return "job_" + secrets.token_hex(8)


def valid_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and _JOB_ID_RE.fullmatch(job_id) is not None


def check_submission(spec: RenderSpec, priority: int) -> None:
    """BadRequest for a priority out of range; ValueError for a malformed cache key."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequest("priority must be an integer")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}")
    check_key(spec.cache_key)


def worker_name(n: int) -> str:
    """hostname-pid-n"""
    return f"{socket.gethostname()}-{os.getpid()}-{n}"


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



# ---------------------------------------------------------------------------- redis backend
#
# Keys under ``prefix`` (one Redis/Valkey node; the scripts build job keys from ids):
#   <p>:job:<id>     hash, one JSON value per JobState field, plus "qmember" (the job's member
#                    in the queue) and "cancel" ("1" once a cancel is asked for); expires
#                    keep_finished_s after the job ends
#   <p>:queue        sorted set of queued jobs: score -priority, member "<seq:020d>:<id>", so
#                    equal scores pop in submission order
#   <p>:seq          submission counter
#   <p>:running      set of running job ids
#   <p>:hb:<id>      Redis server time of the last heartbeat of a running job's worker
#   <p>:workers      sorted set of worker ids by Redis server time last seen
#   <p>:events:<id>  channel: a message on every state change of the job
#   <p>:submitted    channel: a message on every submission (wakes idle workers)
# Times compared with each other (heartbeats) all come from the Redis server's clock.

_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local now_s = string.format('%.6f', now)
"""

LUA_SCRIPTS: dict[str, str] = {
    # KEYS: queue, seq, job. ARGV: max_queue, score, id, submitted channel, field, value...
    "submit": """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[2])
local member = string.format('%020d:%s', seq, ARGV[3])
redis.call('HSET', KEYS[3], 'qmember', member, unpack(ARGV, 5))
redis.call('ZADD', KEYS[1], ARGV[2], member)
redis.call('PUBLISH', ARGV[4], ARGV[3])
return seq
""",
    # KEYS: queue, running, workers. ARGV: prefix, worker id, worker JSON, started JSON.
    # Returns {id, spec JSON} of the job now running, or nil.
    "claim": _LUA_NOW + """
redis.call('ZADD', KEYS[3], now_s, ARGV[2])
while true do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then return false end
  local id = string.sub(popped[1], 22)
  local job = ARGV[1] .. ':job:' .. id
  if redis.call('HGET', job, 'status') == '"queued"' then
    redis.call('HSET', job, 'status', '"running"', 'started', ARGV[4], 'worker', ARGV[3],
               'stage', '"starting"', 'percent', '0.0')
    redis.call('HDEL', job, 'cancel')
    redis.call('SET', ARGV[1] .. ':hb:' .. id, now_s)
    redis.call('SADD', KEYS[2], id)
    redis.call('PUBLISH', ARGV[1] .. ':events:' .. id, 'running')
    return {id, redis.call('HGET', job, 'spec')}
  end
end
""",
    # KEYS: workers. ARGV: worker id.
    "seen": _LUA_NOW + """
redis.call('ZADD', KEYS[1], now_s, ARGV[1])
return 1
""",
    # KEYS: job, hb, workers. ARGV: worker JSON, worker id. Returns {still mine, cancel asked}.
    "beat": _LUA_NOW + """
redis.call('ZADD', KEYS[3], now_s, ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return {0, 0}
end
redis.call('SET', KEYS[2], now_s)
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {1, 1} end
return {1, 0}
""",
    # KEYS: job, running, hb. ARGV: worker JSON, expire ms (0 = still running), events
    # channel, id, field, value... Applies only while the job runs on this worker.
    "update": """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[4])
  redis.call('DEL', KEYS[3])
end
redis.call('PUBLISH', ARGV[3], 'changed')
return 1
""",
    # KEYS: job, queue, running, hb. ARGV: worker JSON, events channel, id, submitted
    # channel. Puts a job this worker gives up (shutdown) back at its place in the queue;
    # 0 when it is not this worker's or a cancel was asked for.
    "requeue": """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"'
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'cancel') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', '"queued"', 'stage', '"queued"', 'percent', '0.0',
           'started', 'null', 'worker', 'null')
local priority = tonumber(redis.call('HGET', KEYS[1], 'priority'))
redis.call('ZADD', KEYS[2], -priority, redis.call('HGET', KEYS[1], 'qmember'))
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', ARGV[2], 'changed')
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
""",
    # KEYS: job, queue. ARGV: events channel, finished JSON, expire ms.
    # Returns 'cancelled' (was queued), 'running' (cancel flag set), 'ended' or nil.
    "cancel": """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == '"queued"' then
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'qmember'))
  redis.call('HSET', KEYS[1], 'status', '"cancelled"', 'stage', '"cancelled"',
             'finished', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PUBLISH', ARGV[1], 'changed')
  return 'cancelled'
elseif status == '"running"' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', ARGV[1], 'cancel')
  return 'running'
end
return 'ended'
""",
    # KEYS: running, workers, queue. ARGV: prefix, heartbeat timeout s, finished JSON,
    # expire ms, error JSON, worker liveness window s. Fails running jobs whose worker
    # stopped beating; returns {queued, running, live workers, {lost ids}}.
    "sweep": _LUA_NOW + """
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local job = ARGV[1] .. ':job:' .. id
  if redis.call('HGET', job, 'status') ~= '"running"' then
    redis.call('SREM', KEYS[1], id)
  else
    local hb = redis.call('GET', ARGV[1] .. ':hb:' .. id)
    if (not hb) or now - tonumber(hb) > tonumber(ARGV[2]) then
      redis.call('HSET', job, 'status', '"failed"', 'stage', '"failed"', 'finished', ARGV[3],
                 'error', ARGV[5])
      redis.call('PEXPIRE', job, ARGV[4])
      redis.call('SREM', KEYS[1], id)
      redis.call('DEL', ARGV[1] .. ':hb:' .. id)
      redis.call('PUBLISH', ARGV[1] .. ':events:' .. id, 'changed')
      table.insert(lost, id)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.6f', now - tonumber(ARGV[6])))
return {redis.call('ZCARD', KEYS[3]), redis.call('SCARD', KEYS[1]),
        redis.call('ZCARD', KEYS[2]), lost}
""",
}

HEARTBEAT_TIMEOUT_S = 30.0
WORKER_SEEN_S = 5.0  # a worker not heard from for this long no longer counts in stats()
WORKER_LOST_ERROR = {
    "error": "worker_lost",
    "detail": "the worker running this job stopped responding; submit it again",
}


class RedisKeys:
    """Key and channel names under one prefix (see the table above)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}:queue"
        self.seq = f"{prefix}:seq"
        self.running = f"{prefix}:running"
        self.workers = f"{prefix}:workers"
        self.submitted = f"{prefix}:submitted"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def hb(self, job_id: str) -> str:
        return f"{self.prefix}:hb:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"


def encode_fields(values: Mapping[str, object]) -> list[str]:
    """Flat [field, JSON value, ...] for HSET."""
    out: list[str] = []
    for name, value in values.items():
        out += [name, json.dumps(value)]
    return out


def decode_state(fields: Mapping[str, str]) -> JobState | None:
    """The JobState of a job hash (None for a missing or unreadable one)."""
    if not fields or "status" not in fields:
        return None
    try:
        values = {
            f.name: json.loads(fields[f.name])
            for f in dataclasses.fields(JobState)
            if f.name in fields
        }
        return JobState.from_dict(values)
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable job record %s", fields.get("id"))
        return None


def expire_ms(keep_finished_s: float) -> int:
    return max(1, math.ceil(keep_finished_s * 1000))


def redact_url(url: str) -> str:
    """The URL without a password, for messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


class RedisJobQueue:
    """Jobs in Redis/Valkey at ``url``, shared by every queue and worker on ``prefix``.

    This object submits, reads, cancels and watches jobs (``redis.asyncio``); jobs run in
    worker processes (``python -m pipeline.render.worker``) and, when ``run`` is given and
    ``workers`` > 0, also in that many threads here. Any instance fails a running job whose
    worker sent no heartbeat for ``heartbeat_timeout_s`` (error "worker_lost"); the check
    runs every quarter of that (at most once a second), and ``stats()`` returns the counts
    seen then. ``poll_s``: how often ``subscribe`` re-reads a job without a message."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        cache: RenderCache,
        *,
        max_queue: int,
        keep_finished_s: float,
        run: RunFn | None = None,
        workers: int = 0,
        prefix: str = "avatar:jobs",
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        poll_s: float = 0.5,
        cancel_wait_s: float = CANCEL_WAIT_S,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if workers > 0 and run is None:
            raise ValueError("in-process workers need a run function")
        self._url = url
        self._cache = cache
        self._max_queue = max_queue
        self._keep_finished_s = keep_finished_s
        self._run = run
        self._workers = workers
        self._keys = RedisKeys(prefix)
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._sweep_s = max(0.05, min(1.0, heartbeat_timeout_s / 4))
        self._poll_s = poll_s
        self._cancel_wait_s = cancel_wait_s
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._counts = {"queued": 0, "running": 0, "workers": 0}

    async def start(self) -> None:
        if self._redis is not None:
            return
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        client: Any = aioredis.from_url(self._url, decode_responses=True)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise PipelineError(
                f"cannot reach Redis at {redact_url(self._url)} (jobs.redis_url): {exc}"
            ) from exc
        self._redis = client
        self._scripts = {name: client.register_script(src) for name, src in LUA_SCRIPTS.items()}
        await self._sweep()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="render-job-sweeper")
        if self._run is not None and self._workers > 0:
            from pipeline.render.worker import RedisWorker

            for n in range(self._workers):
                worker = RedisWorker(
                    self._url, self._cache, self._run, worker_id=worker_name(n),
                    prefix=self._keys.prefix, keep_finished_s=self._keep_finished_s,
                    heartbeat_timeout_s=self._heartbeat_timeout_s,
                )
                thread = threading.Thread(
                    target=worker.serve, args=(self._stop, self._abort),
                    name=f"render-redis-worker-{n}", daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    async def aclose(self) -> None:
        """Stop this instance's workers (their running jobs go back to the queue) and
        disconnect. Jobs stay in Redis."""
        self._stop.set()
        self._abort.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, self._cancel_wait_s)
        self._threads = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def submit(self, spec: RenderSpec, *, priority: int = 0) -> JobState:
        check_submission(spec, priority)
        state = JobState(
            id=new_job_id(), status="queued", priority=priority, spec=spec.to_dict(),
            created=time.time(),
        )
        keys = self._keys
        seq = await self._scripts["submit"](
            keys=[keys.queue, keys.seq, keys.job(state.id)],
            args=[self._max_queue, -priority, state.id, keys.submitted,
                  *encode_fields(state.to_dict())],
        )
        if not seq:
            raise QueueFull(
                f"{self._max_queue} render jobs are already waiting; try again later",
                retry_after_s=5,
            )
        self._counts["queued"] += 1
        return state

    async def get(self, job_id: str) -> JobState | None:
        if not valid_job_id(job_id):
            return None
        return decode_state(await self._redis.hgetall(self._keys.job(job_id)))

    async def cancel(self, job_id: str) -> JobState | None:
        if not valid_job_id(job_id):
            return None
        outcome = await self._scripts["cancel"](
            keys=[self._keys.job(job_id), self._keys.queue],
            args=[self._keys.events(job_id), json.dumps(time.time()),
                  expire_ms(self._keep_finished_s)],
        )
        if outcome is None:
            return None
        if outcome == "running":
            with contextlib.suppress(NotFound):
                return await self.wait(job_id, self._cancel_wait_s)
        return await self.get(job_id)

    async def subscribe(self, job_id: str) -> AsyncGenerator[JobState, None]:
        from redis.exceptions import RedisError

        if not valid_job_id(job_id):
            raise NotFound(f"no render job {job_id!r}")
        pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._keys.events(job_id))
        except RedisError:
            logger.warning("job events: pub/sub unavailable, polling", exc_info=True)
            await pubsub.aclose()
            pubsub = None
        try:
            last: JobState | None = None
            while True:
                state = await self.get(job_id)
                if state is None:
                    if last is None:
                        raise NotFound(f"no render job {job_id!r}")
                    return  # forgotten meanwhile
                if state != last:
                    yield state
                    last = state
                if state.terminal:
                    return
                if pubsub is None:
                    await asyncio.sleep(self._poll_s)
                    continue
                try:
                    if await pubsub.get_message(timeout=self._poll_s) is not None:
                        while await pubsub.get_message(timeout=0) is not None:
                            pass  # one re-read covers every message that came meanwhile
                except RedisError:
                    logger.warning("job events: pub/sub lost, polling", exc_info=True)
                    await pubsub.aclose()
                    pubsub = None
        finally:
            if pubsub is not None:
                await pubsub.aclose()

    async def wait(self, job_id: str, timeout: float) -> JobState:  # noqa: ASYNC109 - see JobQueue
        last: JobState | None = None
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self.subscribe(job_id)) as states:
                    async for state in states:
                        last = state
        except TimeoutError:
            pass
        current = await self.get(job_id)
        if current is not None:
            return current
        if last is None:
            raise NotFound(f"no render job {job_id!r}")
        return last

    def stats(self) -> dict[str, object]:
        return {"backend": self.backend, **self._counts, "max_queue": self._max_queue}

    async def _sweep(self) -> list[str]:
        keys = self._keys
        queued, running, workers, lost = await self._scripts["sweep"](
            keys=[keys.running, keys.workers, keys.queue],
            args=[keys.prefix, self._heartbeat_timeout_s, json.dumps(time.time()),
                  expire_ms(self._keep_finished_s), json.dumps(WORKER_LOST_ERROR),
                  WORKER_SEEN_S],
        )
        self._counts = {"queued": int(queued), "running": int(running), "workers": int(workers)}
        for job_id in lost:
            logger.warning("render job %s: its worker stopped responding", job_id)
        return [str(j) for j in lost]

    async def _sweep_loop(self) -> None:
        from redis.exceptions import RedisError

        while True:
            await asyncio.sleep(self._sweep_s)
            try:
                await self._sweep()
            except RedisError as exc:
                logger.warning("render jobs: Redis check failed: %s", exc)


# ---------------------------------------------------------------------------- factories


def cache_root(settings: Settings) -> Path:
    """cache.dir, or <avatars.data_dir>/cache when unset."""
    if settings.cache.dir:
        return Path(settings.cache.dir)
    return settings.avatars.data_path / "cache"


def create_cache(settings: Settings) -> RenderCache:
    """The RenderCache the settings describe."""
    return RenderCache(
        cache_root(settings), max_bytes=settings.cache.max_bytes, ttl_s=settings.cache.ttl_s
    )


def create_job_queue(settings: Settings, cache: RenderCache, run: RunFn | None) -> JobQueue:
    """The queue of settings.jobs (not started). The local backend needs ``run`` and runs at
    least one worker; with Redis, ``run`` = None leaves all work to worker processes."""
    jobs = settings.jobs
    if jobs.backend == "redis":
        return RedisJobQueue(
            jobs.redis_url, cache, max_queue=jobs.max_queue,
            keep_finished_s=jobs.keep_finished_s, run=run,
            workers=jobs.workers if run is not None else 0,
        )
    if run is None:
        raise ValueError("the local job backend needs a run function")
    if jobs.workers < 1:
        logger.warning("jobs.workers is 0 with the local backend: running 1 worker")
    return LocalJobQueue(
        run, cache, workers=max(1, jobs.workers), max_queue=jobs.max_queue,
        keep_finished_s=jobs.keep_finished_s,
    )
