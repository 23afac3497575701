"""Render jobs: their state, the queue interface and how a job runs.

Two backends implement ``JobQueue``: ``LocalJobQueue`` (``local_queue``: worker threads in this
process, state in memory) and ``RedisJobQueue`` (``redis_queue``: state in Redis/Valkey, shared
by worker processes, ``python -m pipeline.render.worker``, surviving a restart of the API);
``queues.create_job_queue`` picks one. Both run a job the same way (:func:`execute`): render
into a cache staging folder in a worker thread, then move the folder into the cache under the
spec's key, so a finished job's result is a cache entry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, get_args

from common.errors import AvatarServerError, BadRequest, ServerFull
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
