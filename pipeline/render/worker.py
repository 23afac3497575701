"""Render worker process for the Redis job backend.

``python -m pipeline.render.worker [--config FILE] [--redis URL] [--concurrency N]
[--run module.path:function] [--prefix P] [--grace S] [--heartbeat-timeout S]``

Takes jobs from the queue, renders them (``ClipRenderer.render`` by default) into the cache
folder (cache.dir, which the API must see too) and writes state and progress back. The
first SIGTERM or SIGINT stops taking jobs and lets running ones finish for ``--grace``
seconds; after that (or on a second signal) they are stopped and put back in the queue.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from common.errors import AvatarServerError
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import Outcome, ProgressThrottle, RunFn, execute, worker_name
from pipeline.render.redis_schema import (
    HEARTBEAT_TIMEOUT_S,
    LUA_SCRIPTS,
    WORKER_LOST_ERROR,
    WORKER_SEEN_S,
    RedisKeys,
    encode_fields,
    expire_ms,
    redact_url,
)
from pipeline.render.spec import RenderSpec

logger = logging.getLogger("pipeline.render.worker")  # also when run as __main__

POLL_S = 0.2  # a running job's heartbeat and cancel check
IDLE_WAIT_S = 1.0  # an idle worker looks at the queue at least this often
FINAL_WRITE_TRIES = 5


class RedisWorker:
    """One worker loop (blocking; run :meth:`serve` in its own thread). ``worker_id`` goes
    into the state of every job it runs; ``heartbeat_timeout_s`` is the limit it applies
    when it checks other workers' running jobs."""

    def __init__(
        self,
        url: str,
        cache: RenderCache,
        run: RunFn,
        *,
        worker_id: str,
        prefix: str = "avatar:jobs",
        keep_finished_s: float = 3600.0,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> None:
        import redis

        self.worker_id = worker_id
        self._cache = cache
        self._run = run
        self._keys = RedisKeys(prefix)
        self._keep_finished_s = keep_finished_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._poll_s = poll_s
        self._redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self._scripts = {name: self._redis.register_script(s) for name, s in LUA_SCRIPTS.items()}
        self._me = json.dumps(worker_id)

    def serve(self, stop: threading.Event, abort: threading.Event) -> None:
        """Run jobs until ``stop`` is set. ``abort`` stops a running job, which goes back to
        the queue."""
        from redis.exceptions import RedisError

        pubsub: Any = None
        next_sweep = 0.0
        try:
            while not stop.is_set():
                try:
                    if pubsub is None:
                        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self._keys.submitted)
                    if time.monotonic() >= next_sweep:
                        self._sweep()
                        next_sweep = time.monotonic() + max(1.0, self._heartbeat_timeout_s / 4)
                    claimed = self._scripts["claim"](
                        keys=[self._keys.queue, self._keys.running, self._keys.workers],
                        args=[self._keys.prefix, self.worker_id, self._me,
                              json.dumps(time.time())],
                    )
                    if claimed:
                        self._run_job(str(claimed[0]), str(claimed[1]), abort)
                        continue
                    if pubsub.get_message(timeout=IDLE_WAIT_S) is not None:
                        while pubsub.get_message(timeout=0) is not None:
                            pass
                except RedisError as exc:
                    logger.warning("worker %s: Redis error: %s", self.worker_id, exc)
                    if pubsub is not None:
                        pubsub.close()
                        pubsub = None
                    stop.wait(1.0)
                except Exception:
                    logger.exception("worker %s", self.worker_id)
                    stop.wait(1.0)
        finally:
            if pubsub is not None:
                pubsub.close()
            self._redis.close()

    # ------------------------------------------------------------------ one job

    def _run_job(self, job_id: str, spec_json: str, abort: threading.Event) -> None:
        from redis.exceptions import RedisError

        logger.info("worker %s: job %s", self.worker_id, job_id)
        try:
            spec = RenderSpec.from_dict(json.loads(spec_json))
        except (ValueError, TypeError, AvatarServerError) as exc:
            detail = getattr(exc, "detail", "unreadable render spec")
            self._finish(job_id, Outcome("failed", error={"error": "bad_request",
                                                          "detail": detail}))
            return

        cancel = threading.Event()
        user_cancel = threading.Event()
        taken = threading.Event()  # another instance ended the job (e.g. judged us lost)
        done = threading.Event()

        def monitor() -> None:
            while not done.wait(self._poll_s):
                if abort.is_set():
                    cancel.set()
                try:
                    mine, asked = self._scripts["beat"](
                        keys=[self._keys.job(job_id), self._keys.hb(job_id), self._keys.workers],
                        args=[self._me, self.worker_id],
                    )
                except RedisError as exc:
                    logger.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)
                    continue
                if int(asked):
                    user_cancel.set()
                    cancel.set()
                if not int(mine):
                    taken.set()
                    cancel.set()

        def report(percent: float, stage: str) -> None:
            try:
                if not self._update(job_id, {"percent": percent, "stage": stage}):
                    taken.set()
                    cancel.set()
            except RedisError as exc:
                logger.warning("worker %s: progress not written: %s", self.worker_id, exc)

        watcher = threading.Thread(target=monitor, name=f"{job_id}-heartbeat", daemon=True)
        watcher.start()
        try:
            outcome = execute(self._run, self._cache, spec, ProgressThrottle(report), cancel)
        finally:
            done.set()
            watcher.join()
        if taken.is_set():
            logger.warning("worker %s: job %s was ended elsewhere", self.worker_id, job_id)
            return
        if outcome.status == "cancelled" and abort.is_set() and not user_cancel.is_set():
            if self._requeue(job_id):
                logger.info("worker %s: job %s back in the queue", self.worker_id, job_id)
                return
        self._finish(job_id, outcome)

    def _update(self, job_id: str, values: dict[str, object], *, final: bool = False) -> bool:
        applied = self._scripts["update"](
            keys=[self._keys.job(job_id), self._keys.running, self._keys.hb(job_id)],
            args=[self._me, expire_ms(self._keep_finished_s) if final else 0,
                  self._keys.events(job_id), job_id, *encode_fields(values)],
        )
        return bool(applied)

    def _finish(self, job_id: str, outcome: Outcome) -> None:
        from redis.exceptions import RedisError

        values: dict[str, object] = {
            "status": outcome.status, "stage": outcome.status, "finished": time.time(),
            "error": outcome.error, "result": outcome.result,
        }
        if outcome.status == "done":
            values["percent"] = 100.0
        for attempt in range(FINAL_WRITE_TRIES):
            try:
                if self._update(job_id, values, final=True):
                    logger.info("worker %s: job %s %s", self.worker_id, job_id, outcome.status)
                else:
                    logger.warning("worker %s: job %s was ended elsewhere", self.worker_id,
                                   job_id)
                return
            except RedisError as exc:
                logger.warning("worker %s: final state of %s not written (%d): %s",
                               self.worker_id, job_id, attempt + 1, exc)
                time.sleep(0.5 * (attempt + 1))

    def _requeue(self, job_id: str) -> bool:
        from redis.exceptions import RedisError

        keys = self._keys
        try:
            return bool(self._scripts["requeue"](
                keys=[keys.job(job_id), keys.queue, keys.running, keys.hb(job_id)],
                args=[self._me, keys.events(job_id), job_id, keys.submitted],
            ))
        except RedisError as exc:
            logger.warning("worker %s: job %s not requeued: %s", self.worker_id, job_id, exc)
            return False

    def _sweep(self) -> None:
        keys = self._keys
        *_counts, lost = self._scripts["sweep"](
            keys=[keys.running, keys.workers, keys.queue],
            args=[keys.prefix, self._heartbeat_timeout_s, json.dumps(time.time()),
                  expire_ms(self._keep_finished_s), json.dumps(WORKER_LOST_ERROR),
                  WORKER_SEEN_S],
        )
        for job_id in lost:
            logger.warning("render job %s: its worker stopped responding", job_id)


