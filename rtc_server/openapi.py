"""The OpenAPI description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from aiohttp import web


def add_openapi_route(app: web.Application) -> None:
    return None
