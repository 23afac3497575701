"""What travels over HTTP: JSON request bodies read from untrusted bytes, and the error body
``{error, detail}`` (:class:`ErrorBody`, also its schema in ``/openapi.json``)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from common.errors import BadJson, BadRequest
from common.inputs import JsonRejected, loads_json, short


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
