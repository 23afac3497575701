"""Health, readiness and metrics routes, and the hooks that feed the metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def http_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


def session_event_hook(app: web.Application) -> Callable[[Any, dict[str, object]], None]:
    """Called with (session, event) for every event a session sends to its client."""

    def hook(session: Any, event: dict[str, object]) -> None:
        return None

    return hook


async def handle_health(request: web.Request) -> web.Response:
    from rtc_server.app import LIPSYNC, SESSIONS, SETTINGS, STT

    return web.json_response(
        {
            "status": "ok",
            "sessions": len(request.app[SESSIONS]),
            "lipsync": request.app[LIPSYNC].info(),
            "listening": request.app[STT] is not None,
            "replier": "embedded" if request.app[SETTINGS].llm.base_url is None else "openai",
        }
    )


def add_observability_routes(app: web.Application) -> None:
    app.router.add_get("/health", handle_health)
