"""HTTP API for avatars: register (upload), list, inspect, thumbnail, delete.

``POST /avatars``                 multipart/form-data with parts ``file`` and ``name``.
                                  201 ``{id, name, frames, fps, width, height, quality,
                                  created: true, created_at, source_hash, builtin: false}``;
                                  200 with ``created: false`` and the existing avatar when
                                  the same content was registered before. The upload is
                                  streamed and refused with 413 as soon as it passes
                                  ``avatars.max_upload_bytes``. The answer comes once the
                                  avatar is prepared (synchronous; the page shows the upload
                                  progress from its XHR, then waits).
``GET /avatars``                  ``{"avatars": [...]}``: the built-in ``default`` first
                                  (``builtin: true``), then registered ones, oldest first.
``GET /avatars/{id}``             one avatar's metadata and quality report.
``GET /avatars/{id}/thumbnail``   ``image/jpeg``.
``DELETE /avatars/{id}``          200 ``{id, deleted: true}``; 409 ``avatar_in_use`` while a
                                  live session shows it; 403 ``builtin_avatar`` for
                                  ``default`` and 403 ``default_avatar`` for the avatar set as
                                  ``avatars.default``; 404 for an unknown id.

Ids other than ``default`` and ``av_`` + 12 hex digits are a 404 before any file-system or
registry access. Every error is the app's JSON ``{error, detail}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from aiohttp import BodyPartReader, web

from avatars.media_output import make_thumbnail
from avatars.model import BUILTIN_ID, DEFAULT_AVATAR_DIR, AvatarError
from avatars.registration import RegistrationService, UploadTooLarge
from avatars.store import AvatarRecord, AvatarStore
from common.errors import AvatarServerError, BadRequest, NotFound
from config.settings import AvatarSettings
from face.library import AVATAR_ID_RE, AvatarLibrary
from rtc_server.multipart import MALFORMED_MULTIPART, read_part

__all__ = ["AvatarApi", "AvatarInUse", "Forbidden", "add_avatar_routes"]

# Room for the multipart framing and the name part on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_PART_BYTES = 4096


class AvatarInUse(AvatarServerError):
    status = 409
    code = "avatar_in_use"


class Forbidden(AvatarServerError):
    status = 403
    code = "forbidden"

    def __init__(self, detail: str, *, code: str = "forbidden") -> None:
        super().__init__(detail)
        self.code = code


logger = logging.getLogger(__name__)


@dataclass
class AvatarApi:
    """What the handlers need; built in the app's start-up (``rtc_server.app``).

    ``sessions`` is the app's live-session dict (values have ``.avatar.avatar_id``)."""

    settings: AvatarSettings
    store: AvatarStore
    library: AvatarLibrary
    service: RegistrationService
    sessions: dict[str, Any]
    _builtin: dict[str, Any] | None = field(default=None, init=False)
    _builtin_thumbnail: bytes | None = field(default=None, init=False)
    _warming: dict[str, asyncio.Future[Any]] = field(default_factory=dict, init=False)
    # avatars deleted while their preload ran: the preload drops what it loaded, quietly
    _deleted: set[str] = field(default_factory=set, init=False)

    def warm(self, avatar_id: str) -> None:
        """Load a just-registered avatar in the background, so its first call starts as fast
        as any other (a 10 s video loop takes seconds to decode and fit), when it fits
        ``avatars.memory_budget_mb`` beside the avatars calls hold (``library.preload``). A
        delete meanwhile (:meth:`unwarm`) makes the preload stop or drop its result without
        an error."""

        def load() -> None:
            if avatar_id in self._deleted:
                return
            try:
                self.library.preload(avatar_id)
            except Exception:  # noqa: BLE001 - a call would report it; here only log
                if avatar_id in self._deleted or self.store.get(avatar_id) is None:
                    logger.debug("avatar %s was deleted while preloading", avatar_id)
                    return
                logger.exception("preloading avatar %s failed", avatar_id)
                return
            if avatar_id in self._deleted:  # deleted while it loaded: do not keep it
                self.library.forget(avatar_id)

        if avatar_id in self._warming:
            return
        fut = asyncio.get_running_loop().run_in_executor(None, load)
        self._warming[avatar_id] = fut

        def done(_: asyncio.Future[Any]) -> None:  # the thread has finished: forget both
            self._warming.pop(avatar_id, None)
            self._deleted.discard(avatar_id)

        fut.add_done_callback(done)

    def unwarm(self, avatar_id: str) -> None:
        """``avatar_id`` is being deleted: a preload not yet finished loads nothing more and
        keeps nothing (call before the files go)."""
        if avatar_id in self._warming:
            self._deleted.add(avatar_id)

    def builtin(self) -> dict[str, Any]:
        """The built-in avatar as a list entry (read once; blocking)."""
        if self._builtin is None:
            meta = json.loads((DEFAULT_AVATAR_DIR / "avatar.json").read_text(encoding="utf-8"))
            image = cv2.imread(str(DEFAULT_AVATAR_DIR / meta["image"]), cv2.IMREAD_COLOR)
            if image is None:
                raise AvatarError("cannot read the built-in avatar image")
            rgb = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)
            self._builtin_thumbnail = make_thumbnail(rgb)
            self._builtin = {
                "id": BUILTIN_ID,
                "name": str(meta.get("name", BUILTIN_ID)),
                "frames": 1,
                "fps": 0.0,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "quality": {},
                "created_at": None,
                "source_hash": None,
                "builtin": True,
            }
        return dict(self._builtin)

    def builtin_thumbnail(self) -> bytes:
        self.builtin()
        assert self._builtin_thumbnail is not None
        return self._builtin_thumbnail


