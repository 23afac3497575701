"""An avatar that listens: the expression layer over the idle face, driven by what the call
knows (the person speaking, their pauses, the turn ending, the reply's speech), placed on
the call's media clock.

* **Listening** (from the person's speech start to a moment after its end): the gaze settles
  on the camera (two glances in three are dropped), blinks slow a little (one in four is
  dropped), and the head nods at the person's pauses: a dip of a few pixels and back over
  0.7 s, at most one every 1.5 s, never on syllables (the VAD's pauses are 160 ms and more).
* **Thinking** (from the end of the turn to the first frame of the reply's speech): the eyes
  go up and to one side (the side alternates by turn) and the lips stay closed; the look
  eases in over 0.3 s and out over the two frames before the speech starts, as fast as an
  idle glance, so it is gone on the speech's first frame.
* **Speaking**: the head dips a little on the voice's stressed syllables (the speech's mouth
  envelope above its own running average), on top of the idle sway.

Every motion is eased (smoothstep or a raised sine, zero speed at both ends), so nothing
pops; at strength 1 the head moves at most about 3 px at 512x512.

``Expression`` holds a call's cues and speech, each stamped with media time; what it yields
for a time is a pure function of that time and the cues, so any thread may render any frame
in any order (the cues are replaced, never changed, so a reader sees a whole list).
``ExpressiveTimeline`` is an ``IdleTimeline`` with the layer on top: renderers take it where
they take the idle one. Head terms are read on the idle timeline's head grid, so the
renderer's cache of head warps keeps working.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, replace

import numpy as np

from face.geometry import smoothstep
from face.timeline import FacePose, IdleTimeline, Keep

__all__ = ["Expression", "ExpressiveTimeline", "Speech"]

MS = 1_000_000

LISTEN_EASE_NS = 400 * MS  # the listening look comes and goes over this
LISTEN_TAIL_NS = 600 * MS  # ... and lasts this long after the person stops
NOD_DELAY_NS = 120 * MS  # a nod starts this long after the pause is heard
NOD_NS = 700 * MS  # down and back up
NOD_GAP_NS = 1500 * MS  # at most one nod in this long
NOD_PX = 2.5  # how far the head dips, at strength 1
THINK_IN_NS = 300 * MS
THINK_OUT_NS = 80 * MS  # two frames at 25 fps, ending on the speech's first frame
THINK_GAZE = (0.55, -0.7)  # up and to one side (the side alternates by turn)
SPEAK_PX = 2.0  # head dip on a stressed syllable, at strength 1
SPEAK_ROLL_DEG = 0.25
SPEECH_FADE_NS = 120 * MS  # speaking motion fades out over this after a cut


def _hann(n: int) -> np.ndarray:
    """A Hann window of ``n`` non-zero taps, summing to 1."""
    w = np.hanning(n + 2)[1:-1]
    return w / w.sum()


def _smooth(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``x`` convolved with an odd-length ``kernel``, its ends held (any length of x)."""
    pad = kernel.size // 2
    return np.convolve(np.pad(x, pad, mode="edge"), kernel, "valid")


