"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

The request bodies the handlers validate (``POST /offer``, ``POST /v1/render``) are the
``model_json_schema()`` of the pydantic models the handlers check against
(``rtc_server/bodies.py``), with bounds from the server's settings; the error body is
``wire.ErrorBody``'s; the other responses are plain data here. The progress WebSocket
``GET /ws/jobs/{job_id}`` is no HTTP operation: it is described under the top-level
``x-websocket`` key. ``tests/test_openapi.py`` checks that the operations here are exactly the
app's routes and fuzzes the live app against this document."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from config import Settings
from rtc_server.bodies import form_schema, json_schema, offer_model, render_model
from rtc_server.wire import ErrorBody

__all__ = ["OPENAPI_PATH", "add_openapi_route", "build_openapi", "websocket_paths"]

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.1.0"

Schema = dict[str, Any]

ADMIN = "admin"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
# What each status means when it answers with the error body.
ERROR_TEXT = {
    400: "Bad request: not JSON, a missing or wrong field, or bad content (the detail says which).",
    401: "Missing or wrong API key or token.",
    403: "Forbidden.",
    404: "Not found.",
    409: "Conflict with the current state.",
    413: "Body or upload too large.",
    415: "Unsupported media type (decided from the content).",
    422: "The upload was understood but refused (the error names the reason).",
    429: "Too many requests: a per-client rate limit or a full queue.",
    500: "The server failed; its log has the cause (no stack trace or path is sent).",
    503: "Not available now.",
    504: "Not finished in time.",
}


def _error(status: int, description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description or ERROR_TEXT[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status in (429, 503):
        out["headers"] = RETRY_AFTER
    return out


def _json(description: str, schema: Schema, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}},
            **extra}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: list[str] | None = None, *,
         additional: bool = True) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if not additional:
        out["additionalProperties"] = False
    return out


