"""Registering an avatar from uploaded bytes: checks, de-duplication, decode, prepare, store.

Used by the HTTP API (``POST /avatars``) and the CLI (``python -m avatars register``).
Every slow step (hashing, decoding, face analysis, encoding, writing) runs on worker threads,
never on the event loop; registrations run one at a time on a dedicated thread (they are
CPU-heavy and the face analyzer is not shared between threads).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from avatars.analysis import create_analyzer
from avatars.media_input import DecodedMedia, UnsupportedMedia, sniff_and_decode
from avatars.prepare import prepare_avatar
from avatars.store import MAX_NAME_CHARS, AvatarRecord, AvatarStore, DuplicateSource, PreparedLike
from common.errors import AvatarServerError, BadRequest
from common.inputs import clean_text
from config.settings import AvatarSettings

__all__ = [
    "PrepareFn",
    "ProgressFn",
    "RegistrationService",
    "UploadTooLarge",
    "clean_name",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# progress(stage, fraction): stage is "decode", "analyse" or "store"; fraction in 0..1.
ProgressFn = Callable[[str, float], None]


class PrepareFn(Protocol):
    """``avatars.prepare.prepare_avatar``'s shape (LAYOUT.md): ``progress(fraction)``."""

    def __call__(
        self,
        media: DecodedMedia,
        analyzer: Any,
        *,
        crop_size: int = ...,
        progress: Callable[[float], None] | None = ...,
        quality_thresholds: Mapping[str, Any] | None = ...,
    ) -> PreparedLike: ...


class UploadTooLarge(AvatarServerError):
    status = 413
    code = "too_large"


def clean_name(name: object) -> str:
    """The display name, stripped; BadRequest unless it has 1..100 characters and none of
    them is a control character, a lone surrogate or a bidirectional override."""
    if not isinstance(name, str):
        raise BadRequest("field 'name' is required")
    cleaned = name.strip()
    if not cleaned:
        raise BadRequest("field 'name' must not be empty")
    if len(cleaned) > MAX_NAME_CHARS:
        raise BadRequest(f"field 'name' must be at most {MAX_NAME_CHARS} characters")
    if clean_text(cleaned) != cleaned:
        raise BadRequest("field 'name' must not contain control characters")
    return cleaned


class RegistrationService:
    """Registers uploads into ``store``.

    ``prepare`` (default ``avatars.prepare.prepare_avatar``) and ``analyzer_factory``
    (default ``avatars.analysis.create_analyzer`` with the configured backend) are injectable
    for tests. The analyzer is created on first use, on the worker thread, and reused (the
    worker is a single thread, so analyzer calls never overlap)."""

    def __init__(
        self,
        store: AvatarStore,
        settings: AvatarSettings,
        *,
        prepare: PrepareFn | None = None,
        analyzer_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._prepare: PrepareFn = prepare if prepare is not None else prepare_avatar
        self._analyzer_factory = analyzer_factory
        self._analyzer: Any = None
        self._analyzer_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="register")
        self._hash_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def close(self) -> None:
        """Stop the worker thread (waits for a registration in progress)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ async API

    async def register(
        self, data: bytes, name: str, progress: ProgressFn | None = None
    ) -> tuple[AvatarRecord, bool]:
        """Register ``data`` as an avatar named ``name``.

        Returns ``(record, created)``: ``created`` is False when the same content was
        registered before (its record is returned unchanged, whatever ``name`` says).
        Raises BadRequest (400) for a bad name, UploadTooLarge (413), UnsupportedMedia (415),
        MediaTooLong / MediaTooLarge / RegistrationRefused (422)."""
        cleaned = clean_name(name)
        limit = self.settings.max_upload_bytes
        if len(data) > limit:
            raise UploadTooLarge(f"the file is {len(data)} bytes; at most {limit} are accepted")
        if not data:
            raise UnsupportedMedia("the file is empty")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        async with self._locked(digest):
            existing = await self._run(self.store.find_by_hash, digest)
            if existing is not None:
                return existing, False
            try:
                record = await self._run(self._register_blocking, data, cleaned, digest, progress)
            except DuplicateSource as dup:  # registered meanwhile by another process
                return dup.existing, False
        logger.info("avatar %s registered (%r, %d frames)", record.id, record.name, record.frames)
        return record, True

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def _locked(self, digest: str) -> AsyncIterator[None]:
        """One registration per content at a time (the UNIQUE constraint backs this up)."""
        lock, users = self._hash_locks.get(digest, (asyncio.Lock(), 0))
        self._hash_locks[digest] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._hash_locks[digest]
            if users <= 1:
                del self._hash_locks[digest]
            else:
                self._hash_locks[digest] = (lock, users - 1)

    # ------------------------------------------------------------------ worker thread

    def analyzer(self) -> Any:
        with self._analyzer_lock:
            if self._analyzer is None:
                factory = self._analyzer_factory
                if factory is None:
                    backend = self.settings.analyzer
                    root = self.settings.insightface_root

                    def factory() -> Any:
                        return create_analyzer(backend, insightface_root=root)

                self._analyzer = factory()
            return self._analyzer

    def _call_prepare(
        self, media: DecodedMedia, progress: ProgressFn | None
    ) -> PreparedLike:
        on_progress: Callable[[float], None] | None = None
        if progress is not None:

            def on_progress(fraction: float) -> None:
                progress("analyse", min(1.0, max(0.0, float(fraction))))

        return self._prepare(
            media,
            self.analyzer(),
            crop_size=self.settings.crop_size,
            progress=on_progress,
            # avatars.min_face_px reaches the quality check
            quality_thresholds={
                "min_face_px": self.settings.min_face_px,
                "multiple_face_ratio": self.settings.multiple_face_ratio,
            },
        )

    def _register_blocking(
        self, data: bytes, name: str, digest: str, progress: ProgressFn | None
    ) -> AvatarRecord:
        existing = self.store.find_by_hash(digest)
        if existing is not None:  # an earlier request for it finished meanwhile
            raise DuplicateSource(existing)
        if progress is not None:
            progress("decode", 0.0)
        media = sniff_and_decode(data, max_video_s=self.settings.max_video_s)
        if progress is not None:
            progress("decode", 1.0)
        prepared = self._call_prepare(media, progress)
        on_store: Callable[[float], None] | None = None
        if progress is not None:
            on_store = lambda f: progress("store", f)  # noqa: E731
            on_store(0.0)
        record = self.store.save(prepared, name=name, source_hash=digest, progress=on_store)
        if on_store is not None:
            on_store(1.0)
        return record

    # ------------------------------------------------------------------ queries (blocking)

    def get(self, avatar_id: str) -> AvatarRecord | None:
        return self.store.get(avatar_id)

    def list(self) -> list[AvatarRecord]:
        return self.store.list()

    def delete(self, avatar_id: str) -> bool:
        return self.store.delete(avatar_id)