def _raised(x: float) -> float:
    """0 -> 1 -> 0 over x in [0, 1], with zero slope at both ends (a nod's path)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return math.sin(math.pi * x) ** 2


@dataclass(frozen=True, slots=True)
class Speech:
    """One stretch of the reply's speech: its first frame's media time, the frame period,
    and how much each frame stresses (0..1, from the mouth envelope); ``end_ns`` is moved
    forward when the speech is cut."""

    start_ns: int
    frame_ns: int
    stress: np.ndarray
    end_ns: int

    @classmethod
    def from_envelope(cls, start_ns: int, frame_ns: int, envelope: np.ndarray) -> Speech:
        """Stress = the envelope smoothed over ~5 frames, above its average over ~1 s."""
        env = np.asarray(envelope, dtype=np.float64)
        if env.size == 0:
            return cls(start_ns, frame_ns, np.zeros(0, np.float32), start_ns)
        short = _smooth(env, _hann(5))
        long = _smooth(env, np.ones(25) / 25.0)
        stress = np.clip((short - long) * 3.0, 0.0, 1.0)
        # a dip lasts about half a second: the head never jerks on a syllable
        stress = _smooth(stress, _hann(13))
        # from and back to still at the speech's ends (no step where it starts or stops)
        edge = np.array([smoothstep((j + 1) / 7.0) for j in range(min(6, env.size))])
        stress[: edge.size] *= edge
        stress[stress.size - edge.size:] *= edge[::-1]
        return cls(start_ns, frame_ns, stress.astype(np.float32),
                   start_ns + env.size * frame_ns)

    def at(self, t_ns: int) -> float:
        j = (t_ns - self.start_ns) // self.frame_ns
        if j < 0 or j >= self.stress.size:
            return 0.0
        value = float(self.stress[j])
        if t_ns >= self.end_ns:  # cut: fade out
            value *= 1.0 - smoothstep((t_ns - self.end_ns) / SPEECH_FADE_NS)
        return value


class Expression:
    """One call's cues on its media clock, and what the face does with them.

    ``cue(kind, t_ns)`` with kind ``user_start`` (the person starts speaking), ``user_pause``,
    ``user_end`` (their utterance ended), ``think`` (a turn is being answered),
    ``idle`` (the turn ended without speech); ``speech(...)`` when reply speech is scheduled;
    ``cut(t_ns)`` when it is interrupted. Cues come in time order (a cue earlier than the last
    is placed at the last)."""

    def __init__(self, *, strength: float = 1.0) -> None:
        self.strength = max(0.0, float(strength))
        self._lock = threading.Lock()
        # (t_ns, start?) of the person's speech starts and ends, in order
        self._user: tuple[tuple[int, bool], ...] = ()
        self._nods: tuple[int, ...] = ()  # nod start times
        self._thinks: tuple[tuple[int, int | None, int], ...] = ()  # (start, end or None, turn)
        self._speech: tuple[Speech, ...] = ()
        self._last_ns = 0
        self._turns = 0

    # --- cues (the event loop) ------------------------------------------------------------------
    def cue(self, kind: str, t_ns: int) -> None:
        with self._lock:
            t = max(int(t_ns), self._last_ns)
            self._last_ns = t
            if kind == "user_start":
                if not self._user or not self._user[-1][1]:
                    self._user += ((t, True),)
            elif kind == "user_end":
                if self._user and self._user[-1][1]:
                    self._user += ((t, False),)
            elif kind == "user_pause":
                start = t + NOD_DELAY_NS
                if self._listening(t) > 0.5 and (
                        not self._nods or start - self._nods[-1] >= NOD_GAP_NS):
                    self._nods += (start,)
            elif kind == "think":
                if not self._thinks or self._thinks[-1][1] is not None:
                    self._turns += 1
                    self._thinks += ((t, None, self._turns),)
            elif kind == "idle":
                self._end_thinking(t + THINK_OUT_NS)
            else:
                raise ValueError(f"unknown cue {kind!r}")

    def speech(self, start_ns: int, frame_ns: int, envelope: np.ndarray) -> int | None:
        """Reply speech from ``start_ns`` (its first frame). Ends a thinking look there;
        returns the time from which frames must be drawn again for its fade-out (None when
        nothing changed before ``start_ns``)."""
        s = Speech.from_envelope(int(start_ns), int(frame_ns), envelope)
        with self._lock:
            self._speech += (s,)
            if self._thinks and self._thinks[-1][1] is None:
                self._end_thinking(s.start_ns)
                return s.start_ns - THINK_OUT_NS
        return None

    def cut(self, t_ns: int) -> None:
        """The reply's speech stops at ``t_ns`` (an interruption)."""
        with self._lock:
            self._speech = tuple(replace(s, end_ns=min(s.end_ns, int(t_ns)))
                                 for s in self._speech)

    def _end_thinking(self, end_ns: int) -> None:
        if self._thinks and self._thinks[-1][1] is None:
            start, _, turn = self._thinks[-1]
            self._thinks = self._thinks[:-1] + ((start, max(end_ns, start), turn),)

    # --- what the face does at a time (any thread) --------------------------------------------
    def _listening(self, t_ns: int) -> float:
        user = self._user
        i = bisect.bisect_right(user, (t_ns, True)) - 1
        if i < 0:
            return 0.0
        t, start = user[i]
        if start:
            return smoothstep((t_ns - t) / LISTEN_EASE_NS)
        began = user[i - 1][0] if i > 0 else t
        peak = smoothstep((t - began) / LISTEN_EASE_NS)
        return peak * (1.0 - smoothstep((t_ns - t - LISTEN_TAIL_NS) / LISTEN_EASE_NS))

    def listening(self, t_ns: int) -> float:
        """0..1: how much the listening look is on."""
        return self._listening(t_ns)

    def nod(self, t_ns: int) -> float:
        """0..1 of a nod's dip at ``t_ns``."""
        nods = self._nods
        i = bisect.bisect_right(nods, t_ns) - 1
        if i < 0:
            return 0.0
        return _raised((t_ns - nods[i]) / NOD_NS)

    def nod_starts(self) -> tuple[int, ...]:
        return self._nods

    def thinking(self, t_ns: int) -> tuple[float, int]:
        """(0..1 how much the thinking look is on, the turn's number)."""
        thinks = self._thinks
        i = bisect.bisect_right(thinks, t_ns, key=lambda x: x[0]) - 1
        if i < 0:
            return 0.0, 0
        start, end, turn = thinks[i]
        w = smoothstep((t_ns - start) / THINK_IN_NS)
        if end is not None:
            if t_ns >= end:
                return 0.0, turn
            w *= 1.0 - smoothstep((t_ns - (end - THINK_OUT_NS)) / THINK_OUT_NS)
        return w, turn

    def stress(self, t_ns: int) -> float:
        """0..1: how much the reply's voice stresses the syllable at ``t_ns``."""
        speech = self._speech
        i = bisect.bisect_right(speech, t_ns, key=lambda s: s.start_ns) - 1
        return speech[i].at(t_ns) if i >= 0 else 0.0

    def offsets(self, t_ns: int) -> tuple[float, float, float]:
        """(dx px, dy px, roll degrees) of the head from this layer at ``t_ns``."""
        k = self.strength
        if k <= 0.0:
            return 0.0, 0.0, 0.0
        stress = self.stress(t_ns)
        dy = k * (NOD_PX * self.nod(t_ns) + SPEAK_PX * stress)
        roll = k * SPEAK_ROLL_DEG * stress
        return 0.0, dy, roll


