"""Access control: API keys for admin routes, the optional offer token, CORS and
per-client rate limits."""

from __future__ import annotations

from config import Settings


def access_middlewares(settings: Settings) -> list[object]:
    return []
