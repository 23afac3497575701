"""Admission from measured headroom: a new call is refused while the machine cannot carry it,
instead of letting every call stutter.

``sessions.max_concurrent`` is a fixed count; what a call costs depends on the machine, the
lip-sync engine and how much the calls talk, and the machine may be shared. Every second
``Headroom.sample`` measures, over the last ``WINDOW_S``:

* **deadlines**: of the video frames the live calls were due to send, the share they did not
  send fresh (repeated, skipped, or shed by the load governor);
* **CPU**: the busy cores of the whole machine (``/proc/stat``; other processes count, they
  take the same cores) and this server's own CPU per live call.

An offer is refused (503 ``overloaded`` + ``Retry-After``) when at least one call is live and

* the live calls miss more than ``sessions.max_missed_share`` of their frames, or
* the idle cores under ``sessions.cpu_target`` of the machine, less what the calls still
  connecting will take, do not fit one more call, a call costing the larger of
  ``sessions.call_cpu_cores`` and the measured CPU per live call.

A server with no call always takes one. ``GET /ready`` reports ``headroom`` (and is 503 while
an offer would be refused for it), ``GET /metrics`` the ``avatar_headroom_*`` gauges. The rule
is ``Headroom.refusal``: tests feed it samples and a clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

WINDOW_S = 3.0  # the measurements are averaged over this much of the past
PERIOD_S = 1.0  # one sample a second


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the counters (all cumulative)."""

    t: float  # monotonic seconds
    machine_busy_s: float  # CPU seconds of the whole machine
    process_s: float  # CPU seconds of this server
    frames_due: int  # video frames the live calls were due to send
    frames_missed: int  # of those, not sent fresh (repeated, skipped, shed)
    calls: int  # live (connected) calls at the time


def machine_busy_seconds() -> float:
    """CPU seconds the machine's cores have been busy (not idle, not waiting for I/O), from
    ``/proc/stat``; elsewhere this process's CPU seconds."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return time.process_time()
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_cores() -> int:
    return os.cpu_count() or 1


def call_frames(session: Any) -> tuple[int, int] | None:
    """(due, missed) video frames of a connected call so far: due = sent + skipped + shed,
    missed = repeated + skipped + shed (a repeated frame was sent, but not fresh); None for
    a call not connected."""
    if getattr(session, "state", None) != "connected":
        return None
    st = session.video_track.stats
    return (st.frames_sent + st.frames_skipped + st.frames_shed,
            st.frames_repeated + st.frames_skipped + st.frames_shed)


class Headroom:
    """The measurements and the admission rule."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        cores: int | None = None,
        cpu_target: float = 0.9,
        call_cpu_cores: float = 0.25,
        max_missed_share: float = 0.05,
        window_s: float = WINDOW_S,
        busy: Callable[[], float] = machine_busy_seconds,
        process: Callable[[], float] = time.process_time,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.cores = cores or machine_cores()
        self.cpu_target = cpu_target
        self.call_cpu_cores = call_cpu_cores
        self.max_missed_share = max_missed_share
        self.window_s = window_s
        self._busy, self._process, self._now = busy, process, now
        self._samples: deque[Sample] = deque()
        self._per_call: dict[object, tuple[int, int]] = {}  # by session id
        self.refused = 0

    # --- measuring ----------------------------------------------------------------------------
    def sample(self, sessions: Iterable[Any]) -> None:
        """Read the counters now (cheap: one ``/proc/stat`` line and the sessions' counts).
        Frame counts are kept per session, so a call that ends takes none of its frames
        out of the totals."""
        seen: dict[object, tuple[int, int]] = {}
        for s in sessions:
            counts = call_frames(s)
            if counts is not None:
                seen[getattr(s, "id", None) or id(s)] = counts
        # the totals only move by what each live call added since the last sample
        last = self._samples[-1] if self._samples else None
        due, missed = (last.frames_due, last.frames_missed) if last else (0, 0)
        for key, (d, m) in seen.items():
            pd, pm = self._per_call.get(key, (d, m))
            due += max(0, d - pd)
            missed += max(0, m - pm)
        self._per_call = seen
        self.add(Sample(self._now(), self._busy(), self._process(), due, missed, len(seen)))

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        while len(self._samples) > 2 and sample.t - self._samples[1].t >= self.window_s:
            self._samples.popleft()

    async def run(self, sessions: Callable[[], Iterable[Any]]) -> None:
        """Sample every ``PERIOD_S`` until cancelled."""
        while True:
            try:
                self.sample(sessions())
            except Exception:  # noqa: BLE001 - a failed reading never stops the server
                logger.exception("headroom sample failed")
            await asyncio.sleep(PERIOD_S)

    # --- the rule -----------------------------------------------------------------------------
    def reading(self, pending: int = 0) -> dict[str, Any]:
        """The figures over the window: busy cores, the server's CPU per call, the share of
        frames missed, and how many more calls fit (``calls_more``; None before two samples
        or with no live call: then there is nothing to judge by)."""
        first = self._samples[0] if self._samples else None
        last = self._samples[-1] if self._samples else None
        out: dict[str, Any] = {
            "cores": self.cores, "cpu_target": self.cpu_target, "busy_cores": None,
            "call_cores": self.call_cpu_cores, "missed_share": None, "calls": 0,
            "calls_more": None, "window_s": 0.0,
        }
        if first is None or last is None or last.t - first.t <= 0:
            return out
        dt = last.t - first.t
        busy = max(0.0, (last.machine_busy_s - first.machine_busy_s) / dt)
        server = max(0.0, (last.process_s - first.process_s) / dt)
        calls = last.calls
        due = last.frames_due - first.frames_due
        missed = last.frames_missed - first.frames_missed
        call_cores = self.call_cpu_cores
        if calls:
            call_cores = max(call_cores, server / calls)
        spare = self.cores * self.cpu_target - busy - pending * call_cores
        out.update(
            busy_cores=round(busy, 3), server_cores=round(server, 3),
            call_cores=round(call_cores, 3), calls=calls, window_s=round(dt, 2),
            missed_share=round(missed / due, 4) if due > 0 else 0.0,
            calls_more=max(0, math.floor(spare / call_cores)) if calls else None,
        )
        return out

    def refusal(self, *, live: int, pending: int = 0) -> tuple[str, str] | None:
        """(reason, detail) when one more call must be refused now, else None. ``live``:
        calls connected; ``pending``: calls connecting (their cost is not measured yet)."""
        if not self.enabled or live == 0:
            return None
        r = self.reading(pending)
        if r["calls"] == 0:  # no measurement with calls yet (they have just connected)
            return None
        share = r["missed_share"]
        if share is not None and share > self.max_missed_share:
            return ("deadlines", f"the calls on this server already miss {share:.0%} of their "
                    f"video frames (sessions.max_missed_share {self.max_missed_share:.0%})")
        if r["calls_more"] is not None and r["calls_more"] < 1:
            return ("cpu", f"{r['busy_cores']:.2f} of {self.cores} cores are busy "
                    f"(sessions.cpu_target {self.cpu_target:.0%}) and a call takes about "
                    f"{r['call_cores']:.2f}")
        return None