# ---------------------------------------------------------------------------- entry point


def load_run(dotted: str) -> RunFn:
    """The function named "module.path:function"; ValueError when there is none."""
    module_name, _, attr = dotted.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--run wants module.path:function, not {dotted!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--run {dotted}: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"--run {dotted} is not callable")
    run: RunFn = obj
    return run


def main(argv: list[str] | None = None) -> int:
    from config import ConfigError, load_settings
    from pipeline.render.jobs import create_cache

    parser = argparse.ArgumentParser(prog="python -m pipeline.render.worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a YAML file overriding config/defaults.yaml")
    parser.add_argument("--redis", help="Redis URL (default jobs.redis_url)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs at a time (1..64)")
    parser.add_argument("--run", help="render function module.path:function (default: "
                                      "ClipRenderer.from_settings(settings).render)")
    parser.add_argument("--prefix", default="avatar:jobs", help="Redis key prefix")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds a running job may finish after SIGTERM (default 10)")
    parser.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                        help="fail other workers' jobs after this long without a heartbeat")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 64:
        parser.error("--concurrency must be from 1 to 64")
    if args.grace < 0 or args.heartbeat_timeout <= 0:
        parser.error("--grace must be >= 0 and --heartbeat-timeout > 0")
    try:
        settings = load_settings(config_file=args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    url = args.redis or settings.jobs.redis_url
    try:
        if args.run:
            run = load_run(args.run)
        else:
            from pipeline.render.core import ClipRenderer

            run = ClipRenderer.from_settings(settings).render
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except AvatarServerError as exc:
        print(f"start-up failed: {exc.detail}", file=sys.stderr)
        return 1

    import redis
    from redis.exceptions import RedisError

    try:
        redis.Redis.from_url(url).ping()
    except (RedisError, ValueError) as exc:
        print(f"cannot reach Redis at {redact_url(url)}: {exc}", file=sys.stderr)
        return 1

    cache = create_cache(settings)
    stop, abort = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            abort.set()
            return
        logger.info("signal %d: finishing running jobs (%.0f s at most)", signum, args.grace)
        stop.set()
        timer = threading.Timer(args.grace, abort.set)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [
        RedisWorker(url, cache, run, worker_id=worker_name(n), prefix=args.prefix,
                    keep_finished_s=settings.jobs.keep_finished_s,
                    heartbeat_timeout_s=args.heartbeat_timeout)
        for n in range(args.concurrency)
    ]
    threads = [
        threading.Thread(target=w.serve, args=(stop, abort), name=w.worker_id)
        for w in workers
    ]
    for thread in threads:
        thread.start()
    print(f"render worker {', '.join(w.worker_id for w in workers)} on {redact_url(url)} "
          f"(prefix {args.prefix})", flush=True)
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.2)  # short joins let the main thread take signals
    return 0


if __name__ == "__main__":
    sys.exit(main())
