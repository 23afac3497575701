"""The web pages (the call page, avatar registration) and their files under ``web/``,
served the same by a server and by a front."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from common.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


async def handle_web_file(request: web.Request) -> web.FileResponse:
    """A file of the pages; anything else (a missing file, a path out of web/) is a JSON 404."""
    path = (WEB_DIR / request.match_info["name"]).resolve()
    if not path.is_relative_to(WEB_DIR) or not path.is_file():
        raise NotFound("no such file")
    return web.FileResponse(path)


async def handle_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def handle_register(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "register.html")
