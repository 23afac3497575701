"""Audio first under overload: what keeps every call's sound whole when the cores are short.

aiortc encodes every outgoing frame, audio and video alike, with
``loop.run_in_executor(None, encoder.encode, ...)``: on the loop's *default* executor. Under
load, a call's 20 ms Opus frames wait in that queue behind other calls' video encodes of
10-30 ms each, and its sound thins out (33 of 50 frames a second with 5 speaking calls on 2
cores) while the video still flows. :class:`MediaExecutor` replaces the default executor:

- an audio encode (an aiortc audio encoder's ``encode``: Opus about 0.1 ms a frame) runs at
  once, on the calling thread (the event loop), never queued;
- everything else (video encodes, file work) goes to a pool of worker threads that run at a
  lower scheduling priority (``nice``), like the render pool (:func:`background_thread`).

The event-loop thread keeps the normal priority, so the audio tracks' pacing, the audio
sender, RTCP and ICE consent (STUN) get the CPU first; video falls behind first, and its
track skips to the present (``frames_skipped``) rather than queueing stale frames.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from common.threads import name_os_thread

__all__ = [
    "BACKGROUND_NICE",
    "RENDER_JOB_NICE",
    "LoadGovernor",
    "MediaExecutor",
    "background_thread",
    "is_audio_encode",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How much lower than the event loop the worker threads run (Linux nice increment, per thread;
# 0..19). At 10 a busy worker gets about a tenth of the CPU the loop thread gets when both want
# it, and all of it when the loop is idle.
BACKGROUND_NICE = 10
# Render API jobs (clips nobody watches live) run lower still: calls come first.
RENDER_JOB_NICE = 15
# a single wake-up this late is logged: every call's audio waited that long
STALL_NS = 100_000_000

_audio_encoder_types: tuple[type, ...] | None = None


def _audio_encoders() -> tuple[type, ...]:
    global _audio_encoder_types
    if _audio_encoder_types is None:
        from aiortc.codecs.g711 import PcmEncoder
        from aiortc.codecs.opus import OpusEncoder

        _audio_encoder_types = (OpusEncoder, PcmEncoder)
    return _audio_encoder_types


def is_audio_encode(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is the bound ``encode`` of one of aiortc's audio encoders."""
    owner = getattr(fn, "__self__", None)
    return (owner is not None and getattr(fn, "__name__", "") == "encode"
            and isinstance(owner, _audio_encoders()))


def background_thread(nice: int = BACKGROUND_NICE) -> None:
    """Thread initializer: name the OS thread after the Python one, and lower the calling
    thread's scheduling priority by ``nice`` (Linux schedules threads one by one; elsewhere,
    or without permission, nothing changes)."""
    name_os_thread()
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # e.g. a sandbox without the permission
        logger.debug("could not lower a worker thread's priority: %s", exc)


class CountedExecutor(ThreadPoolExecutor):
    """A thread pool that reports its size and its backlog."""

    def stats(self) -> dict[str, int]:
        """``workers`` (at most) and ``pending`` (submitted, not started)."""
        return {"workers": self._max_workers, "pending": self._work_queue.qsize()}


class MediaExecutor(CountedExecutor):
    """The event loop's default executor: audio encodes inline, the rest on lower-priority
    worker threads (``max_workers``; ``nice`` below the loop)."""

    def __init__(self, max_workers: int | None = None, *, nice: int = BACKGROUND_NICE,
                 thread_name_prefix: str = "media") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix,
                         initializer=background_thread, initargs=(nice,))
        self.inline = 0  # audio encodes run at once

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if is_audio_encode(fn):
            self.inline += 1
            future: Future[T] = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting sender
                future.set_exception(exc)
            return future
        return super().submit(fn, *args, **kwargs)


class LoadGovernor:
    """Sheds video when the event loop falls behind, before the audio it paces does.

    :meth:`run` measures how late a short sleep on the loop wakes up (the loop's lag: what an
    audio frame, an RTCP report or an ICE consent check waits on top of its time). The level is
    the median of the last ``window`` samples (1 s), so one stall (a burst of messages, a
    collection) moves nothing, while a loop that is late most of the time does. Past
    ``high_ms`` the video ``stride`` grows by one (at most once per ``step_s``): every call
    renders and sends only every ``stride``-th video frame (25, 12.5, 8.3, 6.25 fps at 25 fps),
    which takes render, encode and packet work off the machine; once the level has stayed under
    ``low_ms`` for ``calm_s``, the stride comes back down a step. ``observe`` is the rule alone
    (tests feed it lags and a clock)."""

    def __init__(self, *, high_ms: float = 10.0, low_ms: float = 3.0, max_stride: int = 4,
                 period_s: float = 0.05, step_s: float = 1.0, calm_s: float = 3.0,
                 window: int = 20) -> None:
        self.high_ns = high_ms * 1e6
        self.low_ns = low_ms * 1e6
        self.max_stride = max(1, max_stride)
        self.period_s = period_s
        self.step_ns = int(step_s * 1e9)
        self.calm_ns = int(calm_s * 1e9)
        self.stride = 1
        self.level_ns = 0
        self.max_lag_ns = 0
        self.raised = 0  # times the stride went up
        self._recent: deque[int] = deque(maxlen=max(1, window))
        self._changed_at: int | None = None
        self._calm_since: int | None = None

    def observe(self, lag_ns: int, now_ns: int) -> int:
        """One lag sample taken at ``now_ns``; returns the stride."""
        lag_ns = max(0, lag_ns)
        self.max_lag_ns = max(self.max_lag_ns, lag_ns)
        if lag_ns >= STALL_NS:
            logger.info("event loop stalled %.0f ms", lag_ns / 1e6)
        self._recent.append(lag_ns)
        ordered = sorted(self._recent)
        self.level_ns = ordered[len(ordered) // 2]
        since_change = None if self._changed_at is None else now_ns - self._changed_at
        if self.level_ns > self.high_ns and len(self._recent) == self._recent.maxlen:
            self._calm_since = None
            if self.stride < self.max_stride and (
                since_change is None or since_change >= self.step_ns
            ):
                self.stride += 1
                self.raised += 1
                self._changed_at = now_ns
                logger.info("event loop %.0f ms behind (median of 1 s): video at 1/%d of its "
                            "frames", self.level_ns / 1e6, self.stride)
        elif self.level_ns < self.low_ns:
            if self._calm_since is None:
                self._calm_since = now_ns
            if self.stride > 1 and now_ns - self._calm_since >= self.calm_ns:
                self.stride -= 1
                self._changed_at = self._calm_since = now_ns
                logger.info("event loop caught up: video at 1/%d of its frames", self.stride)
        else:
            self._calm_since = None
        return self.stride

    async def run(self) -> None:
        """Sample the loop's lag every ``period_s`` until cancelled."""
        while True:
            asked = time.monotonic_ns()
            await asyncio.sleep(self.period_s)
            now = time.monotonic_ns()
            self.observe(now - asked - int(self.period_s * 1e9), now)

    def info(self) -> dict[str, object]:
        ordered = sorted(self._recent)
        p90 = ordered[int(len(ordered) * 0.9)] if ordered else 0
        return {"video_stride": self.stride, "loop_lag_ms": round(self.level_ns / 1e6, 1),
                "loop_lag_p90_ms": round(p90 / 1e6, 1),
                "max_loop_lag_ms": round(self.max_lag_ns / 1e6, 1), "raised": self.raised}
