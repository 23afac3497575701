"""Choosing the job queue the settings describe (the backends' plugin factory)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipeline.render.cache import RenderCache
from pipeline.render.jobs import JobQueue, RunFn
from pipeline.render.local_queue import LocalJobQueue
from pipeline.render.redis_queue import RedisJobQueue

if TYPE_CHECKING:
    from config.settings import Settings

logger = logging.getLogger(__name__)


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

