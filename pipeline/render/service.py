"""The render service: cache keys, the job queue's in-flight and waiting requests, cleanup and
shutdown of what follows the jobs (the HTTP routes are ``rtc_server.render_api``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatars.model import BUILTIN_ID, DEFAULT_AVATAR_DIR
from common.errors import NotFound, PipelineError
from config import Settings
from face.library import AVATAR_ID_RE, AvatarLibrary
from pipeline.lipsync import LipSyncEngine
from pipeline.render.cache import CacheEntry, RenderCache
from pipeline.render.jobs import JobQueue, JobState
from pipeline.render.media import decode_audio
from pipeline.render.spec import RenderSpec
from pipeline.tts import TextToSpeech

logger = logging.getLogger(__name__)

RENDER_FORMAT_VERSION = 2  # bump when rendering changes what an identical request produces
WATCH_CLOSE_WAIT_S = 10.0  # shutdown waits this long for job watchers (sockets) to close
CLEANUP_PERIOD_S = 600.0


@dataclass(slots=True)
class RenderRequest:
    """A validated request: the spec fields, the uploaded audio (bytes) and how to answer."""

    avatar_id: str
    text: str | None
    audio: bytes | None
    voice: str
    speed: float
    format: str
    fps: int
    run_async: bool
    priority: int


@dataclass(slots=True)
class RenderService:
    """What the render routes share: the cache, the job queue and what keys are made of."""

    settings: Settings
    library: AvatarLibrary
    cache: RenderCache
    jobs: JobQueue
    voices: Callable[[], list[str]]
    engine_id: str
    uploads: Path
    # identical requests in flight share one job: cache key -> job id
    inflight: dict[str, str] = field(default_factory=dict)
    # who may cancel a job: one secret per request that made or joined it (job id -> tokens)
    waiters: dict[str, set[str]] = field(default_factory=dict)
    # what follows a job until its end (the job WebSockets) -> job id; the tasks that serve
    # them (awaited at shutdown)
    watchers: dict[object, str] = field(default_factory=dict)
    watcher_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # shutdown: closing is set first (watchers then close), stopping once jobs are settled
    closing: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    close_renderer: Callable[[], None] | None = None
    _avatar_digests: dict[str, tuple[float, str]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    # --- cache keys -------------------------------------------------------------------------
    def avatar_digest(self, avatar_id: str) -> str:
        """sha256 over the avatar folder's files (names and bytes); recomputed when the
        folder changes (blocking: call from an executor)."""
        folder = DEFAULT_AVATAR_DIR if avatar_id == BUILTIN_ID else self.library.store.folder(
            avatar_id
        )
        if folder is None:
            raise NotFound(f"no avatar with id {avatar_id!r}")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        stamp = max((p.stat().st_mtime for p in files), default=0.0) + len(files)
        cached = self._avatar_digests.get(avatar_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
        digest = h.hexdigest()
        self._avatar_digests[avatar_id] = (stamp, digest)
        return digest

    def cache_key(self, req: RenderRequest, avatar_digest: str) -> str:
        """sha256 of everything that changes the output."""
        media, render = self.settings.media, self.settings.render
        content = (
            {"text": req.text}
            if req.text is not None
            else {"audio_sha256": hashlib.sha256(req.audio or b"").hexdigest()}
        )
        parts = {
            "version": RENDER_FORMAT_VERSION,
            "avatar": avatar_digest,
            **content,
            "voice": req.voice,
            "voice_file": self.settings.engines.piper_voice,
            "speed": round(req.speed, 4),
            "engine": self.engine_id,
            "fps": req.fps,
            "format": req.format,
            "size": [media.video_width, media.video_height],
            "sample_rate": media.audio_sample_rate,
            "crossfade": media.crossfade_frames,
            "encoder": [render.h264_preset, render.h264_crf, render.vp9_crf],
            # the speaking head motion (face/expression.py)
            "expression": (self.settings.expression.strength
                           if self.settings.expression.enabled else 0.0),
        }
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    # --- jobs ---------------------------------------------------------------------------------
    async def key_of(self, req: RenderRequest) -> str:
        """The request's cache key; NotFound for an avatar that is not there."""
        if not AVATAR_ID_RE.fullmatch(req.avatar_id) or not self.library.exists(req.avatar_id):
            raise NotFound(f"no avatar with id {req.avatar_id[:40]!r}")
        loop = asyncio.get_running_loop()
        digest = await loop.run_in_executor(None, self.avatar_digest, req.avatar_id)
        return self.cache_key(req, digest)

    async def save_upload(self, audio: bytes) -> Path:
        """The uploaded audio, saved for a worker (the caller removes it unless a job takes
        it)."""
        upload = self.uploads / f"{uuid.uuid4().hex}.bin"
        await asyncio.get_running_loop().run_in_executor(None, upload.write_bytes, audio)
        return upload

    async def check_upload(self, upload: Path) -> None:
        """Decode the upload now, so a file that is not audio (or too long) is refused at
        once, async requests included."""
        check = functools.partial(
            decode_audio, upload, sample_rate=8000, max_seconds=self.settings.render.max_audio_s
        )
        await asyncio.get_running_loop().run_in_executor(None, check)

    async def cached(self, key: str) -> CacheEntry | None:
        return await asyncio.get_running_loop().run_in_executor(None, self.cache.get, key)

    async def submit_or_join(
        self, req: RenderRequest, key: str, upload: Path | None
    ) -> tuple[JobState, bool]:
        """The job rendering ``key``: one in flight for an identical request, else a new one.
        The flag says whether the new job took ``upload`` (its follower removes it)."""
        job_id = self.inflight.get(key)
        state = await self.jobs.get(job_id) if job_id else None
        if state is not None and not state.terminal:
            return state, False
        spec = RenderSpec(
            avatar_id=req.avatar_id,
            text=req.text,
            audio_path=str(upload) if upload else None,
            voice=req.voice,
            speed=req.speed,
            format=req.format,
            fps=req.fps,
            cache_key=key,
        )
        state = await self.jobs.submit(spec, priority=req.priority)
        self.inflight[key] = state.id
        self.spawn(self.follow(state.id, key, upload))
        return state, upload is not None

    # --- cancel tokens ----------------------------------------------------------------------
    def add_waiter(self, job_id: str) -> str:
        """A new cancel token for one request that made or joined ``job_id``."""
        token = secrets.token_urlsafe(24)
        self.waiters.setdefault(job_id, set()).add(token)
        return token

    def waiter_of(self, job_id: str, given: str) -> str | None:
        """The job's token equal to ``given`` (compared in constant time), or None."""
        found = None
        for token in self.waiters.get(job_id, ()):
            if hmac.compare_digest(token.encode(), given.encode()):
                found = token
        return found

    def remove_waiter(self, job_id: str, token: str) -> int:
        """Detach one waiter; returns how many are left."""
        left = self.waiters.get(job_id, set())
        left.discard(token)
        if not left:
            self.waiters.pop(job_id, None)
        return len(left)

    async def close_watchers(self, wait_s: float = WATCH_CLOSE_WAIT_S) -> None:
        """Shutdown: every watcher is to send its job's final state and close (each by its own
        task, which sees ``closing`` and then ``stopping``); waits up to ``wait_s`` for them.
        In-process jobs are cancelled first (cleanup would cancel them anyway), so their
        watchers see ``cancelled``; Redis jobs go on elsewhere, so theirs get the current
        state."""
        self.closing = True
        if self.settings.jobs.backend == "local":
            watched = set(self.watchers.values())
            await asyncio.gather(*(self.jobs.cancel(j) for j in watched), return_exceptions=True)
        self.stopping.set()
        if self.watcher_tasks:
            await asyncio.wait(set(self.watcher_tasks), timeout=wait_s)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop the job queue (running local jobs are cancelled) and release the renderer."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.aclose()
        if self.close_renderer is not None:
            await asyncio.to_thread(self.close_renderer)

    async def cleanup(self) -> dict[str, int]:
        """Expired cache entries, the size cap, stale staging folders and old uploads."""
        loop = asyncio.get_running_loop()
        report = dict(await loop.run_in_executor(None, self.cache.cleanup))
        report["uploads_removed"] = await loop.run_in_executor(None, self.remove_old_uploads)
        return report

    async def cleanup_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                report = await self.cleanup()
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the next one
                logger.exception("cache cleanup failed")
                continue
            if any(report.values()):
                logger.info("cache cleanup: %s", report)

    async def follow(self, job_id: str, key: str, upload: Path | None) -> None:
        """Once the job is over: forget it as in flight and remove its uploaded audio."""
        try:
            async for state in self.jobs.subscribe(job_id):
                if state.terminal:
                    break
        finally:
            if self.inflight.get(key) == job_id:
                del self.inflight[key]
            self.waiters.pop(job_id, None)
            if upload is not None:
                await asyncio.to_thread(upload.unlink, missing_ok=True)

    def remove_old_uploads(self) -> int:
        """Uploaded audio older than ``jobs.keep_finished_s`` (left by a restart)."""
        limit = time.time() - self.settings.jobs.keep_finished_s
        removed = 0
        for p in self.uploads.glob("*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed


CLEANUP_PERIOD_S = 600.0


async def start_render_service(
    settings: Settings, library: AvatarLibrary, lipsync: LipSyncEngine, tts: TextToSpeech
) -> RenderService:
    """The cache, the job queue (with this process's workers, if any) and the renderer they
    run, sharing the server's avatars, voice and lip-sync engine."""
    from pipeline.render.core import ClipRenderer
    from pipeline.render.jobs import create_cache
    from pipeline.render.queues import create_job_queue

    jobs_cfg = settings.jobs
    if jobs_cfg.backend == "local" and jobs_cfg.workers < 1:
        raise PipelineError(
            "jobs.workers is 0 with jobs.backend local: nothing would ever render; set "
            "jobs.workers >= 1, or jobs.backend: redis with separate worker processes"
        )
    clip = ClipRenderer(settings, library=library, lipsync=lipsync, tts=tts)
    loop = asyncio.get_running_loop()
    cache = await loop.run_in_executor(None, create_cache, settings)
    uploads = cache.root / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    jobs = create_job_queue(settings, cache, clip.render if jobs_cfg.workers > 0 else None)
    await jobs.start()
    svc = RenderService(
        settings=settings,
        library=library,
        cache=cache,
        jobs=jobs,
        voices=clip.voices,
        engine_id=json.dumps(clip.identity(), sort_keys=True, default=str),
        uploads=uploads,
        close_renderer=clip.close,
    )
    svc.spawn(svc.cleanup_every(CLEANUP_PERIOD_S))
    return svc


