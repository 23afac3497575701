"""What travels over HTTP: JSON request bodies read from untrusted bytes, and the error body
``{error, detail}`` (:class:`ErrorBody`, also its schema in ``/openapi.json``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from common.errors import AvatarServerError, BadJson, BadRequest, ServerFull
from common.inputs import JsonRejected, loads_json, short

logger = logging.getLogger("rtc_server.app")

RETRY_AFTER_S = 5  # what a refused caller is told to wait (Retry-After)
# nginx's "client closed request": what /metrics counts for a client that hung up mid-request
CLIENT_CLOSED_STATUS = 499


class ErrorBody(BaseModel):
    """Every error answer; some carry more fields (a failed render: its job id)."""

    model_config = ConfigDict(title="Error")

    error: str = Field(description="A stable error name.")
    detail: str = Field(description="What went wrong, in plain words.")


def json_error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> (
    web.Response
):
    body = ErrorBody.model_construct(error=error, detail=detail)  # typed by the caller: no check
    return web.json_response(body.model_dump(), status=status, headers=headers)


async def read_json_object(request: web.Request, max_depth: int) -> dict[str, object]:
    """The body as a JSON object: 400 ``bad_json`` for malformed JSON, nesting deeper than
    ``max_depth`` (``server.max_json_depth``), NaN/Infinity or a number no float holds; 413
    past ``server.max_body_bytes``."""
    if request.content_type != "application/json":
        raise BadRequest(
            f"Content-Type must be application/json, not {short(request.content_type)!r}"
        )
    body = await request.read()  # raises 413 past client_max_size
    try:
        data = loads_json(body, max_depth=max_depth)
    except JsonRejected as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure is a JSON ``{error, detail}`` with a fitting status, never a traceback."""
    try:
        return await handler(request)
    except ServerFull as exc:
        return json_error(
            exc.status, exc.code, exc.detail, headers={"Retry-After": str(exc.retry_after_s)}
        )
    except AvatarServerError as exc:
        return json_error(exc.status, exc.code, exc.detail)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(413, "body_too_large", exc.text or "request body too large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            logger.exception("unhandled error on %s %s", request.method, request.path)
            return json_error(500, "internal_error", "the server failed; see its log")
        # the client hung up mid-request: nobody reads this answer, nothing failed here
        logger.info("client disconnected during %s %s", request.method, request.path)
        return json_error(CLIENT_CLOSED_STATUS, "client_closed_request",
                          "the client closed the connection before the answer")
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal_error", "the server failed; see its log")
