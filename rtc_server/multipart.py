"""Reading multipart/form-data parts with a size limit."""

from __future__ import annotations

from aiohttp import BodyPartReader

CHUNK_BYTES = 256 * 1024


async def read_part(part: BodyPartReader, limit: int, too_large: Exception) -> bytes:
    """The part's bytes; ``too_large`` is raised as soon as more than ``limit`` arrive."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)