INT = {"type": "integer"}
NUM = {"type": "number"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_STR = {"type": ["string", "null"]}
ANY_OBJ = {"type": "object"}


def _schemas(settings: Settings) -> dict[str, Schema]:
    r = settings.render
    return {
        "Error": json_schema(ErrorBody),
        "Offer": json_schema(offer_model(settings)),
        "Answer": _obj(
            {"sdp": STR, "type": {"const": "answer"},
             "session_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}},
            ["sdp", "type", "session_id"],
        ),
        "Session": _obj(
            {
                "id": STR,
                "state": {"type": "string", "description": "new, connecting, connected, "
                          "disconnected, failed or closed"},
                "avatar_id": STR,
                "uptime_s": NUM,
                "frames_sent": _obj({"video": INT, "audio": INT}, ["video", "audio"]),
                # the last two seconds: frames a second and the longest wait between two
                "recent": _obj({"audio_fps": NUM, "audio_max_gap_ms": NUM, "video_fps": NUM,
                                "video_max_gap_ms": NUM}),
                "frames_repeated": INT,
                "frames_skipped": INT,
                "frames_shed": INT,
                "frames_late": INT,
                # the frame producer: frames rendered in time, skipped (could not be rendered
                # before their deadline), re-rendered after a re-plan, frames allowed in
                # flight, smoothed render ms per frame in flight
                "render": _obj({"rendered": INT, "skipped": INT, "rerendered": INT,
                                "window": INT, "frame_ms": NUM}),
                "video_codec": {"type": ["string", "null"], "description": "VP8 or H264"},
                "lipsync": STR,
                "lipsync_degraded": BOOL,
                "speaking": BOOL,
                "mic": _obj({"frames_received": INT, "rms_dbfs": NUM, "frames_dropped": INT,
                             "decoder": {"type": "string", "enum": ["mic-thread", "aiortc"]},
                             "vad_chunks_skipped": INT, "dtx_silence_ms": INT}),
                "early_cut_ins": INT,
            },
            ["id", "state", "avatar_id", "uptime_s", "frames_sent"],
        ),
        "SessionList": _obj(
            {"sessions": {"type": "array", "items": _ref("Session")}}, ["sessions"]
        ),
        "SessionClosed": _obj({"id": STR, "state": STR}, ["id", "state"]),
        "Health": _obj(
            {"status": {"const": "ok"}, "sessions": INT, "lipsync": ANY_OBJ,
             "listening": BOOL, "replier": STR,
             "load": {"type": ["object", "null"],
                      "description": "video_stride, loop_lag_ms (median of 1 s), "
                      "loop_lag_p90_ms, max_loop_lag_ms, raised (media.audio_first; null "
                      "when off)"}},
            ["status"],
        ),
        "IceServers": _obj(
            {"iceServers": {"type": "array", "items": _obj(
                {"urls": {"type": ["string", "array"], "items": STR}, "username": STR,
                 "credential": STR}, ["urls"])}},
            ["iceServers"],
        ),
        "Readiness": _obj(
            {"ready": BOOL, "checks": {"type": "object", "additionalProperties": BOOL,
                                       "description": "Each check by name: accepting, "
                                       "default_avatar, tts, lipsync, stt, vad, render, "
                                       "headroom."},
             "headroom": {"type": "object", "description": "The measured headroom over the "
                          "last 3 s: enabled, cores, cpu_target, busy_cores, server_cores, "
                          "call_cores, missed_share, calls, calls_more (None before a call "
                          "was measured), window_s."}},
            ["ready", "checks"],
        ),
        "HealthDetailed": _obj(
            {
                "status": {"enum": ["ok", "draining"]},
                "uptime_s": NUM,
                "version": STR,
                "process": _obj(
                    {"pid": INT, "rss_bytes": INT, "cpu_percent": NUM, "threads": INT,
                     "asyncio_tasks": INT, "open_fds": {"type": ["integer", "null"]}},
                    ["rss_bytes", "asyncio_tasks"],
                ),
                "system": ANY_OBJ,
                "lipsync": {"type": ["object", "null"]},
                "stt": {"type": ["object", "null"]},
                "tts": {"type": ["object", "null"]},
                "pools": ANY_OBJ,
                "sessions": _obj({"live": INT, "max": {"type": ["integer", "null"]}}),
                "avatars": {"type": ["object", "null"], "description": "loaded, bytes, "
                            "budget_bytes (avatars.memory_budget_mb), in_use, evicted"},
            },
            ["status", "process"],
        ),
        "Avatar": _obj(
            {
                "id": {"type": "string", "pattern": "^(default|av_[0-9a-f]{12})$"},
                "name": STR,
                "frames": INT,
                "fps": NUM,
                "width": INT,
                "height": INT,
                "quality": ANY_OBJ,
                "created_at": NULLABLE_NUM,
                "source_hash": NULLABLE_STR,
                "builtin": BOOL,
                "created": {"type": "boolean",
                            "description": "POST /avatars only: false when the same content "
                            "was registered before"},
            },
            ["id", "name", "frames", "fps", "width", "height", "builtin"],
        ),
        "AvatarList": _obj({"avatars": {"type": "array", "items": _ref("Avatar")}},
                           ["avatars"]),
        "AvatarUpload": _obj(
            {"file": {"type": "string", "contentMediaType": "application/octet-stream",
                      "description": "JPG, PNG, WebP, GIF, MP4, MOV or WebM (decided from the "
                      f"content), at most {settings.avatars.max_upload_bytes} bytes"},
             "name": {"type": "string"}},
            ["file", "name"],
        ),
        "AvatarDeleted": _obj({"id": STR, "deleted": {"const": True}}, ["id", "deleted"]),
        "RenderRequest": json_schema(render_model(settings)),
        "RenderUpload": form_schema(render_model(settings), {
            "audio": {"type": "string", "contentMediaType": "application/octet-stream",
                      "description": "Any audio FFmpeg decodes, at most "
                      f"{r.max_audio_bytes} bytes and {r.max_audio_s:g} s"},
        }),
        "Job": _obj(
            {
                "id": STR,
                "status": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                "percent": NUM,
                "stage": STR,
                "priority": INT,
                "created": NUM,
                "started": NULLABLE_NUM,
                "finished": NULLABLE_NUM,
                "status_url": STR,
                "ws_url": STR,
                "error": _ref("Error"),
                "result": _ref("RenderResult"),
                "cached": BOOL,
                # given to the request that made or joined the job (202, 504): cancels it
                "cancel_token": STR,
                # a DELETE with a cancel token while other requests still wait for the job
                "detached": BOOL,
                "waiting": INT,
                # the last job WebSocket message at server shutdown (then close 1001)
                "closing": STR,
            },
            ["id", "status", "percent", "stage", "status_url", "ws_url"],
        ),
        "RenderResult": _obj(
            {
                "status": STR,
                "cached": BOOL,
                "cache_key": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "duration_s": NUM,
                "frames": INT,
                "fps": INT,
                "format": {"enum": ["mp4", "webm"]},
                "width": INT,
                "height": INT,
                "engine": STR,
                "voice": STR,
                "files": {"type": "object", "additionalProperties": STR},
                "timeline": ANY_OBJ,
                "served_ms": NUM,
            },
            ["cache_key", "files"],
        ),
        "RenderTimeout": {
            "allOf": [_ref("Error"), _ref("Job")],
            "description": "The job goes on; follow its status_url.",
        },
        "CacheStats": _obj(
            {"entries": INT, "bytes": INT, "hits": INT, "misses": INT, "hit_rate": NUM,
             "max_bytes": INT, "ttl_s": NUM},
            ["entries", "bytes", "hits", "misses", "hit_rate"],
        ),
        "CacheCleared": _obj({"removed": INT}, ["removed"]),
        "CacheCleanup": {"type": "object", "additionalProperties": INT},
    }


def _path_param(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema,
            "description": description}


def _operations(settings: Settings) -> dict[str, dict[str, Any]]:
    admin_security: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKey": []}]
    # access.offer_token (or an admin key) on the routes that cost CPU or hand out TURN
    # credentials, when the token is set
    offer_security: list[dict[str, list[str]]] = (
        [{"offerToken": []}, {"apiKey": []}] if settings.access.offer_token else []
    )
    r = settings.render
    session_id = _path_param("session_id", STR, "A session id from POST /offer.")
    avatar_id = _path_param("avatar_id", STR, "'default' or av_ + 12 hex digits; "
                                              "anything else is a 404.")
    job_id = _path_param("job_id", STR, "A render job id.")

    def token(op: dict[str, Any]) -> dict[str, Any]:
        """Routes behind access.offer_token when it is set."""
        op["security"] = offer_security
        if offer_security:
            op["responses"][401] = _error(401, "Missing or wrong offer token.")
        return op

    def admin(op: dict[str, Any], *, limited: bool = False) -> dict[str, Any]:
        """Admin routes: an API key, or (none configured) loopback clients only."""
        op["security"] = admin_security
        op["responses"][401] = _error(401)
        op["responses"][401]["headers"] = {"WWW-Authenticate": {
            "description": "Bearer", "schema": STR}}
        op["responses"][403] = _error(
            403, "Forbidden: no API keys are configured and the client is not on this machine."
        )
        if limited:
            op["responses"][429] = _error(429)
        return op

    html = {"description": "An HTML page.", "content": {"text/html": {"schema": STR}}}
    paths: dict[str, dict[str, Any]] = {
        "/": {"get": {"tags": ["pages"], "summary": "The call page.",
                      "operationId": "call_page", "responses": {200: html}}},
        "/register": {"get": {"tags": ["pages"], "summary": "The avatar registration page.",
                              "operationId": "register_page", "responses": {200: html}}},
        "/web/{name}": {"get": {
            "tags": ["pages"], "operationId": "web_file",
            "summary": "A file of the pages (scripts, styles).",
            "parameters": [_path_param("name", {"type": "string", "minLength": 1},
                                       "A file in web/; anything else is a JSON 404.")],
            "responses": {200: {"description": "The file.",
                                "content": {"*/*": {"schema": STR}}},
                          404: _error(404)}}},
        "/health": {"get": {
            "tags": ["observability"], "summary": "Liveness.", "operationId": "health",
            "responses": {200: _json("The process answers.", _ref("Health"))}}},
        "/ready": {"get": {
            "tags": ["observability"], "operationId": "ready",
            "summary": "Readiness: models loaded, the default avatar ready, not draining.",
            "responses": {200: _json("Ready for calls.", _ref("Readiness")),
                          503: _json("Not ready (starting, shutting down, or no headroom "
                                     "for another call).",
                                     _ref("Readiness"))}}},
        "/metrics": {"get": admin({
            "tags": ["observability"], "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format).",
            "responses": {200: {"description": "Metrics.",
                                "content": {"text/plain": {"schema": STR}}}}})},
        "/health/detailed": {"get": admin({
            "tags": ["observability"], "operationId": "health_detailed",
            "summary": "Device, execution providers in use, memory, CPU, worker pools.",
            "responses": {200: _json("The details.", _ref("HealthDetailed"))}})},
        OPENAPI_PATH: {"get": {
            "tags": ["meta"], "operationId": "openapi", "summary": "This document.",
            "responses": {200: _json("OpenAPI 3.1.", ANY_OBJ)}}},
        "/offer": {"post": token({
            "tags": ["calls"], "operationId": "offer",
            "summary": "Start a call: an SDP offer in, the SDP answer and the session id out.",
            "description": "JSON at most server.max_body_bytes "
                           f"({settings.server.max_body_bytes}). aiortc does no trickle ICE.",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Offer")}}},
            "responses": {
                200: _json("The answer.", _ref("Answer")),
                400: _error(400), 404: _error(404, "Unknown avatar."), 413: _error(413),
                429: _error(429, "Too many offers from this client."),
                503: _error(503, "sessions.max_concurrent reached (server_full), the "
                                 "measured headroom cannot carry another call (overloaded), "
                                 "or the server is shutting down."),
            }})},
        "/ice-servers": {"get": token({
            "tags": ["calls"], "operationId": "ice_servers",
            "summary": "The STUN/TURN servers the call page should use (TURN REST credentials "
                       "made per request when webrtc.turn_secret is set).",
            "responses": {200: _json("RTCConfiguration.iceServers.", _ref("IceServers"),
                                     headers={"Cache-Control": {"schema": STR,
                                                                "description": "no-store"}})},
        })},
        "/sessions": {"get": admin({
            "tags": ["calls"], "operationId": "list_sessions", "summary": "Live sessions.",
            "responses": {200: _json("Every live session.", _ref("SessionList"))}})},
        "/sessions/{session_id}": {"delete": admin({
            "tags": ["calls"], "operationId": "delete_session", "summary": "End a call.",
            "parameters": [session_id],
            "responses": {200: _json("The call is over.", _ref("SessionClosed")),
                          404: _error(404, "No such session.")}})},
        "/avatars": {
            "post": admin({
                "tags": ["avatars"], "operationId": "register_avatar",
                "summary": "Register an avatar from an image or a short video.",
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": _ref("AvatarUpload"),
                    "encoding": {"file": {"contentType": "application/octet-stream"}}}}},
                "responses": {
                    200: _json("The same content was registered before.", _ref("Avatar")),
                    201: _json("Registered.", _ref("Avatar")),
                    400: _error(400), 413: _error(413), 415: _error(415),
                    422: _error(422, "Refused: video_too_long, resolution_too_high, no_face, "
                                     "multiple_faces, face_too_small, face_turned, too_blurry, "
                                     "too_dark or too_bright."),
                }}, limited=True),
            "get": {"tags": ["avatars"], "operationId": "list_avatars",
                    "summary": "The built-in avatar first, then registered ones.",
                    "responses": {200: _json("Avatars.", _ref("AvatarList"))}},
        },
        "/avatars/{avatar_id}": {
            "get": {"tags": ["avatars"], "operationId": "get_avatar",
                    "summary": "One avatar's metadata and quality report.",
                    "parameters": [avatar_id],
                    "responses": {200: _json("The avatar.", _ref("Avatar")),
                                  404: _error(404)}},
            "delete": admin({
                "tags": ["avatars"], "operationId": "delete_avatar",
                "summary": "Delete a registered avatar.", "parameters": [avatar_id],
                "responses": {
                    200: _json("Deleted.", _ref("AvatarDeleted")),
                    403: _error(403, "builtin_avatar or default_avatar cannot be deleted "
                                     "(or the client may not use admin routes)."),
                    404: _error(404),
                    409: _error(409, "avatar_in_use: a live session shows it."),
                }}, limited=True),
        },
        "/avatars/{avatar_id}/thumbnail": {"get": {
            "tags": ["avatars"], "operationId": "avatar_thumbnail", "summary": "A JPEG preview.",
            "parameters": [avatar_id],
            "responses": {200: {"description": "JPEG.",
                                "content": {"image/jpeg": {"schema": {
                                    "type": "string", "contentMediaType": "image/jpeg"}}}},
                          404: _error(404)}}},
        "/v1/render": {"post": token({
            "tags": ["render"], "operationId": "render",
            "summary": "Render a clip and its timeline from text (JSON) or audio (multipart).",
            "description": "Synchronous by default (200, or 504 after render.sync_timeout_s "
                           f"= {r.sync_timeout_s:g} s with the job going on); async: 202. Give "
                           "exactly one of text or the audio part.",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("RenderRequest")},
                "multipart/form-data": {"schema": _ref("RenderUpload"),
                                        "encoding": {"audio": {
                                            "contentType": "application/octet-stream"}}}}},
            "responses": {
                200: _json("The result (cached or just rendered).", _ref("RenderResult")),
                202: _json("Accepted: the job.", _ref("Job"), headers={"Location": {
                    "description": "The job's status URL.", "schema": STR}}),
                400: _error(400), 404: _error(404, "Unknown avatar."),
                409: _error(409, "The job was cancelled while the request waited."),
                413: _error(413),
                429: _error(429, "The job queue is full (jobs.max_queue), or too many render "
                                 "requests from this client."),
                500: _error(500, "The render failed (render_failed)."),
                504: _json("render_timeout: the job goes on.", _ref("RenderTimeout")),
            }})},
        "/v1/render/{job_id}": {
            "get": {"tags": ["render"], "operationId": "get_job", "summary": "A job's state.",
                    "parameters": [job_id],
                    "responses": {200: _json("The job.", _ref("Job")), 404: _error(404)}},
            "delete": {"tags": ["render"], "operationId": "cancel_job",
                       "summary": "Cancel a job with its cancel_token (detaches that request; "
                       "the job stops when no request waits for it) or an admin key (the job "
                       "stops; its partial files are removed).",
                       "parameters": [
                           job_id,
                           {"name": "X-Cancel-Token", "in": "header", "required": False,
                            "schema": {"type": "string", "maxLength": 256},
                            "description": "The cancel_token the render request was given."},
                           {"name": "token", "in": "query", "required": False,
                            "schema": {"type": "string", "maxLength": 256},
                            "description": "The cancel_token, for clients that cannot set "
                            "headers."},
                       ],
                       "responses": {200: _json("The job (or, detached: still running for "
                                                "the other requests).", _ref("Job")),
                                     403: _error(403, "No cancel_token of this job and no "
                                                      "admin key."),
                                     404: _error(404)}},
        },
        "/v1/results/{key}/{name}": {"get": {
            "tags": ["render"], "operationId": "result_file", "summary": "A result file.",
            "parameters": [
                _path_param("key", {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            "The cache key of a result."),
                _path_param("name", {"enum": ["video.mp4", "video.webm", "audio.ogg",
                                              "audio.wav", "timeline.json"]}, "The file."),
            ],
            "responses": {
                200: {"description": "The file.", "content": {
                    "video/mp4": {"schema": STR}, "video/webm": {"schema": STR},
                    "audio/ogg": {"schema": STR}, "audio/wav": {"schema": STR},
                    "application/json": {"schema": ANY_OBJ}}},
                404: _error(404),
            }}},
        "/cache/stats": {"get": admin({
            "tags": ["cache"], "operationId": "cache_stats", "summary": "Render cache figures.",
            "responses": {200: _json("Stats.", _ref("CacheStats"))}})},
        "/cache": {"delete": admin({
            "tags": ["cache"], "operationId": "cache_clear", "summary": "Empty the cache.",
            "responses": {200: _json("How many entries were removed.", _ref("CacheCleared"))}})},
        "/cache/cleanup": {"post": admin({
            "tags": ["cache"], "operationId": "cache_cleanup",
            "summary": "Remove expired entries and stale partial files; enforce the size cap.",
            "responses": {200: _json("What was removed.", _ref("CacheCleanup"))}})},
    }
    role = settings.cluster.role  # docs/scale-out.md
    if role == "node":
        paths["/cluster/drain"] = {"post": admin({
            "tags": ["cluster"], "operationId": "drain", "summary": "Take no new calls; let "
            "the live ones end (cluster.drain_timeout_s), then exit.",
            "responses": {202: _json("Draining: {id, state, sessions, drain_timeout_s}.",
                                     ANY_OBJ)}})}
    elif role == "front":
        del paths["/health/detailed"]
        node_id = _path_param("node_id", STR, "A node id from GET /cluster/nodes.")
        paths["/cluster/nodes"] = {"get": admin({
            "tags": ["cluster"], "operationId": "list_nodes", "summary": "The media nodes: "
            "{nodes: [{id, url, state, sessions, room, headroom, last_seen_s}]}.",
            "responses": {200: _json("The nodes (state ready, draining or gone).", ANY_OBJ)}})}
        paths["/cluster/nodes/{node_id}/drain"] = {"post": admin({
            "tags": ["cluster"], "operationId": "drain_node", "summary": "Drain one node.",
            "parameters": [node_id],
            "responses": {202: _json("The node's answer.", ANY_OBJ), 404: _error(404),
                          502: _error(502, "node_unavailable")}})}
        deleting = paths["/sessions/{session_id}"]["delete"]["responses"]
        deleting[410] = _error(410, "session_gone: the call's node stopped answering.")
        deleting[502] = _error(502, "node_unavailable")
        paths["/offer"]["post"]["responses"][503] = _error(
            503, "No node has room (no_capacity).")
    return paths


