"""Logging set-up and the session id carried by log records.

``bind_session(id)`` sets a context variable; tasks created afterwards (the session's own and
aiortc's, created while handling its offer) inherit it, so their records carry the id."""

from __future__ import annotations

import contextvars
import logging

from config import Settings

SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)


def bind_session(session_id: str | None) -> None:
    SESSION_ID.set(session_id)


def configure_logging(settings: Settings) -> None:
    """Root logging as ``server.log_level`` and ``server.log_format`` say."""
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
