"""Degrade one call instead of letting it stutter: when the primary lip-sync engine (Wav2Lip)
keeps missing the call's frame deadlines, the fallback engine (visemes) draws the rest of the
current utterance; at a later utterance the primary comes back once no frame has been missed
for a while.

``DeadlineGuard`` is the rule alone, a pure function of the plans it is shown (their media
time and utterance) and a count of missed frames (the frame producer's late and skipped
frames): tests drive it without a clock. The audio is never involved: only who draws the
mouth changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from media_tracks.compositor import FramePlan

NS_PER_S = 1_000_000_000

# frames missed within WINDOW_NS of media time that switch a call to the fallback: 3 of 25
# in a second is a stutter a viewer sees; fewer is a hiccup (a collection, a first batch)
MAX_MISSES = 3
WINDOW_NS = NS_PER_S
# media time without a missed frame before the primary is tried again, at a new utterance
RECOVER_NS = 2 * NS_PER_S


class DeadlineGuard:
    """Decides, plan by plan, whether the fallback draws it.

    ``misses()``: frames of this call missed so far (monotonic). ``on_switch(degraded)`` is
    called at each change (True: to the fallback; False: back to the primary). While
    degraded, every plan goes to the fallback (the idle face is the same either way); the
    switch back happens only at the start of an utterance (or between two), never in the
    middle of one, so the mouth never changes style mid-sentence."""

    def __init__(
        self,
        misses: Callable[[], int],
        on_switch: Callable[[bool], None],
        *,
        max_misses: int = MAX_MISSES,
        window_ns: int = WINDOW_NS,
        recover_ns: int = RECOVER_NS,
    ) -> None:
        self._misses = misses
        self._on_switch = on_switch
        self.max_misses = max_misses
        self.window_ns = window_ns
        self.recover_ns = recover_ns
        self._seen: int | None = None  # read at the first plan (the count may not exist yet)
        self._recent: deque[int] = deque()  # media times at which misses were noticed
        self._last_miss_ns: int | None = None
        self.degraded = False
        self._segment: int | None = None  # the utterance the fallback took over
        self.switches = 0
        # why the last switch to the fallback happened: deadlines_missed, or
        # engine_unavailable (the primary could not run at all: its inference pool is away)
        self.reason = "deadlines_missed"
        self._unavailable = False

    def _note_misses(self, t_ns: int) -> None:
        count = self._misses()
        if self._seen is None:
            self._seen = count
        if count > self._seen:
            self._recent.extend([t_ns] * (count - self._seen))
            self._last_miss_ns = t_ns
        self._seen = max(self._seen, count)
        while self._recent and self._recent[0] <= t_ns - self.window_ns:
            self._recent.popleft()

    def unavailable(self, plan: FramePlan) -> None:
        """The primary could not draw ``plan`` at all (its inference pool cannot be
        reached): as many misses as switch the call, at once; the primary is tried again at
        a later utterance, as after missed deadlines."""
        t = plan.t_ns
        self._note_misses(t)
        self._recent.extend([t] * self.max_misses)
        self._last_miss_ns = t
        self._unavailable = True

    def use_fallback(self, plan: FramePlan) -> bool:
        """Whether the fallback draws ``plan`` (and the switch, when this plan makes one)."""
        t = plan.t_ns
        self._note_misses(t)
        if self.degraded:
            if plan.segment_id is not None and plan.segment_id == self._segment:
                return True  # the rest of the utterance it took over
            calm = self._last_miss_ns is None or t - self._last_miss_ns >= self.recover_ns
            if calm:
                self.degraded = False
                self._segment = None
                self._recent.clear()
                self.switches += 1
                self._on_switch(False)
                return False
            # still missing frames: the next utterance stays on the fallback too
            if plan.segment_id is not None:
                self._segment = plan.segment_id
            return True
        if plan.segment_id is not None and len(self._recent) >= self.max_misses:
            self.reason = "engine_unavailable" if self._unavailable else "deadlines_missed"
            self._unavailable = False
            self.degraded = True
            self._segment = plan.segment_id
            self.switches += 1
            self._on_switch(True)
            return True
        return False