class ExpressiveTimeline(IdleTimeline):
    """An idle timeline (the same motion as ``idle``: same seed, same head grid) with the
    expression layer on top, so every renderer takes it where it takes the idle one."""

    def __init__(self, idle: IdleTimeline, expression: Expression) -> None:
        super().__init__(seed=idle.seed, head_step_ns=idle.head_step_ns)
        self.expression = expression

    def _keep_blink(self, k: int, start_ns: int) -> bool:
        return not (k % 4 == 0 and self.expression.listening(start_ns) > 0.5)

    def _keep_glance(self, k: int, start_ns: int) -> bool:
        e = self.expression
        if e.thinking(start_ns)[0] > 0.0:
            return False
        return k % 3 == 0 or e.listening(start_ns) <= 0.5

    def pose_at(self, t_ns: int, *, keep_blink: Keep | None = None,
                keep_glance: Keep | None = None) -> FacePose:
        e = self.expression
        pose = super().pose_at(t_ns, keep_blink=keep_blink or self._keep_blink,
                               keep_glance=keep_glance or self._keep_glance)
        if e.strength <= 0.0:
            return pose
        dx, dy, roll = e.offsets(self.head_time_ns(t_ns))
        think, turn = e.thinking(t_ns)
        gx, gy = pose.gaze_x, pose.gaze_y
        if think > 0.0:
            side = 1.0 if turn % 2 else -1.0
            w = min(1.0, think * e.strength)
            gx = (1.0 - w) * gx + w * side * THINK_GAZE[0]
            gy = (1.0 - w) * gy + w * THINK_GAZE[1]
        return replace(pose, gaze_x=gx, gaze_y=gy, head_dx=pose.head_dx + dx,
                       head_dy=pose.head_dy + dy, head_roll_deg=pose.head_roll_deg + roll,
                       expr_dx=dx, expr_dy=dy, expr_roll_deg=roll)
