"""Reading multipart/form-data parts with a size limit."""

from __future__ import annotations

from aiohttp import BodyPartReader
from aiohttp.http_exceptions import HttpProcessingError

CHUNK_BYTES = 256 * 1024


async def read_part(part: BodyPartReader, limit: int, too_large: Exception) -> bytes:
    """The part's bytes; ``too_large`` is raised as soon as more than ``limit`` arrive."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


# What aiohttp's multipart reader raises on a malformed body: bad framing (ValueError,
# AssertionError) or a bad part header, such as a control character in a part's name
# (InvalidHeader, an HttpProcessingError). Each is the client's mistake: 400.
MALFORMED_MULTIPART: tuple[type[Exception], ...] = (
    ValueError,
    AssertionError,
    HttpProcessingError,
)
