"""A scripted stand-in for an OpenAI-compatible chat completions server, on 127.0.0.1 only.

Each ``POST /v1/chat/completions`` takes the next planned response from the script (then
``default`` once the script is used up) and records the request. Planned responses are
tuples:

``("stream", deltas, delay_s=0.0, first_delay_s=0.0)``
    The deltas as content chunks. Streaming requests get Server-Sent Events in the OpenAI
    format (a role chunk, one ``data: {chunk}`` per delta, a finish chunk, ``data: [DONE]``),
    ``delay_s`` between content chunks and ``first_delay_s`` before the first one (after
    the role chunk, so the headers arrive at once). Non-streaming requests get one
    ``chat.completion`` with the joined text, after ``first_delay_s``.
``("error", status)``, ``("error", status, message)``, ``("error", status, headers)``,
``("error", status, message, headers)``
    An OpenAI-style error body ``{"error": {"message", "type", "code"}}`` with that status
    and extra headers (e.g. ``{"Retry-After": "0"}``).
``("hang", seconds)``
    Send nothing for ``seconds`` (no status line), then a 504: a server that never answers.
``("drop", deltas)``
    Stream the deltas, then cut the connection without ``[DONE]`` (a failure mid-reply).
``("stream_error", deltas, message)``
    Stream the deltas, then an ``{"error": {...}}`` event, as vLLM and OpenAI do mid-stream.
``("echo",)``
    Stream "You said: <last user message>" word by word (handy as a ``default``).

A script entry may also be a callable taking the ``RecordedRequest`` and returning one of
the tuples above.

With no ``default`` a call past the end of the script gets a 400 "script exhausted", which
an OpenAI client does not retry. ``GET /v1/models`` lists ``models``.

Use from plain asyncio or pytest-asyncio::

    url, state, close = await start_fake_openai([("error", 429), ("stream", ["Hi", "!"])])
    try:
        ...  # AsyncOpenAI(base_url=url, api_key="sk-test")
        assert state.requests[1].messages[-1]["content"] == "hello"
    finally:
        await close()

or build the app with ``make_app(state)`` for pytest-aiohttp's ``aiohttp_server``
(pass ``handler_cancellation=True`` there so client disconnects are seen at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Action = tuple[Any, ...]
ScriptEntry = Action | Callable[["RecordedRequest"], Action]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake server saw it."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def model(self) -> str | None:
        return self.body.get("model")

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def authorization(self) -> str | None:
        """The Authorization header as sent, e.g. ``"Bearer sk-test"``."""
        return self.headers.get("Authorization")


@dataclass
class FakeOpenAIState:
    """The script and what happened. ``disconnected`` is set (and ``disconnects`` counted)
    whenever a client goes away before its response was complete."""

    script: deque[ScriptEntry]
    default: ScriptEntry | None = None
    models: Sequence[str] = ("fake-model",)
    requests: list[RecordedRequest] = field(default_factory=list)
    completed: int = 0
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False

    @property
    def calls(self) -> int:
        return len(self.requests)

    def plan(self, request: RecordedRequest) -> Action:
        entry = self.script.popleft() if self.script else self.default
        if entry is None:
            return ("error", 400, f"fake openai: script exhausted (call {self.calls})")
        return entry(request) if callable(entry) else entry

    def note_disconnect(self) -> None:
        if not self.closing:
            self.disconnects += 1
            self.disconnected.set()


STATE_KEY = web.AppKey("fake_openai_state", FakeOpenAIState)


def make_app(state: FakeOpenAIState) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    return app


async def start_fake_openai(
    script: Iterable[ScriptEntry],
    *,
    default: ScriptEntry | None = None,
    models: Sequence[str] = ("fake-model",),
) -> tuple[str, FakeOpenAIState, Callable[[], Awaitable[None]]]:
    """Serve the script on 127.0.0.1 at a free port.

    Returns the base URL to give an OpenAI client (``http://127.0.0.1:PORT/v1``), the state
    and an async ``close()``."""
    state = FakeOpenAIState(script=deque(script), default=default, models=models)
    runner = web.AppRunner(
        make_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]

    async def close() -> None:
        state.closing = True
        await runner.cleanup()

    return f"http://{host}:{port}/v1", state, close


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in state.models]
    return web.json_response({"object": "list", "data": data})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        body = await request.json()
    except json.JSONDecodeError:
        body = {}
    recorded = RecordedRequest(request.path, body, dict(request.headers))
    state.requests.append(recorded)
    action = state.plan(recorded)
    try:
        response = await _respond(request, recorded, action)
    except (asyncio.CancelledError, ConnectionResetError):
        state.note_disconnect()
        raise
    state.completed += 1
    return response


async def _respond(
    request: web.Request, recorded: RecordedRequest, action: Action
) -> web.StreamResponse:
    kind, *args = action
    if kind == "error":
        return _error(*args)
    if kind == "hang":
        await asyncio.sleep(args[0])
        return _error(504, "fake openai: hung")
    if kind == "echo":
        users = [m for m in recorded.messages if m.get("role") == "user"]
        said = str(users[-1].get("content", "")) if users else ""
        words = f"You said: {said}".split(" ")
        return await _stream(request, recorded, [words[0], *(f" {w}" for w in words[1:])])
    if kind == "stream":
        deltas, delay_s, first_delay_s = _stream_args(*args)
        if not recorded.stream:
            await asyncio.sleep(first_delay_s)
            return web.json_response(_completion(recorded, "".join(deltas)))
        return await _stream(request, recorded, deltas, delay_s, first_delay_s)
    if kind == "drop":
        response = await _stream(request, recorded, args[0], finish=False)
        if request.transport is not None:
            request.transport.abort()
        return response
    if kind == "stream_error":
        deltas, message = args
        error = {"message": message, "type": "server_error", "code": None}
        return await _stream(request, recorded, deltas, error=error)
    raise ValueError(f"unknown fake openai action {action!r}")


def _stream_args(
    deltas: Sequence[str], delay_s: float = 0.0, first_delay_s: float = 0.0
) -> tuple[Sequence[str], float, float]:
    return deltas, delay_s, first_delay_s


def _error(
    status: int,
    message: str | dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if isinstance(message, dict):
        message, headers = None, message
    text = message or f"fake openai: HTTP {status}"
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": text, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def _chunk(recorded: RecordedRequest, delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {
        "id": f"chatcmpl-fake-{id(recorded):x}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": recorded.model or "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _completion(recorded: RecordedRequest, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{id(recorded):x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": recorded.model or "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


async def _stream(
    request: web.Request,
    recorded: RecordedRequest,
    deltas: Sequence[str],
    delay_s: float = 0.0,
    first_delay_s: float = 0.0,
    *,
    finish: bool = True,
    error: dict[str, Any] | None = None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    await response.write(_chunk(recorded, {"role": "assistant", "content": ""}, None))
    for i, delta in enumerate(deltas):
        wait_s = first_delay_s if i == 0 else delay_s
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        await response.write(_chunk(recorded, {"content": delta}, None))
    if error is not None:
        await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
        return response
    if finish:
        await response.write(_chunk(recorded, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
    return response
