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
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from media_tracks.tracks import TrackStats, av_offset_ms

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# the per-turn latencies a session's {"type": "metrics"} event carries, as "<stage>_ms"
STAGES = (
    "vad_end",
    "stt",
    "llm_first_token",
    "tts_first_audio",
    "lipsync_first_frame",
    "voice_to_voice",
)
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
)
HTTP_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
UNMATCHED_ROUTE = "<unmatched>"
SESSION_LABEL_CHARS = 8
_LABEL_RE = re.compile(r"[a-z0-9_]{1,48}")
_MAX_ERROR_BODY = 65536


def _label(value: object, default: str) -> str:
    """A bounded label value: a short snake_case word from the code, else ``default``."""
    text = str(value).lower() if value is not None else ""
    return text if _LABEL_RE.fullmatch(text) else default


@functools.lru_cache(maxsize=1)
def server_version() -> str:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("avatar-rtc")
    try:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


@dataclass(slots=True)
class _SessionStats:
    """The stats objects of a session the metrics have seen (not the session: it may go)."""

    video: TrackStats
    frames: Any  # media_tracks.frames.ProducerStats


@dataclass(slots=True)
class _FrameTotals:
    sent: int = 0
    repeated: int = 0
    skipped: int = 0
    late: int = 0

    def add(self, s: _SessionStats) -> None:
        self.sent += s.video.frames_sent
        self.repeated += s.video.frames_repeated
        self.skipped += s.video.frames_skipped
        self.late += s.frames.late


@dataclass(slots=True)
class Observability:
    """One application's metrics registry and what its collectors read."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    started_monotonic: float = field(default_factory=time.monotonic)
    process: psutil.Process = field(default_factory=psutil.Process)
    # sessions seen by the event hook or a scrape: their counts join the totals once closed
    seen: dict[str, _SessionStats] = field(default_factory=dict)
    closed_totals: _FrameTotals = field(default_factory=_FrameTotals)
    # filled before each scrape, off the event loop where slow (the cache scans its folder)
    cache_stats: dict[str, object] = field(default_factory=dict)
    jobs_stats: dict[str, object] = field(default_factory=dict)
    _psutil_lock: threading.Lock = field(default_factory=threading.Lock)
    http_requests: Counter = field(init=False)
    http_seconds: Histogram = field(init=False)
    http_errors: Counter = field(init=False)
    http_client_errors: Counter = field(init=False)
    http_server_errors: Counter = field(init=False)
    stage_seconds: Histogram = field(init=False)
    turns: Counter = field(init=False)
    session_errors: Counter = field(init=False)

    def __post_init__(self) -> None:
        reg = self.registry
        self.http_requests = Counter(
            "avatar_http_requests", "HTTP requests answered, by route (canonical path), "
            "method and status.", ["route", "method", "status"], registry=reg)
        self.http_seconds = Histogram(
            "avatar_http_request_duration_seconds", "Time to answer an HTTP request, by route.",
            ["route", "method"], buckets=HTTP_BUCKETS_S, registry=reg)
        self.http_errors = Counter(
            "avatar_http_errors", "HTTP answers with status >= 400, by status and the JSON "
            "body's error code.", ["status", "error"], registry=reg)
        self.http_client_errors = Counter(
            "avatar_http_client_errors", "HTTP answers 4xx: the request was refused (bad "
            "input, limits, access; 499: the client hung up).", registry=reg)
        self.http_server_errors = Counter(
            "avatar_http_server_errors", "HTTP answers 5xx: the server failed or was full.",
            registry=reg)
        self.stage_seconds = Histogram(
            "avatar_stage_latency_seconds", "Per-turn latency of each conversation stage: "
            "vad_end (speech end to turn end), stt, llm_first_token, tts_first_audio, "
            "lipsync_first_frame, voice_to_voice.", ["stage"], buckets=LATENCY_BUCKETS_S,
            registry=reg)
        self.turns = Counter(
            "avatar_turns", "Conversation turns that reached playout, by source (voice, chat).",
            ["source"], registry=reg)
        self.session_errors = Counter(
            "avatar_session_errors", "Error events sent to clients, by stage and fatality.",
            ["stage", "fatal"], registry=reg)
        for stage in STAGES:  # every stage is listed from the first scrape, at 0
            self.stage_seconds.labels(stage)
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)

    # --- sessions -------------------------------------------------------------------------
    def track_session(self, session: Any) -> None:
        """Remember ``session``'s stats objects (idempotent)."""
        sid = getattr(session, "id", None)
        if not isinstance(sid, str) or sid in self.seen:
            return
        try:
            stats = _SessionStats(session.video_track.stats, session.frames.stats)
        except AttributeError:
            return
        self.seen[sid] = stats

    def fold_closed(self, live_ids: Iterable[str]) -> None:
        """Move the final counts of sessions no longer live into the totals."""
        live = set(live_ids)
        for sid in [s for s in self.seen if s not in live]:
            self.closed_totals.add(self.seen.pop(sid))

    # --- events ---------------------------------------------------------------------------
    def observe_event(self, event: dict[str, object]) -> None:
        kind = event.get("type")
        if kind == "metrics":
            for stage in STAGES:
                value = event.get(f"{stage}_ms")
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if math.isfinite(value) and value >= 0:
                    self.stage_seconds.labels(stage).observe(value / 1000.0)
            self.turns.labels(_label(event.get("source"), "other")).inc()
        elif kind == "error":
            fatal = "true" if event.get("fatal") is True else "false"
            self.session_errors.labels(_label(event.get("stage"), "session"), fatal).inc()

    def observe_http(
        self, request: web.Request, status: int, seconds: float, error: str | None
    ) -> None:
        route = _route_of(request)
        method = request.method if request.method in _METHODS else "OTHER"
        self.http_requests.labels(route, method, str(status)).inc()
        if status != 101:  # a WebSocket's time is the connection's life, not an answer's
            self.http_seconds.labels(route, method).observe(seconds)
        if status >= 400:
            self.http_errors.labels(str(status), _label(error, "other")).inc()
            (self.http_server_errors if status >= 500 else self.http_client_errors).inc()


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OBSERVABILITY = web.AppKey("observability", Observability)


