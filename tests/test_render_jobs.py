"""Render jobs: the in-process queue and the Redis queue with real worker processes.

The render function is ``tests.fakes.render.fake_run`` (files, progress, cancel; no models).
Redis tests start a real redis-server on 127.0.0.1 (skipped, saying so, without the binary).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from common.errors import BadRequest, NotFound, ServerFull
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import JobQueue, JobState, ProgressThrottle, QueueFull, cache_root
from pipeline.render.local_queue import LocalJobQueue
from pipeline.render.queues import create_job_queue
from pipeline.render.redis_queue import RedisJobQueue
from pipeline.render.spec import RenderSpec
from tests.fakes.clock import FakeClock
from tests.fakes.render import fake_run

ROOT = Path(__file__).resolve().parent.parent
_n = itertools.count()


def spec(text: str = "steps=5", *, key: str | None = None, fmt: str = "mp4") -> RenderSpec:
    """A spec for fake_run; every call gets its own cache key unless ``key`` is given."""
    cache_key = hashlib.sha256((key or f"{text}#{next(_n)}").encode()).hexdigest()
    return RenderSpec(avatar_id="default", text=text, audio_path=None, voice="default",
                      speed=1.0, format=fmt, fps=25, cache_key=cache_key)


def staging_left(cache: RenderCache) -> list[Path]:
    return list((cache.root / "staging").iterdir())


async def until(queue: JobQueue, job_id: str, pred: Callable[[JobState], bool],
                timeout_s: float = 20.0) -> JobState:
    """The first state of the job for which ``pred`` holds (fails after ``timeout_s``)."""
    async with asyncio.timeout(timeout_s):
        async with contextlib.aclosing(queue.subscribe(job_id)) as states:  # type: ignore[type-var]
            async for state in states:
                if pred(state):
                    return state
    raise AssertionError(f"job {job_id} ended without reaching the condition")


def is_rendering(state: JobState) -> bool:
    return state.status == "running" and state.percent > 0




@pytest.fixture
def cache(tmp_path: Path) -> RenderCache:
    return RenderCache(tmp_path / "cache", max_bytes=1 << 30, ttl_s=3600)


@pytest.fixture
async def local(cache: RenderCache) -> AsyncIterator[LocalJobQueue]:
    queue = LocalJobQueue(fake_run, cache, workers=1, max_queue=8, keep_finished_s=60)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.aclose()


# ---------------------------------------------------------------------------- local queue


async def test_progress_events_arrive_in_order_and_end_done(
    local: LocalJobQueue, cache: RenderCache
) -> None:
    job = await local.submit(spec("steps=15 step_s=0.02"))
    assert job.status == "queued" and job.id.startswith("job_")

    states = [s async for s in local.subscribe(job.id)]

    assert states[-1].status == "done"
    assert all(not s.terminal for s in states[:-1])
    order = ["queued", "running", "done"]
    statuses = [order.index(s.status) for s in states]
    assert statuses == sorted(statuses)
    percents = [s.percent for s in states]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert "rendering" in [s.stage for s in states]
    assert len([s for s in states if s.stage == "rendering"]) >= 3

    done = states[-1]
    assert done.started is not None and done.finished is not None
    assert done.created <= done.started <= done.finished
    assert done.worker and done.worker.endswith(f"-{os.getpid()}-0")
    assert done.result is not None and done.error is None
    entry = cache.get(str(done.result["cache_key"]))  # the result is a cache entry
    assert entry is not None
    assert {**entry.manifest, "cache_key": entry.key} == done.result
    assert (entry.path / "video.mp4").stat().st_size == 15 * 256
    assert staging_left(cache) == []
    assert await local.get(job.id) == done


async def test_an_identical_job_is_served_from_the_cache(local: LocalJobQueue) -> None:
    first = await local.wait((await local.submit(spec("steps=8", key="same"))).id, 10)
    second = await local.submit(spec("steps=8", key="same"))
    states = [s async for s in local.subscribe(second.id)]
    assert states[-1].status == "done"
    assert "rendering" not in [s.stage for s in states]
    assert states[-1].result == first.result


async def test_higher_priority_runs_first_fifo_within_one(local: LocalJobQueue) -> None:
    blocker = await local.submit(spec("steps=30 step_s=0.01"))
    await until(local, blocker.id, is_rendering)
    names = [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 2)]
    ids = {name: (await local.submit(spec("steps=2"), priority=p)).id for name, p in names}
    ended = {name: await local.wait(job_id, 20) for name, job_id in ids.items()}
    assert all(s.status == "done" for s in ended.values())
    started = sorted(ended, key=lambda name: ended[name].started or 0)
    assert started == ["high1", "high2", "mid", "low1", "low2"]


async def test_a_full_queue_answers_429_with_retry_after(cache: RenderCache) -> None:
    queue = LocalJobQueue(fake_run, cache, workers=1, max_queue=2, keep_finished_s=60)
    await queue.start()
    try:
        running = await queue.submit(spec("steps=400 step_s=0.01"))
        await until(queue, running.id, is_rendering)
        waiting = [await queue.submit(spec()) for _ in range(2)]  # running jobs do not count
        with pytest.raises(QueueFull) as caught:
            await queue.submit(spec())
        assert caught.value.status == 429 and caught.value.code == "queue_full"
        assert caught.value.retry_after_s >= 1
        assert isinstance(caught.value, ServerFull)
        assert queue.stats() == {"backend": "local", "queued": 2, "running": 1,
                                 "workers": 1, "max_queue": 2}
        await queue.cancel(waiting[0].id)
        await queue.submit(spec())  # a slot is free again
    finally:
        await queue.aclose()
    assert (await queue.get(running.id)).status == "cancelled"  # type: ignore[union-attr]
    assert staging_left(cache) == []


async def test_cancel_a_queued_job(local: LocalJobQueue) -> None:
    blocker = await local.submit(spec("steps=20 step_s=0.01"))
    await until(local, blocker.id, is_rendering)
    queued = await local.submit(spec())
    cancelled = await local.cancel(queued.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.started is None and cancelled.finished is not None
    assert local.stats()["queued"] == 0
    assert (await local.wait(blocker.id, 20)).status == "done"
    after = await local.get(queued.id)
    assert after is not None and after.status == "cancelled" and after.started is None
    again = await local.cancel(queued.id)  # terminal: unchanged
    assert again == after


async def test_cancel_a_running_job_frees_the_worker_and_leaves_no_files(
    local: LocalJobQueue, cache: RenderCache
) -> None:
    long = await local.submit(spec("steps=1000 step_s=0.01"))
    await until(local, long.id, lambda s: s.status == "running" and s.percent > 2)
    [partial] = staging_left(cache)  # the partial render
    assert (partial / "video.mp4").stat().st_size > 0
    following = await local.submit(spec("steps=3"))

    cancelled = await local.cancel(long.id)

    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.result is None and cancelled.error is None
    assert 2 < cancelled.percent < 100
    assert not partial.exists()  # gone by the time cancel() returns
    assert cache.peek(long.spec["cache_key"]) is None  # type: ignore[arg-type]
    done = await local.wait(following.id, 10)
    assert done.status == "done"
    assert done.started is not None and cancelled.finished is not None
    assert done.started >= cancelled.finished
    assert cache.stats()["entries"] == 1
    assert staging_left(cache) == []


@pytest.mark.parametrize(
    ("fail", "code"), [("crash", "render_failed"), ("bad", "bad_request")]
)
async def test_a_failing_render_fails_the_job_cleanly(
    local: LocalJobQueue, cache: RenderCache, fail: str, code: str
) -> None:
    job = await local.submit(spec(f"steps=5 fail={fail}"))
    ended = await local.wait(job.id, 10)
    assert ended.status == "failed" and ended.result is None
    assert ended.error is not None and ended.error["error"] == code
    assert ended.error["detail"]
    assert "/" not in ended.error["detail"] and "secret" not in ended.error["detail"]
    assert staging_left(cache) == [] and cache.stats()["entries"] == 0
    assert (await local.wait((await local.submit(spec("steps=2"))).id, 10)).status == "done"


async def test_finished_jobs_are_forgotten_after_keep_finished_s(cache: RenderCache) -> None:
    clock = FakeClock()
    queue = LocalJobQueue(fake_run, cache, workers=1, max_queue=4, keep_finished_s=60,
                          clock=clock)
    await queue.start()
    try:
        job = await queue.submit(spec())
        assert (await queue.wait(job.id, 10)).status == "done"
        clock.t += 59
        assert await queue.get(job.id) is not None
        clock.t += 2
        assert await queue.get(job.id) is None
        with pytest.raises(NotFound):
            await queue.wait(job.id, 1)
        with pytest.raises(NotFound):
            [s async for s in queue.subscribe(job.id)]
        assert await queue.cancel(job.id) is None
    finally:
        await queue.aclose()


async def test_bad_submissions_are_refused(local: LocalJobQueue) -> None:
    with pytest.raises(BadRequest, match="priority"):
        await local.submit(spec(), priority=5000)
    with pytest.raises(BadRequest, match="priority"):
        await local.submit(spec(), priority=True)
    bad_key = RenderSpec(**{**spec().to_dict(), "cache_key": "../../etc"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sha256"):
        await local.submit(bad_key)
    assert local.stats()["queued"] == 0


async def test_aclose_cancels_queued_and_running_jobs(cache: RenderCache) -> None:
    queue = LocalJobQueue(fake_run, cache, workers=1, max_queue=4, keep_finished_s=60)
    await queue.start()
    running = await queue.submit(spec("steps=1000 step_s=0.01"))
    await until(queue, running.id, is_rendering)
    queued = await queue.submit(spec())
    await queue.aclose()
    assert (await queue.get(running.id)).status == "cancelled"  # type: ignore[union-attr]
    assert (await queue.get(queued.id)).status == "cancelled"  # type: ignore[union-attr]
    assert staging_left(cache) == []
    with pytest.raises(ServerFull):
        await queue.submit(spec())


def test_progress_throttle_passes_stage_changes_and_the_end() -> None:
    t = [0.0]
    seen: list[tuple[float, str]] = []
    throttle = ProgressThrottle(lambda p, s: seen.append((p, s)), interval_s=0.1,
                                clock=lambda: t[0])
    for i in range(10):  # 10 calls within 45 ms: only the first passes
        throttle(i, "rendering")
        t[0] += 0.005
    throttle(50, "encoding")  # a new stage passes
    t[0] += 0.2
    throttle(60, "encoding")  # enough time passed
    throttle(150, "encoding")  # clamped to 100, always passes
    assert seen == [(0.0, "rendering"), (50.0, "encoding"), (60.0, "encoding"),
                    (100.0, "encoding")]


def test_factories_follow_the_settings(tmp_path: Path) -> None:
    from config import load_settings

    settings = load_settings(env={}, overrides={"avatars.data_dir": str(tmp_path / "data")})
    assert cache_root(settings) == tmp_path / "data" / "cache"
    other = load_settings(env={}, overrides={"cache.dir": str(tmp_path / "c")})
    assert cache_root(other) == tmp_path / "c"
    cache = RenderCache(tmp_path / "c", max_bytes=1 << 20, ttl_s=60)
    assert isinstance(create_job_queue(settings, cache, fake_run), LocalJobQueue)
    with pytest.raises(ValueError):
        create_job_queue(settings, cache, None)
    redis_settings = load_settings(env={}, overrides={"jobs.backend": "redis"})
    assert isinstance(create_job_queue(redis_settings, cache, None), RedisJobQueue)


# ---------------------------------------------------------------------------- redis queue


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"test:{request.node.name}"


class Workers:
    """Worker processes (python -m pipeline.render.worker with fake_run) for one test."""

    def __init__(self, url: str, prefix: str, cache: RenderCache, log_dir: Path) -> None:
        self.url, self.prefix, self.cache, self.log_dir = url, prefix, cache, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "AVATAR_CACHE__DIR": str(self.cache.root)}
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.render.worker", "--redis", self.url,
             "--prefix", self.prefix, "--run", "tests.fakes.render:fake_run", *extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def workers(redis_url: str, prefix: str, cache: RenderCache, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(redis_url, prefix, cache, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
async def rq(redis_url: str, prefix: str, cache: RenderCache) -> AsyncIterator[RedisJobQueue]:
    queue = RedisJobQueue(redis_url, cache, max_queue=20, keep_finished_s=60, prefix=prefix,
                          heartbeat_timeout_s=10, poll_s=0.2)
    await queue.start()
    try:
        yield queue
    finally:
        await queue.aclose()


async def live_workers(queue: RedisJobQueue, n: int, timeout_s: float = 30.0) -> None:
    """Wait until ``n`` workers have announced themselves (stats() is a snapshot the queue
    refreshes on its own timer: there is no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while queue.stats()["workers"] != n:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_two_worker_processes_share_one_queue(
    rq: RedisJobQueue, workers: Workers, cache: RenderCache
) -> None:
    procs = [workers.start(), workers.start()]
    await live_workers(rq, 2)
    jobs = [await rq.submit(spec("steps=10 step_s=0.03")) for _ in range(8)]
    ended = [await rq.wait(j.id, 30) for j in jobs]

    assert [s.status for s in ended] == ["done"] * 8
    pids = {int(s.worker.split("-")[-2]) for s in ended if s.worker}
    assert pids == {p.pid for p in procs}
    for state in ended:
        assert state.result is not None
        entry = cache.get(state.result["cache_key"])  # type: ignore[arg-type]
        assert entry is not None and entry.manifest["pid"] in pids
        assert entry.manifest["pid"] == int(state.worker.split("-")[-2])  # type: ignore[union-attr]
    assert staging_left(cache) == []
    assert rq.stats()["backend"] == "redis"


async def test_progress_reaches_a_redis_subscriber_in_order(
    rq: RedisJobQueue, workers: Workers
) -> None:
    workers.start()
    job = await rq.submit(spec("steps=20 step_s=0.03"))
    states = [s async for s in rq.subscribe(job.id)]
    assert states[0].status in ("queued", "running") and states[-1].status == "done"
    percents = [s.percent for s in states]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert len([s for s in states if s.stage == "rendering"]) >= 3
    with pytest.raises(NotFound):
        [s async for s in rq.subscribe("job_0123456789abcdef")]
    assert await rq.get("../etc") is None


async def test_job_state_survives_a_restart_of_the_api_queue(
    redis_url: str, prefix: str, cache: RenderCache, workers: Workers
) -> None:
    first = RedisJobQueue(redis_url, cache, max_queue=5, keep_finished_s=60, prefix=prefix)
    await first.start()
    job = await first.submit(spec("steps=4"), priority=3)
    await first.aclose()

    second = RedisJobQueue(redis_url, cache, max_queue=5, keep_finished_s=60, prefix=prefix)
    await second.start()
    try:
        seen = await second.get(job.id)
        assert seen is not None and seen == job  # still queued, nobody took it
        workers.start()
        done = await second.wait(job.id, 30)
        assert done.status == "done" and done.priority == 3 and done.result is not None
    finally:
        await second.aclose()

    third = RedisJobQueue(redis_url, cache, max_queue=5, keep_finished_s=60, prefix=prefix)
    await third.start()
    try:
        assert await third.get(job.id) == done
    finally:
        await third.aclose()


async def test_redis_priority_order_and_in_process_workers(
    redis_url: str, prefix: str, cache: RenderCache, rq: RedisJobQueue
) -> None:
    names = [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5), ("mid", 2)]
    ids = {name: (await rq.submit(spec("steps=2"), priority=p)).id for name, p in names}
    runner = RedisJobQueue(redis_url, cache, max_queue=5, keep_finished_s=60, prefix=prefix,
                           run=fake_run, workers=1)
    await runner.start()
    try:
        ended = {name: await rq.wait(job_id, 20) for name, job_id in ids.items()}
    finally:
        await runner.aclose()
    assert all(s.status == "done" for s in ended.values())
    assert all(s.worker and f"-{os.getpid()}-0" in s.worker for s in ended.values())
    started = sorted(ended, key=lambda name: ended[name].started or 0)
    assert started == ["high1", "high2", "mid", "low1", "low2"]


