"""The application's own Prometheus registry and the counters HTTP answers and session events
feed (``rtc_server.observability`` serves them)."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import re
import threading
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from media_tracks.frames import ProducerStats
from media_tracks.tracks import TrackStats

logger = logging.getLogger(__name__)

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
LABEL_RE = re.compile(r"[a-z0-9_]{1,48}")
MAX_ERROR_BODY = 65536


def _label(value: object, default: str) -> str:
    """A bounded label value: a short snake_case word from the code, else ``default``."""
    text = str(value).lower() if value is not None else ""
    return text if LABEL_RE.fullmatch(text) else default


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
class SessionStats:
    """The stats objects of a session the metrics have seen (not the session: it may go)."""

    video: TrackStats
    frames: ProducerStats


@dataclass(slots=True)
class FrameTotals:
    sent: int = 0
    repeated: int = 0
    skipped: int = 0
    late: int = 0

    def add(self, s: SessionStats) -> None:
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
    seen: dict[str, SessionStats] = field(default_factory=dict)
    closed_totals: FrameTotals = field(default_factory=FrameTotals)
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
    lipsync_switches: Counter = field(init=False)
    turn_ends: Counter = field(init=False)
    offers_refused_overload: Counter = field(init=False)

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
        self.lipsync_switches = Counter(
            "avatar_lipsync_switches", "Calls whose lip-sync engine missed its frame deadlines "
            "and handed the rest of an utterance to the fallback (degraded), or took it back "
            "(restored).", ["direction"], registry=reg)
        for direction in ("degraded", "restored"):
            self.lipsync_switches.labels(direction)
        self.offers_refused_overload = Counter(
            "avatar_offers_refused_overload", "Offers refused (503) because the measured "
            "headroom could not carry one more call, by reason (deadlines, cpu).", ["reason"],
            registry=reg)
        for reason in ("deadlines", "cpu"):
            self.offers_refused_overload.labels(reason)
        self.turn_ends = Counter(
            "avatar_turn_ends", "Turns by what ended the person's speech: short, long, fixed "
            "or model (pipeline.turns); joined counts early cut-ins answered as one turn.",
            ["rule"], registry=reg)
        for rule in ("short", "long", "fixed", "model", "joined"):
            self.turn_ends.labels(rule)
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
            stats = SessionStats(session.video_track.stats, session.frames.stats)
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
            rule = event.get("end_rule")
            if rule in ("short", "long", "fixed", "model"):
                self.turn_ends.labels(rule).inc()
            if event.get("joined") == 1.0:
                self.turn_ends.labels("joined").inc()
        elif kind == "error":
            fatal = "true" if event.get("fatal") is True else "false"
            self.session_errors.labels(_label(event.get("stage"), "session"), fatal).inc()
        elif kind == "lipsync":
            self.lipsync_switches.labels(
                "degraded" if event.get("degraded") is True else "restored").inc()

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


def _route_of(request: web.Request) -> str:
    """The matched route's canonical path (``/sessions/{session_id}``), never the raw path."""
    match_info = request.match_info
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return UNMATCHED_ROUTE
    return str(resource.canonical)


def error_code(response: web.StreamResponse) -> str | None:
    """The ``error`` field of a JSON error answer, if it has one."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, bytes | bytearray) or len(body) > MAX_ERROR_BODY:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None
