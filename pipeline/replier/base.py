"""The ``Replier`` interface, its error and the conversation history it reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from common.errors import PipelineError

if TYPE_CHECKING:
    pass

Message = dict[str, str]
"""One conversation turn: ``{"role": "user" | "assistant", "content": text}``."""

LANGUAGE_NAMES = {
    "en": "English",
    "fa": "Persian",
    "ar": "Arabic",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "pt": "Portuguese",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}


class Replier(Protocol):
    name: str

    def reply(
        self, history: Sequence[Message], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        """Answer ``text`` (the user's new turn, in ``language``, an ISO 639-1 code) after
        ``history`` (earlier turns, oldest first), yielding text deltas as they arrive.

        Implementations are async generators. Close the iterator (``contextlib.aclosing``)
        or cancel the task consuming it to stop a reply early, e.g. on barge-in."""
        ...

    def info(self) -> dict[str, Any]:
        """What to report on /health: the implementation and its settings, never secrets."""
        ...

    async def aclose(self) -> None:
        """Release what the replier holds (an HTTP connection pool); called once, when its
        call ends."""
        ...


class ReplyError(PipelineError):
    """A reply failed. ``retryable``: the failure was transient (rate limit, server error,
    timeout, connection), so the same turn may succeed later. ``status``: the upstream
    HTTP status, None when there was no HTTP answer (timeout, connection error)."""

    code = "reply_error"

    def __init__(self, detail: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(detail)
        self.retryable = retryable
        # Unlike AvatarServerError.status (what to answer our own clients with), this is the
        # upstream's status; a reply is never an HTTP answer of ours.
        self.status = status  # type: ignore[assignment]




def trim_history(history: Sequence[Message], turns: int) -> list[Message]:
    """The last ``turns`` user messages of ``history`` with the assistant answers after
    them; messages with other roles are left out."""
    kept: list[Message] = []
    users = 0
    for message in reversed(history):
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        if role == "user":
            users += 1
            if users > turns:
                break
        elif users >= turns:
            break  # an answer to a user turn that is no longer kept
        kept.append({"role": role, "content": message.get("content", "")})
    kept.reverse()
    return kept


