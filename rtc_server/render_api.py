"""The render API: clips and animation timelines from text or audio, as jobs with progress and
a content-addressed cache.

``POST /v1/render``                 JSON ``{avatar_id, text, voice, speed, format, fps, async,
                                    priority}``, or multipart/form-data with the same fields as
                                    parts and the audio file in part ``audio``. Synchronous by
                                    default (200 with the result, 504 with the job after
                                    ``render.sync_timeout_s``); ``"async": true`` answers 202 with
                                    the job id and its status URL. An identical earlier request
                                    is answered from the cache without rendering.
``GET /v1/render/{id}``             the job: status, percent, stage, and the result when done.
``DELETE /v1/render/{id}``          cancel: the worker stops and its partial files are removed.
``GET /v1/results/{key}/{file}``    a result file (video, audio.ogg, audio.wav, timeline.json).
``GET /ws/jobs/{id}``               WebSocket: the job's state (percent, stage) on every change,
                                    closed after the final one.
``GET /cache/stats``, ``DELETE /cache``, ``POST /cache/cleanup``  cache administration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, WSCloseCode, WSMsgType, web

from avatars.model import BUILTIN_ID, DEFAULT_AVATAR_DIR
from avatars.registration import UploadTooLarge
from common.errors import AvatarServerError, BadRequest, NotFound, PipelineError
from common.inputs import as_finite, clean_text, has_speakable, short
from config import Settings
from face.library import AVATAR_ID_RE, AvatarLibrary
from pipeline.lipsync import LipSyncEngine
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import JobQueue, JobState
from pipeline.render.media import decode_audio
from pipeline.render.spec import (
    AUDIO_OGG_FILE,
    AUDIO_WAV_FILE,
    FORMATS,
    MAX_SPEED,
    MIN_SPEED,
    TIMELINE_FILE,
    VIDEO_FILES,
    RenderSpec,
)
from pipeline.tts import TextToSpeech
from rtc_server.access import ACCESS
from rtc_server.avatars_api import Forbidden
from rtc_server.multipart import MALFORMED_MULTIPART, read_part

logger = logging.getLogger(__name__)

RENDER_FORMAT_VERSION = 1  # bump when rendering changes what an identical request produces
RESULT_FILES = {
    VIDEO_FILES["mp4"]: "video/mp4",
    VIDEO_FILES["webm"]: "video/webm",
    AUDIO_OGG_FILE: "audio/ogg",
    AUDIO_WAV_FILE: "audio/wav",
    TIMELINE_FILE: "application/json",
}
FIELDS = ("avatar_id", "text", "voice", "speed", "format", "fps", "async", "priority")
MAX_FIELD_BYTES = 64 * 1024
KEY_LEN = 64
SOCKET_CLOSE_WAIT_S = 10.0  # shutdown waits this long for job sockets to close


class RenderTimeout(AvatarServerError):
    status = 504
    code = "render_timeout"


@dataclass(slots=True)
class RenderRequest:
    """A validated request: the spec fields, the uploaded audio (bytes) and how to answer."""

    avatar_id: str
    text: str | None
    audio: bytes | None
    voice: str
    speed: float
    format: str
    fps: int
    run_async: bool
    priority: int


@dataclass(slots=True)
class RenderService:
    """What the render routes share: the cache, the job queue and what keys are made of."""

    settings: Settings
    library: AvatarLibrary
    cache: RenderCache
    jobs: JobQueue
    voices: Callable[[], list[str]]
    engine_id: str
    uploads: Path
    # identical requests in flight share one job: cache key -> job id
    inflight: dict[str, str] = field(default_factory=dict)
    # who may cancel a job: one secret per request that made or joined it (job id -> tokens)
    waiters: dict[str, set[str]] = field(default_factory=dict)
    # job WebSockets open now -> job id; their handlers' tasks (awaited at shutdown)
    sockets: dict[web.WebSocketResponse, str] = field(default_factory=dict)
    socket_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # shutdown: closing is set first (sockets then close 1001), stopping once jobs are settled
    closing: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    close_renderer: Callable[[], None] | None = None
    _avatar_digests: dict[str, tuple[float, str]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    # --- cache keys -------------------------------------------------------------------------
    def avatar_digest(self, avatar_id: str) -> str:
        """sha256 over the avatar folder's files (names and bytes); recomputed when the
        folder changes (blocking: call from an executor)."""
        folder = DEFAULT_AVATAR_DIR if avatar_id == BUILTIN_ID else self.library.store.folder(
            avatar_id
        )
        if folder is None:
            raise NotFound(f"no avatar with id {avatar_id!r}")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stamp = max((p.stat().st_mtime for p in files), default=0.0) + len(files)
        cached = self._avatar_digests.get(avatar_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
        digest = h.hexdigest()
        self._avatar_digests[avatar_id] = (stamp, digest)
        return digest

    def cache_key(self, req: RenderRequest, avatar_digest: str) -> str:
        """sha256 of everything that changes the output."""
        media, render = self.settings.media, self.settings.render
        content = (
            {"text": req.text}
            if req.text is not None
            else {"audio_sha256": hashlib.sha256(req.audio or b"").hexdigest()}
        )
        parts = {
            "version": RENDER_FORMAT_VERSION,
            "avatar": avatar_digest,
            **content,
            "voice": req.voice,
            "voice_file": self.settings.engines.piper_voice,
            "speed": round(req.speed, 4),
            "engine": self.engine_id,
            "fps": req.fps,
            "format": req.format,
            "size": [media.video_width, media.video_height],
            "sample_rate": media.audio_sample_rate,
            "crossfade": media.crossfade_frames,
            "encoder": [render.h264_preset, render.h264_crf, render.vp9_crf],
        }
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    # --- jobs ---------------------------------------------------------------------------------
    # --- cancel tokens ----------------------------------------------------------------------
    def add_waiter(self, job_id: str) -> str:
        """A new cancel token for one request that made or joined ``job_id``."""
        token = secrets.token_urlsafe(24)
        self.waiters.setdefault(job_id, set()).add(token)
        return token

    def waiter_of(self, job_id: str, given: str) -> str | None:
        """The job's token equal to ``given`` (compared in constant time), or None."""
        found = None
        for token in self.waiters.get(job_id, ()):
            if hmac.compare_digest(token.encode(), given.encode()):
                found = token
        return found

    def remove_waiter(self, job_id: str, token: str) -> int:
        """Detach one waiter; returns how many are left."""
        left = self.waiters.get(job_id, set())
        left.discard(token)
        if not left:
            self.waiters.pop(job_id, None)
        return len(left)

    async def close_sockets(self, wait_s: float = SOCKET_CLOSE_WAIT_S) -> None:
        """Shutdown: every job WebSocket is sent its job's final state, then closed 1001 (going
        away) by its own handler; waits up to ``wait_s`` for them. In-process jobs are
        cancelled first (cleanup would cancel them anyway), so their subscribers see
        ``cancelled``; Redis jobs go on elsewhere, so theirs get the current state."""
        self.closing = True
        if self.settings.jobs.backend == "local":
            watched = set(self.sockets.values())
            await asyncio.gather(*(self.jobs.cancel(j) for j in watched), return_exceptions=True)
        self.stopping.set()
        if self.socket_tasks:
            await asyncio.wait(set(self.socket_tasks), timeout=wait_s)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop the job queue (running local jobs are cancelled) and release the renderer."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.aclose()
        if self.close_renderer is not None:
            await asyncio.to_thread(self.close_renderer)

    async def cleanup(self) -> dict[str, int]:
        """Expired cache entries, the size cap, stale staging folders and old uploads."""
        loop = asyncio.get_running_loop()
        report = dict(await loop.run_in_executor(None, self.cache.cleanup))
        report["uploads_removed"] = await loop.run_in_executor(None, self.remove_old_uploads)
        return report

    async def cleanup_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                report = await self.cleanup()
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the next one
                logger.exception("cache cleanup failed")
                continue
            if any(report.values()):
                logger.info("cache cleanup: %s", report)

    async def follow(self, job_id: str, key: str, upload: Path | None) -> None:
        """Once the job is over: forget it as in flight and remove its uploaded audio."""
        try:
            async for state in self.jobs.subscribe(job_id):
                if state.terminal:
                    break
        finally:
            if self.inflight.get(key) == job_id:
                del self.inflight[key]
            self.waiters.pop(job_id, None)
            if upload is not None:
                await asyncio.to_thread(upload.unlink, missing_ok=True)

    def remove_old_uploads(self) -> int:
        """Uploaded audio older than ``jobs.keep_finished_s`` (left by a restart)."""
        limit = time.time() - self.settings.jobs.keep_finished_s
        removed = 0
        for p in self.uploads.glob("*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed


RENDER_SERVICE = web.AppKey("render_service", RenderService)


# --- request parsing --------------------------------------------------------------------------
def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise BadRequest(f"field {name!r} must be true or false")


def _as_number(name: str, value: object, kind: type) -> float:
    if isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise BadRequest(f"field {name!r} must be a number, got {short(text)!r}") from None
    try:
        number = as_finite(name, value)  # 400 digits, NaN or inf: refused, never an overflow
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if kind is int and not number.is_integer():
        raise BadRequest(f"field {name!r} must be a whole number")
    return number


def validate(
    fields: Mapping[str, object], audio: bytes | None, settings: Settings, voices: list[str]
) -> RenderRequest:
    """The request's fields checked one by one; the first problem is a BadRequest naming it."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; accepted: {list(FIELDS)}")
    r = settings.render
    avatar_id = fields.get("avatar_id", settings.avatars.default)
    if not isinstance(avatar_id, str) or not avatar_id:
        raise BadRequest("field 'avatar_id' must be a non-empty string")
    text = fields.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise BadRequest("field 'text' must be a string")
        text = clean_text(text)  # no control characters reach the voice or the cache key
        if len(text) > r.max_text_chars:
            raise BadRequest(
                f"field 'text' has {len(text)} characters; at most {r.max_text_chars} are accepted"
            )
        if not text:
            raise BadRequest("field 'text' is empty")
        if not has_speakable(text):
            raise BadRequest("field 'text' has nothing to speak (no letter or digit)")
    if (text is None) == (audio is None):
        raise BadRequest("give exactly one of 'text' or an 'audio' file (multipart part 'audio')")
    if audio is not None and not audio:
        raise BadRequest("the 'audio' file is empty")
    voice = fields.get("voice", "default")
    if not isinstance(voice, str) or voice not in voices:
        raise BadRequest(f"unknown voice {str(voice)[:40]!r}; available: {voices}")
    speed = _as_number("speed", fields.get("speed", 1.0), float)
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise BadRequest(
            f"field 'speed' must be within {MIN_SPEED:g}..{MAX_SPEED:g}, got {speed:g}"
        )
    fmt = fields.get("format", "mp4")
    if fmt not in FORMATS:
        raise BadRequest(f"field 'format' must be one of {list(FORMATS)}, got {str(fmt)[:20]!r}")
    fps_value = _as_number("fps", fields.get("fps", settings.media.fps), int)
    fps = int(fps_value)
    if not r.min_fps <= fps <= r.max_fps or 90000 % fps:
        raise BadRequest(
            f"field 'fps' must be within {r.min_fps}..{r.max_fps} and divide 90000, got {fps}"
        )
    priority = int(_as_number("priority", fields.get("priority", 0), int))
    if not -10 <= priority <= 10:
        raise BadRequest(f"field 'priority' must be within -10..10, got {priority}")
    return RenderRequest(
        avatar_id=avatar_id,
        text=text if isinstance(text, str) else None,
        audio=audio,
        voice=voice,
        speed=speed,
        format=str(fmt),
        fps=fps,
        run_async=_as_bool("async", fields.get("async", False)),
        priority=priority,
    )


async def read_request(
    request: web.Request, settings: Settings
) -> tuple[dict[str, object], bytes | None]:
    """The fields and the uploaded audio of a JSON or multipart/form-data request."""
    if request.content_type == "application/json":
        from rtc_server.app import read_json_object

        return await read_json_object(request), None
    if request.content_type != "multipart/form-data":
        raise BadRequest(
            "Content-Type must be application/json or multipart/form-data, not "
            f"{request.content_type!r}"
        )
    limit = settings.render.max_audio_bytes
    if request.content_length is not None and request.content_length > limit + 16 * MAX_FIELD_BYTES:
        raise UploadTooLarge(
            f"the upload is {request.content_length} bytes; at most {limit} are accepted"
        )
    fields: dict[str, object] = {}
    audio: bytes | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            name = part.name or ""
            if name == "audio":
                if audio is not None:
                    raise BadRequest("more than one 'audio' part")
                audio = await read_part(
                    part,
                    limit,
                    UploadTooLarge(f"the audio file is over the limit of {limit} bytes"),
                )
                continue
            if name not in FIELDS:
                raise BadRequest(f"unknown part {name[:40]!r}; accepted: audio, {list(FIELDS)}")
            if name in fields:
                raise BadRequest(f"more than one {name!r} part")
            raw = await read_part(
                part, MAX_FIELD_BYTES, BadRequest(f"part {name!r} is too long")
            )
            try:
                fields[name] = raw.decode(part.get_charset(default="utf-8"))
            except (LookupError, UnicodeDecodeError) as exc:
                raise BadRequest(f"part {name!r} is not valid text: {exc}") from None
    except MALFORMED_MULTIPART as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    return fields, audio


# --- answers ------------------------------------------------------------------------------------
def result_body(key: str, manifest: Mapping[str, object], cache: RenderCache) -> dict[str, object]:
    """A finished render: its manifest with file URLs and the timeline inline."""
    body: dict[str, object] = {k: v for k, v in manifest.items() if k != "files"}
    body["cache_key"] = key
    files = manifest.get("files")
    urls: dict[str, str] = {}
    if isinstance(files, Mapping):
        for name, filename in files.items():
            urls[str(name)] = f"/v1/results/{key}/{filename}"
    body["files"] = urls
    entry = cache.peek(key)
    if entry is not None and isinstance(files, Mapping) and "timeline" in files:
        with contextlib.suppress(OSError, ValueError):
            body["timeline"] = json.loads((entry.path / str(files["timeline"])).read_text())
    return body


def job_body(state: JobState, cache: RenderCache, *, with_result: bool = True) -> dict[str, object]:
    body: dict[str, object] = {
        "id": state.id,
        "status": state.status,
        "percent": round(state.percent, 1),
        "stage": state.stage,
        "priority": state.priority,
        "created": state.created,
        "started": state.started,
        "finished": state.finished,
        "status_url": f"/v1/render/{state.id}",
        "ws_url": f"/ws/jobs/{state.id}",
    }
    if state.error is not None:
        body["error"] = state.error
    if with_result and state.status == "done" and state.result is not None:
        key = str(state.result.get("cache_key", ""))
        body["result"] = result_body(key, state.result, cache)
    return body


def _job_error(state: JobState) -> web.Response:
    err: dict[str, str] = dict(state.error or {})
    err.setdefault("error", "render_failed")
    err.setdefault("detail", "the render failed")
    code = err["error"]
    status = 400 if code in ("bad_request", "not_found") else 500
    if code == "not_found":
        status = 404
    return web.json_response({**err, "job": state.id}, status=status)


# --- handlers -------------------------------------------------------------------------------------
async def handle_render(request: web.Request) -> web.Response:
    svc = request.app[RENDER_SERVICE]
    settings = svc.settings
    fields, audio = await read_request(request, settings)
    req = validate(fields, audio, settings, svc.voices())
    loop = asyncio.get_running_loop()
    if not AVATAR_ID_RE.fullmatch(req.avatar_id) or not svc.library.exists(req.avatar_id):
        raise NotFound(f"no avatar with id {req.avatar_id[:40]!r}")
    digest = await loop.run_in_executor(None, svc.avatar_digest, req.avatar_id)
    key = svc.cache_key(req, digest)
    upload: Path | None = None
    if req.audio is not None:
        # saved for the worker, and checked now so that an async request with a file that is
        # not audio (or too long) gets its 400 at once; removed unless a job takes it
        upload = svc.uploads / f"{uuid.uuid4().hex}.bin"
        await loop.run_in_executor(None, upload.write_bytes, req.audio)
    taken: list[Path] = []  # the upload, once a job has it (the job's follower removes it)
    try:
        return await _answer(svc, req, key, upload, taken)
    finally:
        if upload is not None and not taken:
            await asyncio.to_thread(upload.unlink, missing_ok=True)


async def _answer(
    svc: RenderService, req: RenderRequest, key: str, upload: Path | None, taken: list[Path]
) -> web.Response:
    settings = svc.settings
    loop = asyncio.get_running_loop()
    if upload is not None:
        check = functools.partial(
            decode_audio, upload, sample_rate=8000, max_seconds=settings.render.max_audio_s
        )
        await loop.run_in_executor(None, check)
    t0 = time.perf_counter()
    entry = await loop.run_in_executor(None, svc.cache.get, key)
    if entry is not None:
        body = result_body(key, entry.manifest, svc.cache)
        served_ms = round(1000 * (time.perf_counter() - t0), 2)
        body.update(status="done", cached=True, served_ms=served_ms)
        return web.json_response(body)

    job_id = svc.inflight.get(key)
    state = await svc.jobs.get(job_id) if job_id else None
    if state is None or state.terminal:
        spec = RenderSpec(
            avatar_id=req.avatar_id,
            text=req.text,
            audio_path=str(upload) if upload else None,
            voice=req.voice,
            speed=req.speed,
            format=req.format,
            fps=req.fps,
            cache_key=key,
        )
        state = await svc.jobs.submit(spec, priority=req.priority)
        if upload is not None:
            taken.append(upload)
        svc.inflight[key] = state.id
        svc.spawn(svc.follow(state.id, key, upload))
    # this request's own right to cancel: a second identical request gets its own, and
    # cancelling with it only detaches that request while others still wait for the job
    token = svc.add_waiter(state.id)
    if req.run_async:
        return web.json_response(
            {**job_body(state, svc.cache), "cached": False, "cancel_token": token},
            status=202,
            headers={"Location": f"/v1/render/{state.id}"},
        )
    keep = False  # a 504 hands the token on: the job goes on and may still be cancelled
    try:
        state = await svc.jobs.wait(state.id, settings.render.sync_timeout_s)
        keep = not state.terminal
    finally:
        if not keep:
            svc.remove_waiter(state.id, token)
    if state.status == "done":
        body = job_body(state, svc.cache)
        result = body.pop("result", {})
        assert isinstance(result, dict)
        return web.json_response({**result, **body, "cached": False})
    if state.status in ("failed", "cancelled"):
        if state.status == "cancelled":
            return web.json_response(
                {"error": "cancelled", "detail": "the job was cancelled", "job": state.id},
                status=409,
            )
        return _job_error(state)
    return web.json_response(
        {
            "error": "render_timeout",
            "detail": f"not finished after {settings.render.sync_timeout_s:g} s; the job "
            "goes on: follow its status_url",
            **job_body(state, svc.cache),
            "cancel_token": token,
        },
        status=504,
    )


async def _job_or_404(svc: RenderService, job_id: str) -> JobState:
    state = await svc.jobs.get(job_id) if len(job_id) <= 64 else None
    if state is None:
        raise NotFound("no such render job (unknown, or finished long ago and forgotten)")
    return state


async def handle_get_job(request: web.Request) -> web.Response:
    svc = request.app[RENDER_SERVICE]
    state = await _job_or_404(svc, request.match_info["job_id"])
    return web.json_response(job_body(state, svc.cache))


async def handle_cancel_job(request: web.Request) -> web.Response:
    """Cancel with the job's ``cancel_token`` (``X-Cancel-Token`` or ``?token=``): the request
    it was given to stops waiting, and the job stops once no request waits for it; or with an
    admin key (a client on this machine when none are set): the job stops."""
    svc = request.app[RENDER_SERVICE]
    job_id = request.match_info["job_id"]
    state = await _job_or_404(svc, job_id)
    given = request.headers.get("X-Cancel-Token") or request.query.get("token") or ""
    token = svc.waiter_of(job_id, given[:256]) if given else None
    if token is not None:
        left = svc.remove_waiter(job_id, token)
        if left:
            return web.json_response({**job_body(state, svc.cache), "detached": True,
                                      "waiting": left})
    else:
        access = request.app.get(ACCESS)
        if access is None or not access.is_admin(request):
            raise Forbidden("cancelling a render takes its cancel_token (X-Cancel-Token, given "
                            "to the request that made or joined it) or an admin key")
    cancelled = await svc.jobs.cancel(job_id)
    if cancelled is None:
        raise NotFound("no such render job")
    svc.waiters.pop(job_id, None)
    return web.json_response(job_body(cancelled, svc.cache))


async def handle_result_file(request: web.Request) -> web.StreamResponse:
    svc = request.app[RENDER_SERVICE]
    key, name = request.match_info["key"], request.match_info["name"]
    if len(key) != KEY_LEN or any(c not in "0123456789abcdef" for c in key):
        raise NotFound("no such result")
    if name not in RESULT_FILES:
        raise NotFound(f"no result file {name[:40]!r}; results have {sorted(RESULT_FILES)}")
    entry = svc.cache.peek(key)
    path = entry.path / name if entry is not None else None
    if path is None or not path.is_file():
        raise NotFound("no such result (never rendered, or evicted from the cache)")
    return web.FileResponse(path, headers={"Content-Type": RESULT_FILES[name]})


async def handle_job_ws(request: web.Request) -> web.WebSocketResponse:
    """The job's state on every change until the final one; at shutdown, the final (or, for a
    job that goes on elsewhere, the current) state and a 1001 close."""
    svc = request.app[RENDER_SERVICE]
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    job_id = request.match_info["job_id"]
    state = await svc.jobs.get(job_id) if len(job_id) <= 64 else None
    if state is None:
        await ws.send_json({"error": "not_found", "detail": "no such render job"})
        await ws.close(code=4404, message=b"no such job")
        return ws

    async def drain() -> None:  # notice the client going away
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    def message(state: JobState) -> dict[str, object]:
        body = job_body(state, svc.cache, with_result=state.terminal)
        if svc.closing:
            body["closing"] = "the server is shutting down"
        return body

    reader = asyncio.ensure_future(drain())
    stop = asyncio.ensure_future(svc.stopping.wait())
    task = asyncio.current_task()
    if task is not None:
        svc.socket_tasks.add(task)
    svc.sockets[ws] = job_id
    states = svc.jobs.subscribe(job_id)
    step: asyncio.Future[JobState] | None = None
    last: JobState | None = None
    try:
        # only this handler writes to ws: states, then (at shutdown) the final one and 1001
        while not ws.closed:
            step = asyncio.ensure_future(anext(states))
            await asyncio.wait({step, reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                break
            try:
                state = step.result()
            except StopAsyncIteration:
                break
            await ws.send_json(message(state))
            last = state
            if state.terminal:
                break
        if svc.closing and not ws.closed:
            await svc.stopping.wait()  # in-process jobs are cancelled by now
            with contextlib.suppress(Exception):
                final = await svc.jobs.get(job_id)
                if final is not None and (final != last or not final.terminal):
                    await ws.send_json(message(final))
    finally:
        svc.sockets.pop(ws, None)
        stop.cancel()
        if step is not None and not step.done():
            step.cancel()  # the subscription ends itself
        elif (aclose := getattr(states, "aclose", None)) is not None:
            with contextlib.suppress(Exception):
                await aclose()
        with contextlib.suppress(Exception):
            if svc.closing:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            else:
                await ws.close()
        reader.cancel()
        if task is not None:
            svc.socket_tasks.discard(task)
    return ws


async def handle_cache_stats(request: web.Request) -> web.Response:
    svc = request.app[RENDER_SERVICE]
    stats = await asyncio.get_running_loop().run_in_executor(None, svc.cache.stats)
    return web.json_response(stats)


async def handle_cache_clear(request: web.Request) -> web.Response:
    svc = request.app[RENDER_SERVICE]
    removed = await asyncio.get_running_loop().run_in_executor(None, svc.cache.clear)
    return web.json_response({"removed": removed})


async def handle_cache_cleanup(request: web.Request) -> web.Response:
    return web.json_response(await request.app[RENDER_SERVICE].cleanup())


CLEANUP_PERIOD_S = 600.0


async def start_render_service(
    settings: Settings, library: AvatarLibrary, lipsync: LipSyncEngine, tts: TextToSpeech
) -> RenderService:
    """The cache, the job queue (with this process's workers, if any) and the renderer they
    run, sharing the server's avatars, voice and lip-sync engine."""
    from pipeline.render.core import ClipRenderer
    from pipeline.render.jobs import create_cache, create_job_queue

    jobs_cfg = settings.jobs
    if jobs_cfg.backend == "local" and jobs_cfg.workers < 1:
        raise PipelineError(
            "jobs.workers is 0 with jobs.backend local: nothing would ever render; set "
            "jobs.workers >= 1, or jobs.backend: redis with separate worker processes"
        )
    clip = ClipRenderer(settings, library=library, lipsync=lipsync, tts=tts)
    loop = asyncio.get_running_loop()
    cache = await loop.run_in_executor(None, create_cache, settings)
    uploads = cache.root / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    jobs = create_job_queue(settings, cache, clip.render if jobs_cfg.workers > 0 else None)
    await jobs.start()
    svc = RenderService(
        settings=settings,
        library=library,
        cache=cache,
        jobs=jobs,
        voices=clip.voices,
        engine_id=json.dumps(clip.identity(), sort_keys=True, default=str),
        uploads=uploads,
        close_renderer=clip.close,
    )
    svc.spawn(svc.cleanup_every(CLEANUP_PERIOD_S))
    return svc


def add_render_routes(app: web.Application) -> None:
    app.router.add_post("/v1/render", handle_render)
    app.router.add_get("/v1/render/{job_id}", handle_get_job)
    app.router.add_delete("/v1/render/{job_id}", handle_cancel_job)
    app.router.add_get("/v1/results/{key}/{name}", handle_result_file)
    app.router.add_get("/ws/jobs/{job_id}", handle_job_ws)
    app.router.add_get("/cache/stats", handle_cache_stats)
    app.router.add_delete("/cache", handle_cache_clear)
    app.router.add_post("/cache/cleanup", handle_cache_cleanup)

    async def close_job_sockets(app: web.Application) -> None:
        svc = app.get(RENDER_SERVICE)
        if svc is not None:
            await svc.close_sockets()

    app.on_shutdown.append(close_job_sockets)