def _entry(record: AvatarRecord) -> dict[str, Any]:
    out = record.to_dict()
    out["builtin"] = False
    return out


def _avatar_id(request: web.Request) -> str:
    """The id from the path, or NotFound for anything that is not an avatar id."""
    avatar_id = request.match_info.get("avatar_id", "")
    if not AVATAR_ID_RE.fullmatch(avatar_id):
        raise NotFound("no such avatar")
    return avatar_id


async def _read_upload(request: web.Request, limit: int) -> tuple[bytes, str]:
    """The ``file`` and ``name`` parts, reading no more than ``limit`` bytes of file."""
    if request.content_length is not None and (
        request.content_length > limit + MULTIPART_OVERHEAD_BYTES
    ):
        raise UploadTooLarge(
            f"the upload is {request.content_length} bytes; at most {limit} are accepted"
        )
    if request.content_type != "multipart/form-data":
        raise BadRequest(
            "Content-Type must be multipart/form-data (parts 'file' and 'name'), not "
            f"{request.content_type!r}"
        )
    data: bytes | None = None
    name: str | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            if part.name == "file":
                if data is not None:
                    raise BadRequest("more than one 'file' part")
                data = await read_part(
                    part,
                    limit,
                    UploadTooLarge(f"the file is over the limit of {limit} bytes"),
                )
            else:
                raw = await read_part(
                    part,
                    MAX_NAME_PART_BYTES,
                    BadRequest(f"part {part.name!r} is too long"),
                )
                if part.name == "name":
                    if name is not None:
                        raise BadRequest("more than one 'name' part")
                    try:
                        name = raw.decode(part.get_charset(default="utf-8"))
                    except (LookupError, UnicodeDecodeError) as exc:
                        raise BadRequest(f"field 'name' is not valid text: {exc}") from None
    except MALFORMED_MULTIPART as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if data is None:
        raise BadRequest("multipart part 'file' (the image or video) is required")
    if name is None:
        raise BadRequest("multipart part 'name' is required")
    return data, name


async def handle_create(api: AvatarApi, request: web.Request) -> web.Response:
    data, name = await _read_upload(request, api.settings.max_upload_bytes)
    record, created = await api.service.register(data, name)
    api.warm(record.id)
    body = _entry(record)
    body["created"] = created
    return web.json_response(body, status=201 if created else 200)


async def handle_list(api: AvatarApi, request: web.Request) -> web.Response:
    builtin = await asyncio.to_thread(api.builtin)
    records = await asyncio.to_thread(api.store.list)
    return web.json_response({"avatars": [builtin, *(_entry(r) for r in records)]})


async def handle_get(api: AvatarApi, request: web.Request) -> web.Response:
    avatar_id = _avatar_id(request)
    if avatar_id == BUILTIN_ID:
        return web.json_response(await asyncio.to_thread(api.builtin))
    record = await asyncio.to_thread(api.store.get, avatar_id)
    if record is None:
        raise NotFound(f"no avatar with id {avatar_id!r}")
    return web.json_response(_entry(record))


async def handle_thumbnail(api: AvatarApi, request: web.Request) -> web.Response:
    avatar_id = _avatar_id(request)
    if avatar_id == BUILTIN_ID:
        jpeg: bytes | None = await asyncio.to_thread(api.builtin_thumbnail)
    else:
        jpeg = await asyncio.to_thread(api.store.thumbnail, avatar_id)
    if jpeg is None:
        raise NotFound(f"no avatar with id {avatar_id!r}")
    return web.Response(
        body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
    )


async def handle_delete(api: AvatarApi, request: web.Request) -> web.Response:
    avatar_id = _avatar_id(request)
    if avatar_id == BUILTIN_ID:
        raise Forbidden("the built-in avatar cannot be deleted", code="builtin_avatar")
    if avatar_id == api.settings.default:
        raise Forbidden(
            f"{avatar_id} is the server's default avatar (avatars.default); change the setting "
            "first",
            code="default_avatar",
        )
    record = await asyncio.to_thread(api.store.get, avatar_id)
    if record is None:
        raise NotFound(f"no avatar with id {avatar_id!r}")
    users = [
        sid
        for sid, session in list(api.sessions.items())
        if getattr(getattr(session, "avatar", None), "avatar_id", None) == avatar_id
    ]
    if users:
        raise AvatarInUse(
            f"avatar {avatar_id} is used by {len(users)} live session(s); end them first"
        )
    api.unwarm(avatar_id)
    deleted = await asyncio.to_thread(api.store.delete, avatar_id)
    api.library.forget(avatar_id)
    if not deleted:  # deleted meanwhile by another request or process
        raise NotFound(f"no avatar with id {avatar_id!r}")
    return web.json_response({"id": avatar_id, "deleted": True})


def add_avatar_routes(app: web.Application, api_of: Callable[[web.Request], AvatarApi]) -> None:
    """The avatar routes; ``api_of`` finds the request's application's AvatarApi."""

    def route(handler: Callable[[AvatarApi, web.Request], Awaitable[web.Response]]) -> (
        Callable[[web.Request], Awaitable[web.Response]]
    ):
        async def handle(request: web.Request) -> web.Response:
            return await handler(api_of(request), request)

        return handle

    app.router.add_post("/avatars", route(handle_create))
    app.router.add_get("/avatars", route(handle_list))
    app.router.add_get("/avatars/{avatar_id}", route(handle_get))
    app.router.add_get("/avatars/{avatar_id}/thumbnail", route(handle_thumbnail))
    app.router.add_delete("/avatars/{avatar_id}", route(handle_delete))
