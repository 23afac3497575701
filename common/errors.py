"""Errors raised by the media pipeline and the server; each carries what a client needs."""

from __future__ import annotations


class AvatarServerError(Exception):
    """Base error. ``status`` is the HTTP status to answer with, ``code`` a stable error name,
    ``retryable`` whether the same request may succeed later."""

    status = 500
    code = "internal_error"
    retryable = False

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class PipelineError(AvatarServerError):
    code = "pipeline_error"


class BadRequest(AvatarServerError):
    status = 400
    code = "bad_request"


class BadJson(BadRequest):
    """The body or message is not JSON the server accepts (malformed, nested too deep, NaN,
    a number out of range)."""

    code = "bad_json"


class NotFound(AvatarServerError):
    status = 404
    code = "not_found"


class LipSyncUnavailable(PipelineError):
    """The lip-sync engine cannot run now, but may later: its inference pool is unreachable,
    slow or failing. A call degrades to the viseme engine instead of giving it up."""


class ServerFull(AvatarServerError):
    status = 503
    code = "server_full"
    retryable = True

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Overloaded(ServerFull):
    """The measured headroom cannot carry one more call (``rtc_server.headroom``)."""

    code = "overloaded"


class ShuttingDown(ServerFull):
    """The server is draining for a shutdown: no new sessions."""

    code = "shutting_down"


class AvatarUnavailable(AvatarServerError):
    """A registered avatar whose files cannot be loaded (damaged or removed on disk)."""

    status = 500
    code = "avatar_unavailable"


class NoCapacity(ServerFull):
    """A front found no ready node with room for one more call."""

    code = "no_capacity"


class SessionGone(AvatarServerError):
    """The session was on a node that stopped answering (it crashed or was killed)."""

    status = 410
    code = "session_gone"


class NodeUnavailable(AvatarServerError):
    """A front could not reach the node a request belongs to, or it did not answer in time."""

    status = 502
    code = "node_unavailable"
