"""Logging set-up and the session id carried by log records.

``bind_session(id)`` sets a context variable; tasks created afterwards (the session's own and
aiortc's, created while handling its offer) inherit it, so their records carry the id.

``configure_logging(settings)`` installs one handler on the root logger:

- ``server.log_format: json``: one JSON object a line, ``{"ts", "level", "logger", "message",
  "session_id"?, "exception"?, ...extra}`` (``ts`` ISO 8601 UTC with milliseconds);
- ``text``: ``2026-01-01T12:00:00.000Z INFO name: message [session 1a2b3c4d]``.

Every record through it passes a filter that replaces the configured secrets (API keys, the
offer token, the LLM key, TURN credentials and secret) with ``***`` in the final message, the
formatted exception and string ``extra`` fields."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from collections.abc import Iterable
from typing import TextIO

from config import Settings

SESSION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)

REDACTED = "***"
# libraries that log every ICE check or RTP event at INFO: WARNING unless debugging
NOISY_LOGGERS = ("aioice", "aiortc", "libav")
_HANDLER_MARK = "_avatar_rtc_handler"
# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "session_id", "taskName"}


def bind_session(session_id: str | None) -> None:
    SESSION_ID.set(session_id)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in ``settings``, longest first (so a secret that contains another
    is redacted whole)."""
    found = [
        *settings.access.api_keys,
        settings.access.offer_token,
        settings.llm.api_key,
        settings.webrtc.turn_secret,
        *(server.credential for server in settings.webrtc.ice_servers),
    ]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class ContextFilter(logging.Filter):
    """Stamps each record, in the thread and context that logs it, with the session id; and
    redacts ``secrets`` from its final message, exception text and string extras."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = list(secrets)
        self._exc_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = SESSION_ID.get()
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad args: the handler reports it when formatting
            return True
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exc_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS and isinstance(value, str | dict | list | tuple):
                setattr(record, key, _redact_value(value, self.secrets))
        return True


def _redact_value(value: object, secrets: list[str], depth: int = 0) -> object:
    """``value`` with secrets redacted from its strings, inside dicts, lists and tuples too
    (such as aiohttp's access log ``request_header``)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _redact_value(v, secrets, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v, secrets, depth + 1) for v in value)
    return value


def _timestamp(record: logging.LogRecord) -> str:
    t = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text or ""
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}".strip()
    return text or None


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session_id = getattr(record, "session_id", None)
        if session_id is not None:
            out["session_id"] = session_id
        exception = _exception_text(self, record)
        if exception is not None:
            out["exception"] = exception
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in out or key.startswith("_"):
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message [session xxxxxxxx]`` and the traceback below, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        session_id = getattr(record, "session_id", None)
        if session_id:
            line += f" [session {str(session_id)[:8]}]"
        exception = _exception_text(self, record)
        if exception is not None:
            line += "\n" + exception
        return line


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Root logging as ``server.log_level`` and ``server.log_format`` say. Calling it again
    replaces the handler it installed before (other handlers, such as pytest's, are left
    alone). ``stream``: where lines go (default: stderr). Returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(ContextFilter(secrets_of(settings)))
    fmt = settings.server.log_format
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    level = settings.server.log_level.upper()
    root.setLevel(level)
    noisy = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy)
    return handler
