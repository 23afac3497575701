"""Health, readiness and metrics routes, and the hooks that feed the metrics.

- ``GET /health``: liveness (public).
- ``GET /ready``: 200 ``{"ready": true, "checks": {...}}`` once the default avatar, the voice,
  the lip-sync engine, Whisper and the VAD (when listening) and the render service are loaded;
  503 with the failing checks, and 503 while the server drains (public).
- ``GET /metrics``: Prometheus text from a registry of this application's own (admin).
- ``GET /health/detailed``: process, system, engines, pools and sessions as JSON (admin).

The metrics come from three places: ``http_metrics_middleware`` (the outermost middleware: every
final answer, error answers included), ``session_event_hook`` (the events each session sends
its client: per-turn latencies and errors), and a collector that reads the live sessions, the
queues and the render cache at scrape time (so a closed session's series disappear with it)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from media_tracks.tracks import av_offset_ms
from pipeline.lipsync import LipSyncEngine
from rtc_server.metrics import (
    SESSION_LABEL_CHARS,
    STAGES,
    Observability,
    SessionStats,
    error_code,
    server_version,
)
from rtc_server.services import SERVICES, Services, services_of

__all__ = ["STAGES", "add_observability_routes", "http_metrics_middleware", "readiness",
           "session_event_hook"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every answer (the outermost middleware: error answers included)."""
    services = request.app.get(SERVICES)
    if services is None:
        return await handler(request)
    obs = services.observability
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and the like pass the errors middleware
        obs.observe_http(request, exc.status, time.perf_counter() - started, None)
        raise
    except asyncio.CancelledError:
        raise
    except Exception:
        obs.observe_http(request, 500, time.perf_counter() - started, "internal_error")
        raise
    error = error_code(response) if response.status >= 400 else None
    obs.observe_http(request, response.status, time.perf_counter() - started, error)
    return response


def session_event_hook(services: Services) -> Callable[[Any, dict[str, object]], None]:
    """Called with (session, event) for every event a session sends to its client."""
    obs = services.observability

    def hook(session: Any, event: dict[str, object]) -> None:
        try:
            sid = getattr(session, "id", None)
            live = services.sessions
            # only a live session is tracked: one already folded into the totals (an event
            # sent while it closed) must not be counted twice
            if isinstance(sid, str) and sid not in obs.seen and live.get(sid) is session:
                obs.fold_closed(live)
                obs.track_session(session)
            obs.observe_event(event)
        except Exception:  # noqa: BLE001 - metrics must never break a session
            logger.exception("metrics: session event not counted")

    return hook


# --- what the collector reads ---------------------------------------------------------------
def _lipsync_queue_depth(engine: LipSyncEngine) -> int:
    """Frames waiting for the lip-sync engine's batching worker (0 without one)."""
    depth = engine.info().get("queue_depth", 0)
    return depth if isinstance(depth, int) else 0