def _route_of(request: web.Request) -> str:
    """The matched route's canonical path (``/sessions/{session_id}``), never the raw path."""
    match_info = request.match_info
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return UNMATCHED_ROUTE
    return str(resource.canonical)


def _error_code(response: web.StreamResponse) -> str | None:
    """The ``error`` field of a JSON error answer, if it has one."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, bytes | bytearray) or len(body) > _MAX_ERROR_BODY:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every answer (the outermost middleware: error answers included)."""
    obs = request.app.get(OBSERVABILITY)
    if obs is None:
        return await handler(request)
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
    error = _error_code(response) if response.status >= 400 else None
    obs.observe_http(request, response.status, time.perf_counter() - started, error)
    return response


def session_event_hook(app: web.Application) -> Callable[[Any, dict[str, object]], None]:
    """Called with (session, event) for every event a session sends to its client."""

    def hook(session: Any, event: dict[str, object]) -> None:
        obs = app.get(OBSERVABILITY)
        if obs is None:
            return
        try:
            sid = getattr(session, "id", None)
            live = _sessions(app)
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
def _keys() -> Any:
    from rtc_server import app as app_module  # the app module imports this one

    return app_module


def _sessions(app: web.Application) -> dict[str, Any]:
    sessions = app.get(_keys().SESSIONS)
    return sessions if isinstance(sessions, dict) else {}


def _pool_stats(pool: object) -> dict[str, int] | None:
    """Workers and pending (submitted, not started) work of a ThreadPoolExecutor."""
    if not isinstance(pool, ThreadPoolExecutor):
        return None
    queue = getattr(pool, "_work_queue", None)
    return {
        "workers": int(getattr(pool, "_max_workers", 0)),
        "pending": int(queue.qsize()) if queue is not None else 0,
    }