def websocket_paths() -> dict[str, dict[str, Any]]:
    """WebSocket routes (GET upgrades): described under ``x-websocket``, not as operations."""
    return {
        "/ws/jobs/{job_id}": {
            "summary": "A render job's state on every change (stage and percent, at most 10 a "
                       "second): JSON text messages shaped like GET /v1/render/{job_id}; closed "
                       "after the final one. At server shutdown: the final state (in-process "
                       "jobs are cancelled; a Redis job's current state) with 'closing', then "
                       "close code 1001. An unknown job: one {error, detail} message, then "
                       "close code 4404.",
            "message": _ref("Job"),
        }
    }


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The whole document (JSON-ready; status codes are strings as OpenAPI requires)."""
    paths = _operations(settings)
    for item in paths.values():
        for op in item.values():
            op["responses"] = {str(k): v for k, v in sorted(op["responses"].items())}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "avatar-rtc",
            "version": "0.1.0",
            "description": "A real-time talking-avatar server: WebRTC calls, avatars, renders. "
                           "Every error is JSON {error, detail}.",
            "license": {"name": "GPL-3.0-or-later", "identifier": "GPL-3.0-or-later"},
        },
        "servers": [{"url": "/", "description": "this server"}],
        "tags": [
            {"name": "calls", "description": "Signaling and live sessions."},
            {"name": "avatars", "description": "Registration and the avatar library."},
            {"name": "render", "description": "Clips and timelines without a call."},
            {"name": "cache", "description": "Render cache administration."},
            {"name": "observability", "description": "Health, readiness and metrics."},
            {"name": "pages", "description": "HTML pages."},
            {"name": "meta", "description": "This description."},
            {"name": "cluster", "description": "Media nodes behind a front."},
        ],
        "paths": paths,
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "An API key from access.api_keys."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "An API key from access.api_keys."},
                "offerToken": {"type": "http", "scheme": "bearer",
                               "description": "access.offer_token, when set."},
            },
        },
        "x-websocket": websocket_paths(),
    }


def add_openapi_route(app: web.Application, settings: Settings) -> None:
    """Serve the document, built once from ``settings``."""
    doc = build_openapi(settings)

    async def handle_openapi(request: web.Request) -> web.Response:
        return web.json_response(doc)

    app.router.add_get(OPENAPI_PATH, handle_openapi)
