"""The Redis job queue: state in Redis/Valkey, shared by the API and by worker processes
(``python -m pipeline.render.worker``), surviving a restart of the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from common.errors import NotFound, PipelineError
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import (
    CANCEL_WAIT_S,
    JobState,
    QueueFull,
    RunFn,
    check_submission,
    new_job_id,
    valid_job_id,
    worker_name,
)
from pipeline.render.redis_schema import (
    HEARTBEAT_TIMEOUT_S,
    LUA_SCRIPTS,
    WORKER_LOST_ERROR,
    WORKER_SEEN_S,
    RedisKeys,
    decode_state,
    encode_fields,
    expire_ms,
    redact_url,
)
from pipeline.render.spec import RenderSpec

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)



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