def _lipsync_queue_depth(engine: object) -> int:
    """Frames waiting for the lip-sync engine's batching worker (0 without one)."""
    worker = getattr(engine, "worker", None)
    depth = getattr(worker, "queue_depth", 0)
    return int(depth) if isinstance(depth, int) else 0


def _say_queue(session: Any) -> int:
    says = getattr(session, "_says", None)  # Session's bounded queue of say messages
    return says.qsize() if isinstance(says, asyncio.Queue) else 0


class _AppCollector:
    """Reads one application's live state at scrape time."""

    def __init__(self, app: web.Application, obs: Observability) -> None:
        self._app = app
        self._obs = obs

    def collect(self) -> Iterator[Metric]:
        app, obs = self._app, self._obs
        keys = _keys()
        sessions = list(_sessions(app).values())
        for s in sessions:
            obs.track_session(s)
        obs.fold_closed(s.id for s in sessions)
        settings = app.get(keys.SETTINGS)

        live = GaugeMetricFamily("avatar_sessions_live", "Sessions (calls) open now.")
        live.add_metric([], len(sessions))
        yield live
        if settings is not None:
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
            totals.add(_SessionStats(vs, ps))
            ahead.add_metric([label], s.frames.queued)
            says.add_metric([label], _say_queue(s))
        yield from (fps, offset, frames, ahead, says)
        all_frames = CounterMetricFamily(
            "avatar_video_frames", "Video frames of all sessions since start, closed ones "
            "included, by outcome (sent, repeated, skipped, late).", labels=["outcome"])
        for outcome in ("sent", "repeated", "skipped", "late"):
            all_frames.add_metric([outcome], getattr(totals, outcome))
        yield all_frames

        lipsync = GaugeMetricFamily(
            "avatar_lipsync_queue_depth", "Frames waiting for the lip-sync batching worker.")
        lipsync.add_metric([], _lipsync_queue_depth(app.get(keys.LIPSYNC)))
        yield lipsync
        pool = _pool_stats(app.get(keys.RENDER_POOL))
        if pool is not None:
            pending = GaugeMetricFamily(
                "avatar_render_pool_pending", "Frame renders and model calls waiting for a "
                "thread of the session render pool.")
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
                value = jobs.get(state)
                if isinstance(value, int):
                    queue.add_metric([state], value)
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


async def refresh_snapshots(app: web.Application) -> None:
    """Render cache and job queue figures for the next scrape (the cache scan off the loop)."""
    from rtc_server.render_api import RENDER_SERVICE

    obs = app[OBSERVABILITY]
    svc = app.get(RENDER_SERVICE)
    if svc is None:
        return
    try:
        obs.jobs_stats = dict(svc.jobs.stats())
        loop = asyncio.get_running_loop()
        obs.cache_stats = dict(await loop.run_in_executor(None, svc.cache.stats))
    except Exception:  # noqa: BLE001 - a scrape must answer with what it has
        logger.exception("metrics: render cache or job figures unavailable")


# --- routes ---------------------------------------------------------------------------------
async def handle_health(request: web.Request) -> web.Response:
    from rtc_server.app import GOVERNOR, LIPSYNC, SESSIONS, SETTINGS, STT

    governor = request.app.get(GOVERNOR)
    return web.json_response(
        {
            "status": "ok",
            "sessions": len(request.app[SESSIONS]),
            "lipsync": request.app[LIPSYNC].info(),
            "listening": request.app[STT] is not None,
            "replier": "embedded" if request.app[SETTINGS].llm.base_url is None else "openai",
            # audio first: the event loop's smoothed lag and the video stride it set
            "load": None if governor is None else governor.info(),
        }
    )


