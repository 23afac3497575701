"""Video frames ahead of the clock: render each planned frame in a worker thread before its
deadline, so the video track never waits for pixels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace

import cv2
import numpy as np

from media_tracks.clapper import FLASH_LUMA
from media_tracks.clock import MediaClock
from media_tracks.compositor import Compositor, FramePlan

logger = logging.getLogger(__name__)

Yuv = np.ndarray  # (h * 3 // 2, w) uint8, planar I420, limited range


def rgb_to_i420(rgb: np.ndarray) -> Yuv:
    """RGB (h, w, 3) uint8 -> I420 planes stacked as (h*3//2, w), BT.601 limited range
    (what WebRTC decoders assume; OpenCV's conversion is already limited range)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)


def flash_i420(width: int, height: int) -> Yuv:
    yuv = np.full((height * 3 // 2, width), 128, dtype=np.uint8)
    yuv[:height] = FLASH_LUMA
    return yuv


class FaceFrameRenderer:
    """Turns a ``FramePlan`` into an I420 frame with the avatar's idle face and mouth.

    ``face`` is a ``media_tracks.idle.FaceRenderer`` and ``timeline`` an ``IdleTimeline``;
    both are thread-safe, so frames may render concurrently."""

    def __init__(self, face: object, timeline: object, *, width: int, height: int) -> None:
        self._face = face
        self._timeline = timeline
        self._flash = flash_i420(width, height)

    def __call__(self, plan: FramePlan) -> Yuv:
        if plan.flash:
            return self._flash
        pose = self._timeline.pose_at(plan.t_ns)  # type: ignore[attr-defined]
        if plan.mouth > 0:
            pose = replace(pose, mouth_open=plan.mouth)
        rgb = self._face.render(pose)  # type: ignore[attr-defined]
        return rgb_to_i420(rgb)


class FrameProducer:
    """Renders frame ``k`` once media time reaches ``t_k - lead``; ``take(k)`` never waits."""

    def __init__(
        self,
        *,
        clock: MediaClock,
        compositor: Compositor,
        render: Callable[[FramePlan], Yuv],
        lead_ms: int,
        executor: Executor | None,
    ) -> None:
        self._clock = clock
        self._compositor = compositor
        self._render = render
        self._lead_ns = lead_ms * 1_000_000
        self._executor = executor
        self._ready: dict[int, Yuv] = {}
        self._task: asyncio.Task[None] | None = None
        self.rendered = 0
        self.skipped = 0  # frames never rendered because rendering fell behind the clock

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="frames")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._ready.clear()

    async def render_now(self, k: int) -> Yuv:
        """Render frame ``k`` immediately (used once, for the very first frame)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._render, self._compositor.frame_plan(k)
        )

    def take(self, k: int) -> Yuv | None:
        """The frame for index ``k`` if rendered; older frames are dropped."""
        for old in [i for i in self._ready if i < k]:
            del self._ready[old]
        return self._ready.pop(k, None)

    async def _run(self) -> None:
        comp, clock = self._compositor, self._clock
        loop = asyncio.get_running_loop()
        k = comp.frame_at_or_after_ns(clock.now_ns())
        while True:
            now = clock.now_ns()
            if comp.frame_t_ns(k) < now:
                behind = comp.frame_at_or_after_ns(now)
                self.skipped += behind - k
                k = behind
            await clock.sleep_until_ns(comp.frame_t_ns(k) - self._lead_ns)
            plan = comp.frame_plan(k)
            try:
                frame = await loop.run_in_executor(self._executor, self._render, plan)
            except Exception:
                logger.exception("rendering frame %d failed", k)
                k += 1
                continue
            self._ready[k] = frame
            self.rendered += 1
            k += 1