async def test_a_full_redis_queue_answers_429(rq: RedisJobQueue, redis_url: str, prefix: str,
                                              cache: RenderCache) -> None:
    small = RedisJobQueue(redis_url, cache, max_queue=2, keep_finished_s=60, prefix=prefix)
    await small.start()
    try:
        a = await small.submit(spec())
        await small.submit(spec())
        with pytest.raises(QueueFull) as caught:
            await small.submit(spec())
        assert caught.value.status == 429 and caught.value.retry_after_s >= 1
        cancelled = await small.cancel(a.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.started is None
        await small.submit(spec())  # the cancelled job left the queue
        assert await small.cancel("job_ffffffffffffffff") is None
    finally:
        await small.aclose()


async def test_cancel_a_running_job_through_redis(
    rq: RedisJobQueue, workers: Workers, cache: RenderCache
) -> None:
    workers.start()
    long = await rq.submit(spec("steps=1000 step_s=0.01"))
    await until(rq, long.id, lambda s: s.status == "running" and s.percent > 2)
    [partial] = staging_left(cache)
    following = await rq.submit(spec("steps=3"))

    cancelled = await rq.cancel(long.id)

    assert cancelled is not None and cancelled.status == "cancelled"
    assert 2 < cancelled.percent < 100
    assert not partial.exists()  # the worker stopped and removed its partial files
    assert cache.peek(long.spec["cache_key"]) is None  # type: ignore[arg-type]
    done = await rq.wait(following.id, 20)
    assert done.status == "done" and done.worker == cancelled.worker
    assert staging_left(cache) == []


async def test_a_killed_worker_fails_its_job_as_worker_lost(
    redis_url: str, prefix: str, cache: RenderCache, workers: Workers
) -> None:
    queue = RedisJobQueue(redis_url, cache, max_queue=5, keep_finished_s=60, prefix=prefix,
                          heartbeat_timeout_s=1.5)
    await queue.start()
    try:
        proc = workers.start()
        job = await queue.submit(spec("steps=2000 step_s=0.01"))
        await until(queue, job.id, is_rendering)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        ended = await queue.wait(job.id, 20)

        assert ended.status == "failed"
        assert ended.error is not None and ended.error["error"] == "worker_lost"
        assert ended.finished is not None
        assert queue.stats()["running"] == 0
    finally:
        await queue.aclose()


async def test_sigterm_puts_the_running_job_back_for_another_worker(
    rq: RedisJobQueue, workers: Workers
) -> None:
    first = workers.start("--grace", "0")
    job = await rq.submit(spec("steps=150 step_s=0.01"))
    taken = await until(rq, job.id, is_rendering)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0

    back = await rq.get(job.id)
    assert back is not None and back.status == "queued" and back.worker is None
    second = workers.start()
    done = await rq.wait(job.id, 30)
    assert done.status == "done"
    assert done.worker != taken.worker and done.worker.endswith(f"-{second.pid}-0")  # type: ignore[union-attr]