class _AppCollector:
    """Reads one application's live state at scrape time."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        services = self._services
        obs = services.observability
        sessions = list(services.sessions.values())
        for s in sessions:
            obs.track_session(s)
        obs.fold_closed(s.id for s in sessions)
        settings = services.settings

        live = GaugeMetricFamily("avatar_sessions_live", "Sessions (calls) open now.")
        live.add_metric([], len(sessions))
        yield live
        limit = GaugeMetricFamily("avatar_sessions_max", "sessions.max_concurrent.")
        limit.add_metric([], settings.sessions.max_concurrent)
        yield limit

        fps = GaugeMetricFamily(
            "avatar_session_fps_sent", "Frames a second handed to the WebRTC stack over the "
            "last 2 s, per session (first 8 hex digits of its id) and track.",
            labels=["session", "track"])
        offset = GaugeMetricFamily(
            "avatar_session_av_offset_ms", "Smoothed video hand-over lateness minus audio "
            "hand-over lateness relative to the session's media clock (ms; > 0: video behind).",
            labels=["session"])
        frames = CounterMetricFamily(
            "avatar_session_video_frames", "Video frames of a live session: sent, repeated "
            "(not ready in time), skipped (track behind the clock), late (rendered too late).",
            labels=["session", "outcome"])
        ahead = GaugeMetricFamily(
            "avatar_session_frames_ahead", "Video frames rendered ahead or rendering.",
            labels=["session"])
        says = GaugeMetricFamily(
            "avatar_session_say_queue", "Say messages waiting in a session.", labels=["session"])
        totals = dataclasses.replace(obs.closed_totals)
        for s in sessions:
            label = str(s.id)[:SESSION_LABEL_CHARS]
            video, audio = s.video_track, s.audio_track
            fps.add_metric([label, "video"], video.recent_fps())
            fps.add_metric([label, "audio"], audio.recent_fps())
            delta = av_offset_ms(video.stats, audio.stats)
            if delta is not None:
                offset.add_metric([label], delta)
            vs, ps = video.stats, s.frames.stats
            for outcome, value in (("sent", vs.frames_sent), ("repeated", vs.frames_repeated),
                                   ("skipped", vs.frames_skipped), ("late", ps.late)):
                frames.add_metric([label, outcome], value)
            totals.add(SessionStats(vs, ps))
            ahead.add_metric([label], s.frames.queued)
            says.add_metric([label], s.pending_says)
        yield from (fps, offset, frames, ahead, says)
        all_frames = CounterMetricFamily(
            "avatar_video_frames", "Video frames of all sessions since start, closed ones "
            "included, by outcome (sent, repeated, skipped, late).", labels=["outcome"])
        for outcome in ("sent", "repeated", "skipped", "late"):
            all_frames.add_metric([outcome], getattr(totals, outcome))
        yield all_frames

        room = headroom_figures(services)
        for name, key, doc in (
            ("avatar_headroom_calls", "calls_more", "More calls the measured headroom carries "
             "(absent before a call has been measured)."),
            ("avatar_headroom_busy_cores", "busy_cores", "Busy cores of the machine over the "
             "last 3 s."),
            ("avatar_headroom_call_cores", "call_cores", "CPU a call is taken to cost (cores): "
             "sessions.call_cpu_cores or the measured CPU per live call, the larger."),
            ("avatar_headroom_missed_share", "missed_share", "Share of the live calls' video "
             "frames missed (repeated, skipped, shed) over the last 3 s."),
        ):
            figure = room.get(key)
            if isinstance(figure, int | float) and not isinstance(figure, bool):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(figure))
                yield gauge

        lipsync = GaugeMetricFamily(
            "avatar_lipsync_queue_depth", "Frames waiting for the lip-sync batching worker.")
        loaded = services.loaded
        lipsync.add_metric([], 0 if loaded is None else _lipsync_queue_depth(loaded.lipsync))
        yield lipsync
        if loaded is not None:
            pool = loaded.pool.stats()
            pending = GaugeMetricFamily(
                "avatar_render_pool_pending", "Render jobs (a frame, or a call's frames of one "
                "group) and model calls waiting for a thread of the session render pool.")
            pending.add_metric([], pool["pending"])
            workers = GaugeMetricFamily(
                "avatar_render_pool_workers", "Threads of the session render pool.")
            workers.add_metric([], pool["workers"])
            yield from (pending, workers)

        jobs = obs.jobs_stats
        if jobs:
            queue = GaugeMetricFamily(
                "avatar_render_jobs", "Render jobs (POST /v1/render) by state.",
                labels=["state"])
            for state in ("queued", "running"):
                count = jobs.get(state)
                if isinstance(count, int):
                    queue.add_metric([state], count)
            yield queue
        cache = obs.cache_stats
        if cache:
            for name, key, doc in (
                ("avatar_render_cache_hits", "hits", "Render cache lookups answered."),
                ("avatar_render_cache_misses", "misses", "Render cache lookups not answered."),
            ):
                counter = CounterMetricFamily(name, doc)
                counter.add_metric([], float(cache.get(key, 0)))  # type: ignore[arg-type]
                yield counter
            for name, key, doc in (
                ("avatar_render_cache_entries", "entries", "Results in the render cache."),
                ("avatar_render_cache_bytes", "bytes", "Bytes in the render cache."),
            ):
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(cache.get(key, 0)))  # type: ignore[arg-type]
                yield gauge


async def refresh_snapshots(services: Services) -> None:
    """Render cache and job queue figures for the next scrape (the cache scan off the loop)."""
    obs = services.observability
    if services.loaded is None:
        return
    svc = services.loaded.render
    try:
        obs.jobs_stats = dict(svc.jobs.stats())
        loop = asyncio.get_running_loop()
        obs.cache_stats = dict(await loop.run_in_executor(None, svc.cache.stats))
    except Exception:  # noqa: BLE001 - a scrape must answer with what it has
        logger.exception("metrics: render cache or job figures unavailable")


# --- routes ---------------------------------------------------------------------------------
async def handle_health(request: web.Request) -> web.Response:
    services = services_of(request)
    engines = services.engines
    governor = engines.governor
    return web.json_response(
        {
            "status": "ok",
            "sessions": len(services.sessions),
            "lipsync": engines.lipsync.info(),
            "listening": engines.stt is not None,
            "replier": "embedded" if services.settings.llm.base_url is None else "openai",
            # audio first: the event loop's smoothed lag and the video stride it set
            "load": None if governor is None else governor.info(),
        }
    )


def readiness(app: web.Application) -> dict[str, bool]:
    """Each check's state; never raises (all but ``accepting`` fail until start-up is done)."""
    services = app.get(SERVICES)
    draining = services is not None and services.draining.is_set()
    checks: dict[str, bool] = {"accepting": not draining}
    loaded = services.loaded if services is not None else None
    settings = services.settings if services is not None else None
    checks["default_avatar"] = (loaded is not None and settings is not None
                                and settings.avatars.default in loaded.library.loaded_ids())
    checks["tts"] = loaded is not None
    checks["lipsync"] = loaded is not None
    if settings is not None and settings.conversation.listen:
        checks["stt"] = loaded is not None and loaded.stt is not None and loaded.stt.loaded
        checks["vad"] = loaded is not None and loaded.vad is not None
    checks["render"] = loaded is not None
    if services is not None:
        slots = services.slots
        # an offer now would be refused for want of headroom (rtc_server.headroom)
        checks["headroom"] = services.headroom.refusal(
            live=slots.taken - slots.pending, pending=slots.pending) is None
    return checks


