"""Logging set-up and the session id carried by log records.

``bind_session(id)`` sets a context variable; tasks created afterwards (the session's own and
aiortc's, created while handling its offer) inherit it, so their records carry the id."""

from __future__ import annotations

import contextvars
import logging

SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)


def bind_session(session_id: str | None) -> None:
    SESSION_ID.set(session_id)


def configure_logging(level: str, fmt: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
