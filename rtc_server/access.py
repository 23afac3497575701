"""Access control: API keys for admin routes, the optional offer token, CORS and
per-client rate limits."""

from __future__ import annotations

from aiohttp import web

from config import Settings


def install_access(app: web.Application, settings: Settings) -> None:
    """Add the access middlewares (inside the error middleware) and response signals."""
    return None