def headroom_figures(services: Services) -> dict[str, object]:
    slots = services.slots
    return {"enabled": services.headroom.enabled,
            **services.headroom.reading(pending=slots.pending)}


async def handle_ready(request: web.Request) -> web.Response:
    try:
        checks = readiness(request.app)
    except Exception:  # noqa: BLE001 - a readiness probe answers, whatever happens
        logger.exception("readiness check failed")
        checks = {"readiness_check": False}
    ready = all(checks.values())
    body: dict[str, object] = {"ready": ready, "checks": checks}
    services = request.app.get(SERVICES)
    if services is not None:
        body["headroom"] = headroom_figures(services)
    return web.json_response(body, status=200 if ready else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    services = services_of(request)
    obs = services.observability
    await refresh_snapshots(services)
    body = generate_latest(obs.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _process_figures(obs: Observability) -> tuple[dict[str, object], dict[str, object]]:
    """(process, system) figures from psutil (blocking: /proc reads; run in an executor)."""
    proc = obs.process
    with obs._psutil_lock, proc.oneshot():
        rss = proc.memory_info().rss
        cpu = proc.cpu_percent(interval=None)  # since the previous call: never blocks
        threads = proc.num_threads()
        try:
            fds: int | None = proc.num_fds()
        except (AttributeError, psutil.Error):
            fds = None
    vm = psutil.virtual_memory()
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    process = {"pid": proc.pid, "rss_bytes": rss, "cpu_percent": cpu, "threads": threads,
               "open_fds": fds}
    system = {"cpus": psutil.cpu_count() or os.cpu_count(), "memory_total_bytes": vm.total,
              "memory_available_bytes": vm.available, "load_avg": load}
    return process, system


def _tts_info(tts: object, settings: Any) -> dict[str, object]:
    info = getattr(tts, "info", None)  # optional in the TextToSpeech protocol
    if callable(info):
        out = info()
        if isinstance(out, dict):
            return out
    return {
        "engine": settings.engines.tts,
        "implementation": type(tts).__name__,
        "voice": getattr(tts, "voice_name", None),
        "sample_rate": getattr(tts, "sample_rate", None),
        "speed": getattr(tts, "speed", None),
    }


async def handle_health_detailed(request: web.Request) -> web.Response:
    services = services_of(request)
    engines = services.engines
    obs = services.observability
    settings = services.settings
    loop = asyncio.get_running_loop()
    process, system = await loop.run_in_executor(None, _process_figures, obs)
    process["asyncio_tasks"] = len(asyncio.all_tasks())
    process = {k: process[k] for k in
               ("pid", "rss_bytes", "cpu_percent", "threads", "asyncio_tasks", "open_fds")}
    pools: dict[str, object] = {
        "render": engines.pool.stats(),
        "jobs": dict(engines.render.jobs.stats()),
        "lipsync_queue_depth": _lipsync_queue_depth(engines.lipsync),
    }
    return web.json_response(
        {
            "status": "draining" if services.draining.is_set() else "ok",
            "uptime_s": round(time.monotonic() - obs.started_monotonic, 3),
            "version": server_version(),
            "process": process,
            "system": system,
            "lipsync": engines.lipsync.info(),
            "stt": engines.stt.info() if engines.stt is not None else None,
            "tts": _tts_info(engines.tts, settings),
            "pools": pools,
            "sessions": {"live": len(services.sessions),
                         "max": settings.sessions.max_concurrent},
            # loaded avatars against avatars.memory_budget_mb; those calls hold
            "avatars": engines.library.stats(),
        }
    )


def add_observability_routes(app: web.Application, services: Services) -> None:
    obs = services.observability
    obs.registry.register(_AppCollector(services))
    obs.process.cpu_percent(interval=None)  # the first reading is a baseline
    app.router.add_get("/health", handle_health)
    app.router.add_get("/health/detailed", handle_health_detailed)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/metrics", handle_metrics)