def readiness(app: web.Application) -> dict[str, bool]:
    """Each check's state; never raises (keys are missing while the app starts)."""
    keys = _keys()
    from rtc_server.render_api import RENDER_SERVICE

    settings = app.get(keys.SETTINGS)
    checks: dict[str, bool] = {}
    draining = app.get(keys.DRAINING)
    checks["accepting"] = not (isinstance(draining, asyncio.Event) and draining.is_set())
    library = app.get(keys.AVATARS)
    loaded = library.loaded_ids() if library is not None else []
    checks["default_avatar"] = settings is not None and settings.avatars.default in loaded
    checks["tts"] = app.get(keys.TTS) is not None
    checks["lipsync"] = app.get(keys.LIPSYNC) is not None
    if settings is not None and settings.conversation.listen:
        stt = app.get(keys.STT)
        checks["stt"] = stt is not None and bool(getattr(stt, "loaded", True))
        checks["vad"] = app.get(keys.VAD) is not None
    checks["render"] = app.get(RENDER_SERVICE) is not None
    return checks


async def handle_ready(request: web.Request) -> web.Response:
    try:
        checks = readiness(request.app)
    except Exception:  # noqa: BLE001 - a readiness probe answers, whatever happens
        logger.exception("readiness check failed")
        checks = {"readiness_check": False}
    ready = all(checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    obs = request.app[OBSERVABILITY]
    await refresh_snapshots(request.app)
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


def _tts_info(tts: object, settings: Any) -> dict[str, object] | None:
    if tts is None:
        return None
    info = getattr(tts, "info", None)
    if callable(info):
        out = info()
        if isinstance(out, dict):
            return out
    return {
        "engine": settings.engines.tts if settings is not None else None,
        "implementation": type(tts).__name__,
        "voice": getattr(tts, "voice_name", None),
        "sample_rate": getattr(tts, "sample_rate", None),
        "speed": getattr(tts, "speed", None),
    }


async def handle_health_detailed(request: web.Request) -> web.Response:
    from rtc_server.render_api import RENDER_SERVICE

    app = request.app
    keys = _keys()
    obs = app[OBSERVABILITY]
    settings = app.get(keys.SETTINGS)
    loop = asyncio.get_running_loop()
    process, system = await loop.run_in_executor(None, _process_figures, obs)
    process["asyncio_tasks"] = len(asyncio.all_tasks())
    process = {k: process[k] for k in
               ("pid", "rss_bytes", "cpu_percent", "threads", "asyncio_tasks", "open_fds")}
    engine = app.get(keys.LIPSYNC)
    stt = app.get(keys.STT)
    stt_info = stt.info() if stt is not None and callable(getattr(stt, "info", None)) else None
    svc = app.get(RENDER_SERVICE)
    pools: dict[str, object] = {
        "render": _pool_stats(app.get(keys.RENDER_POOL)),
        "jobs": dict(svc.jobs.stats()) if svc is not None else None,
        "lipsync_queue_depth": _lipsync_queue_depth(engine),
    }
    draining = app.get(keys.DRAINING)
    status = "draining" if isinstance(draining, asyncio.Event) and draining.is_set() else "ok"
    return web.json_response(
        {
            "status": status,
            "uptime_s": round(time.monotonic() - obs.started_monotonic, 3),
            "version": server_version(),
            "process": process,
            "system": system,
            "lipsync": engine.info() if engine is not None else None,
            "stt": stt_info,
            "tts": _tts_info(app.get(keys.TTS), settings),
            "pools": pools,
            "sessions": {
                "live": len(_sessions(app)),
                "max": settings.sessions.max_concurrent if settings is not None else None,
            },
            # loaded avatars against avatars.memory_budget_mb; those calls hold
            "avatars": library.stats() if (library := app.get(keys.AVATARS)) else None,
        }
    )


def add_observability_routes(app: web.Application) -> None:
    obs = Observability()
    obs.registry.register(_AppCollector(app, obs))
    obs.process.cpu_percent(interval=None)  # the first reading is a baseline
    app[OBSERVABILITY] = obs
    app.router.add_get("/health", handle_health)
    app.router.add_get("/health/detailed", handle_health_detailed)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/metrics", handle_metrics)
