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
import json
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import BodyPartReader, WSCloseCode, WSMsgType, web

from avatars.registration import UploadTooLarge
from common.errors import AvatarServerError, BadRequest, NotFound
from config import Settings
from pipeline.render.cache import RenderCache
from pipeline.render.jobs import JobState
from pipeline.render.service import RenderRequest, RenderService
from pipeline.render.spec import (
    AUDIO_OGG_FILE,
    AUDIO_WAV_FILE,
    TIMELINE_FILE,
    VIDEO_FILES,
)
from rtc_server.avatars_api import Forbidden
from rtc_server.bodies import field_names, parse, render_model
from rtc_server.multipart import MALFORMED_MULTIPART, read_part
from rtc_server.services import SERVICES, services_of
from rtc_server.wire import read_json_object

RESULT_FILES = {
    VIDEO_FILES["mp4"]: "video/mp4",
    VIDEO_FILES["webm"]: "video/webm",
    AUDIO_OGG_FILE: "audio/ogg",
    AUDIO_WAV_FILE: "audio/wav",
    TIMELINE_FILE: "application/json",
}
MAX_FIELD_BYTES = 64 * 1024
KEY_LEN = 64


class RenderTimeout(AvatarServerError):
    status = 504
    code = "render_timeout"


# --- request parsing --------------------------------------------------------------------------
def validate(
    fields: Mapping[str, object], audio: bytes | None, settings: Settings, voices: list[str]
) -> RenderRequest:
    """The request's fields checked one by one against ``render_model`` (also the OpenAPI
    schema); the first problem is a BadRequest naming it."""
    body = parse(render_model(settings), fields, voices=voices, audio=audio)
    return RenderRequest(
        avatar_id=body.avatar_id,
        text=body.text,
        audio=audio,
        voice=body.voice,
        speed=body.speed,
        format=str(body.format),
        fps=body.fps,
        run_async=body.run_async,
        priority=body.priority,
    )


async def read_request(
    request: web.Request, settings: Settings
) -> tuple[dict[str, object], bytes | None]:
    """The fields and the uploaded audio of a JSON or multipart/form-data request."""
    if request.content_type == "application/json":
        return await read_json_object(request, settings.server.max_json_depth), None
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
            names = field_names(render_model(settings))
            if name not in names:
                raise BadRequest(f"unknown part {name[:40]!r}; accepted: audio, {list(names)}")
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
    services = services_of(request)
    svc = services.engines.render
    fields, audio = await read_request(request, services.settings)
    req = validate(fields, audio, services.settings, svc.voices())
    key = await svc.key_of(req)
    # saved for the worker, and checked before answering; removed unless a job takes it
    upload = None if req.audio is None else await svc.save_upload(req.audio)
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
    if upload is not None:
        await svc.check_upload(upload)
    t0 = time.perf_counter()
    entry = await svc.cached(key)
    if entry is not None:
        body = result_body(key, entry.manifest, svc.cache)
        served_ms = round(1000 * (time.perf_counter() - t0), 2)
        body.update(status="done", cached=True, served_ms=served_ms)
        return web.json_response(body)

    state, took_upload = await svc.submit_or_join(req, key, upload)
    if took_upload and upload is not None:
        taken.append(upload)
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
    svc = services_of(request).engines.render
    state = await _job_or_404(svc, request.match_info["job_id"])
    return web.json_response(job_body(state, svc.cache))


async def handle_cancel_job(request: web.Request) -> web.Response:
    """Cancel with the job's ``cancel_token`` (``X-Cancel-Token`` or ``?token=``): the request
    it was given to stops waiting, and the job stops once no request waits for it; or with an
    admin key (a client on this machine when none are set): the job stops."""
    svc = services_of(request).engines.render
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
        if not services_of(request).access.is_admin(request):
            raise Forbidden("cancelling a render takes its cancel_token (X-Cancel-Token, given "
                            "to the request that made or joined it) or an admin key")
    cancelled = await svc.jobs.cancel(job_id)
    if cancelled is None:
        raise NotFound("no such render job")
    svc.waiters.pop(job_id, None)
    return web.json_response(job_body(cancelled, svc.cache))


async def handle_result_file(request: web.Request) -> web.StreamResponse:
    svc = services_of(request).engines.render
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
    svc = services_of(request).engines.render
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
        svc.watcher_tasks.add(task)
    svc.watchers[ws] = job_id
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
        svc.watchers.pop(ws, None)
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
            svc.watcher_tasks.discard(task)
    return ws


async def handle_cache_stats(request: web.Request) -> web.Response:
    svc = services_of(request).engines.render
    stats = await asyncio.get_running_loop().run_in_executor(None, svc.cache.stats)
    return web.json_response(stats)


async def handle_cache_clear(request: web.Request) -> web.Response:
    svc = services_of(request).engines.render
    removed = await asyncio.get_running_loop().run_in_executor(None, svc.cache.clear)
    return web.json_response({"removed": removed})


async def handle_cache_cleanup(request: web.Request) -> web.Response:
    return web.json_response(await services_of(request).engines.render.cleanup())


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
        loaded = app[SERVICES].loaded
        if loaded is not None:
            await loaded.render.close_watchers()

    app.on_shutdown.append(close_job_sockets)
