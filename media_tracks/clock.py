"""The one media clock of a session.

Every track derives its pts from the same epoch and is paced from that epoch:
``deadline = epoch + pts * time_base``. Time is kept as integer nanoseconds; pts are integers
in their own time base (audio: samples at 48 kHz, video: 90 kHz ticks).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from fractions import Fraction

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
NS_PER_S = 1_000_000_000


def pts_to_ns(pts: int, time_base: Fraction) -> int:
    """The first ns at which ``pts`` has been reached (ceil), so that
    ``ns_to_pts(pts_to_ns(p)) == p``."""
    return -((-pts * time_base.numerator * NS_PER_S) // time_base.denominator)


def ns_to_pts(t_ns: int, time_base: Fraction) -> int:
    """The last pts at or before media time ``t_ns`` (floor)."""
    return t_ns * time_base.denominator // (time_base.numerator * NS_PER_S)


def ns_to_pts_ceil(t_ns: int, time_base: Fraction) -> int:
    """The first pts at or after media time ``t_ns``."""
    return -((-t_ns * time_base.denominator) // (time_base.numerator * NS_PER_S))


def samples_to_video_pts(samples: int, sample_rate: int) -> int:
    """Audio position in samples -> 90 kHz video pts (floor)."""
    return samples * VIDEO_CLOCK_RATE // sample_rate


def video_pts_to_samples(video_pts: int, sample_rate: int) -> int:
    """90 kHz video pts -> audio position in samples (floor)."""
    return video_pts * sample_rate // VIDEO_CLOCK_RATE


class MediaClock:
    """Monotonic media clock; ``now_ns()`` is nanoseconds since the epoch.

    The epoch is fixed at construction and never moves afterwards.
    """

    def __init__(self) -> None:
        self._epoch_ns = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._epoch_ns

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        """Sleep until media time ``deadline_ns``; returns at once if it has passed."""
        delay_ns = deadline_ns - self.now_ns()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / NS_PER_S)

    async def sleep_until_pts(self, pts: int, time_base: Fraction) -> None:
        await self.sleep_until_ns(pts_to_ns(pts, time_base))

    async def wait_until_ns(self, deadline_ns: int, event: asyncio.Event) -> None:
        """Sleep until media time ``deadline_ns`` or until ``event`` is set, whichever comes
        first (one timer that sets the event: no task per wait). The event may be left set
        by the timer; the caller clears it before it waits again."""
        if event.is_set():
            return
        delay_ns = deadline_ns - self.now_ns()
        if delay_ns <= 0:
            return
        timer = asyncio.get_running_loop().call_later(delay_ns / NS_PER_S, event.set)
        try:
            await event.wait()
        finally:
            timer.cancel()


class ManualClock(MediaClock):
    """A clock that only moves when a test calls ``advance``; sleepers wake in deadline order."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        return self._now

    async def sleep_until_ns(self, deadline_ns: int) -> None:
        if deadline_ns <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline_ns, next(self._seq), fut))
        await fut

    async def wait_until_ns(self, deadline_ns: int, event: asyncio.Event) -> None:
        if event.is_set() or deadline_ns <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: event.set() if not f.cancelled() else None)
        heapq.heappush(self._sleepers, (deadline_ns, next(self._seq), fut))
        try:
            await event.wait()
        finally:
            if not fut.done():
                fut.cancel()

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, delta_ns: int) -> None:
        """Move time forward by ``delta_ns``, waking every sleeper whose deadline is reached,
        in deadline order, and letting each run before the clock moves past the next one."""
        target = self._now + delta_ns
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
                # let the woken task (and what it awaits without sleeping) run
                for _ in range(8):
                    await asyncio.sleep(0)
        self._now = target
        await asyncio.sleep(0)
