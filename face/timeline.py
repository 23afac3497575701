"""The living idle face as a pure function of media time: blinks, glances, breathing and head
sway (``IdleTimeline``), and the poses it yields (``FacePose``, ``MouthShape``).

Same seed, same ``t_ns`` -> same pose, so any thread may ask for any frame in any order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from face.geometry import NS_PER_S, smoothstep

Keep = Callable[[int, int], bool]  # (event k, its start ns) -> whether it happens

# ---------------------------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------------------------

# Blinks: blink k (k >= 1) starts at k * PERIOD + jitter, jitter uniform in +-JITTER, so the
# interval between two blinks is PERIOD +- 2 * JITTER = 3..6 s, with no state to keep.
BLINK_PERIOD_NS = 4_500_000_000
BLINK_JITTER_NS = 750_000_000
BLINK_MIN_NS = 105_000_000
BLINK_MAX_NS = 140_000_000
_BLINK_CLOSE = 0.32  # fraction of the blink spent closing (fast) ...
_BLINK_HOLD = 0.14  # ... fully closed ...; the rest is the slower re-opening

# Glances: one slot every SACCADE_SLOT_NS; most slots hold one glance (move, hold, return).
SACCADE_SLOT_NS = 3_600_000_000
SACCADE_PROB = 0.75
SACCADE_MOVE_NS = 40_000_000
SACCADE_HOLD_MIN_NS = 500_000_000
SACCADE_HOLD_MAX_NS = 2_000_000_000

_MASK64 = (1 << 64) - 1
_STREAM_BLINK = 1
_STREAM_SACCADE = 2
_STREAM_MOTION = 3


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, stream: int, k: int, i: int) -> float:
    """Deterministic uniform number in [0, 1) for (seed, stream, event k, draw i)."""
    h = _mix64(seed & _MASK64)
    h = _mix64(h ^ (stream * 0x632BE59BD9B4E019 & _MASK64))
    h = _mix64(h ^ (k & _MASK64))
    h = _mix64(h ^ i)
    return (h >> 11) * (1.0 / (1 << 53))




@dataclass(frozen=True, slots=True)
class MouthShape:
    """A speaking mouth, as amounts of a few lip and jaw movements (all 0 = the image's own
    mouth). The renderer adds their displacement fields, so shapes blend linearly."""

    open: float = 0.0  # jaw drop, 0..1 (1 = the renderer's widest opening)
    width: float = 0.0  # -1 rounded (corners in, lips forward) .. 0 .. +1 spread (corners out)
    teeth: float = 0.0  # 0..1 upper lip raised, teeth shown
    tongue: float = 0.0  # 0..1 tongue visible in the opening (tip to the teeth when nearly shut)
    press: float = 0.0  # 0..1 lips closed together over the teeth
    tuck: float = 0.0  # 0..1 lower lip up under the upper teeth (f, v)

    FIELDS: ClassVar[tuple[str, ...]] = ("open", "width", "teeth", "tongue", "press", "tuck")

    def clipped(self) -> MouthShape:
        """The same shape with every amount in its range."""

        def unit(v: float) -> float:
            return min(max(float(v), 0.0), 1.0)

        return MouthShape(
            unit(self.open),
            min(max(float(self.width), -1.0), 1.0),
            unit(self.teeth),
            unit(self.tongue),
            unit(self.press),
            unit(self.tuck),
        )

    def is_rest(self) -> bool:
        """True when nothing would move (every amount below 1e-3)."""
        return all(abs(getattr(self, f)) <= 1e-3 for f in self.FIELDS)


@dataclass(frozen=True, slots=True)
class FacePose:
    t_ns: int  # media time in ns since the session epoch (used to pick loop-video frames)
    blink: float  # 0 = eyes open, 1 = fully closed
    gaze_x: float  # eye (iris) offset, -1..1 (left..right), maps to a few pixels
    gaze_y: float  # -1..1 (up..down)
    head_dx: float  # pixels
    head_dy: float  # pixels
    head_roll_deg: float
    head_scale: float  # ~1.0 (breathing)
    mouth_open: float = 0.0  # 0..1 jaw drop (the energy-driven mouth)
    mouth: MouthShape | None = None  # the full mouth shape; when set, mouth_open is ignored
    # the expression layer's share of the head motion (face/expression.py), already in
    # head_dx/head_dy/head_roll_deg; a video-loop avatar, whose loop has its own head motion,
    # moves its frames by this much alone
    expr_dx: float = 0.0
    expr_dy: float = 0.0
    expr_roll_deg: float = 0.0

    @classmethod
    def neutral(
        cls, t_ns: int = 0, *, mouth_open: float = 0.0, mouth: MouthShape | None = None
    ) -> FacePose:
        """Eyes open and centred, no head motion."""
        return cls(t_ns, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, mouth_open, mouth)

    def mouth_shape(self) -> MouthShape:
        """The mouth to render: ``mouth`` when set, else a jaw drop of ``mouth_open``."""
        return self.mouth if self.mouth is not None else MouthShape(open=self.mouth_open)


@dataclass(frozen=True, slots=True)
class _Saccade:
    start_ns: int
    move_ns: int
    hold_ns: int
    gaze_x: float
    gaze_y: float

    @property
    def end_ns(self) -> int:
        return self.start_ns + 2 * self.move_ns + self.hold_ns


HEAD_STEP_NS = 80_000_000
"""The head pose (sway, bob, roll, breathing) is sampled on this grid of media time: every
2nd frame at 25 fps. The head moves under 0.1 px a frame, so a step of at most 0.2 px every
80 ms looks the same as moving every frame, while the frame between shows the same head
position: the renderer reuses that frame's whole-frame warp (``FaceRenderer``) and the video
encoder finds the background unchanged. Blinks, gaze and the mouth still move every frame."""


class IdleTimeline:
    """Idle face motion as a deterministic, stateless function of media time."""

    def __init__(self, *, seed: int, head_step_ns: int = HEAD_STEP_NS) -> None:
        """``head_step_ns``: the grid the head pose is sampled on (0: every instant)."""
        self._seed = int(seed)
        self.head_step_ns = max(0, int(head_step_ns))

        def u(i: int) -> float:
            return _uniform(self._seed, _STREAM_MOTION, 0, i)

        tau = 2.0 * math.pi
        # breathing 0.2-0.3 Hz; head sway/roll as sums of slow incommensurate sines
        self._breath_w = tau * (0.2 + 0.1 * u(0))
        self._breath_ph = tau * u(1)
        self._sway = tuple(
            (tau * f, tau * u(10 + j))
            for j, f in enumerate((0.05 + 0.03 * u(2), 0.13 + 0.06 * u(3)))
        )
        self._bob = (tau * (0.07 + 0.04 * u(4)), tau * u(12))
        self._roll = tuple(
            (tau * f, tau * u(13 + j))
            for j, f in enumerate((0.04 + 0.03 * u(5), 0.11 + 0.05 * u(6)))
        )

    @property
    def seed(self) -> int:
        return self._seed

    # -- blinks --------------------------------------------------------------------------------
    def _blink(self, k: int) -> tuple[int, int]:
        """(start_ns, duration_ns) of blink k >= 1."""
        jitter = (2.0 * _uniform(self._seed, _STREAM_BLINK, k, 0) - 1.0) * BLINK_JITTER_NS
        dur = BLINK_MIN_NS + _uniform(self._seed, _STREAM_BLINK, k, 1) * (
            BLINK_MAX_NS - BLINK_MIN_NS
        )
        return k * BLINK_PERIOD_NS + int(jitter), int(dur)

    def blink_starts_ns(self, until_ns: int) -> list[int]:
        """Start times of all blinks starting before ``until_ns``."""
        out: list[int] = []
        k = 1
        while True:
            start, _ = self._blink(k)
            if start >= until_ns:
                return out
            out.append(start)
            k += 1

    def blink_duration_ns(self, start_ns: int) -> int:
        """Duration of the blink starting at ``start_ns`` (one of ``blink_starts_ns``)."""
        k = max(1, (start_ns + BLINK_PERIOD_NS // 2) // BLINK_PERIOD_NS)
        start, dur = self._blink(k)
        if start != start_ns:
            raise ValueError(f"no blink starts at {start_ns} ns")
        return dur

    def blink_at(self, t_ns: int, keep: Keep | None = None) -> float:
        """``keep(k, start_ns)``: whether blink k happens (the expression layer drops some
        while the person speaks); decided by its start, so a blink is whole or absent."""
        k0 = t_ns // BLINK_PERIOD_NS
        for k in (k0, k0 + 1):
            if k < 1:
                continue
            start, dur = self._blink(k)
            if start <= t_ns < start + dur:
                if keep is not None and not keep(k, start):
                    return 0.0
                p = (t_ns - start) / dur
                if p < _BLINK_CLOSE:
                    return smoothstep(p / _BLINK_CLOSE)
                if p < _BLINK_CLOSE + _BLINK_HOLD:
                    return 1.0
                return 1.0 - smoothstep(
                    (p - _BLINK_CLOSE - _BLINK_HOLD) / (1.0 - _BLINK_CLOSE - _BLINK_HOLD)
                )
        return 0.0

    # -- glances -------------------------------------------------------------------------------
    def _saccade(self, k: int) -> _Saccade | None:
        if k < 1:
            return None

        def u(i: int) -> float:
            return _uniform(self._seed, _STREAM_SACCADE, k, i)

        if u(0) >= SACCADE_PROB:
            return None
        hold = SACCADE_HOLD_MIN_NS + int(u(1) * (SACCADE_HOLD_MAX_NS - SACCADE_HOLD_MIN_NS))
        span = hold + 2 * SACCADE_MOVE_NS
        margin = 100_000_000
        start = k * SACCADE_SLOT_NS + margin + int(u(2) * (SACCADE_SLOT_NS - span - 2 * margin))
        side = -1.0 if u(3) < 0.5 else 1.0
        gx = side * (0.45 + 0.55 * u(4))
        gy = (2.0 * u(5) - 1.0) * 0.5
        return _Saccade(start, SACCADE_MOVE_NS, hold, gx, gy)

    def saccades(self, until_ns: int) -> list[tuple[int, int, float, float]]:
        """(start_ns, end_ns, gaze_x, gaze_y) of every glance starting before ``until_ns``."""
        out = []
        for k in range(1, until_ns // SACCADE_SLOT_NS + 1):
            s = self._saccade(k)
            if s is not None and s.start_ns < until_ns:
                out.append((s.start_ns, s.end_ns, s.gaze_x, s.gaze_y))
        return out

    def gaze_at(self, t_ns: int, keep: Keep | None = None) -> tuple[float, float]:
        """``keep(k, start_ns)``: whether glance k happens (as for blinks)."""
        k = t_ns // SACCADE_SLOT_NS
        s = self._saccade(k)
        if s is None or not (s.start_ns <= t_ns < s.end_ns):
            return 0.0, 0.0
        if keep is not None and not keep(k, s.start_ns):
            return 0.0, 0.0
        dt = t_ns - s.start_ns
        if dt < s.move_ns:
            a = smoothstep(dt / s.move_ns)
        elif dt < s.move_ns + s.hold_ns:
            a = 1.0
        else:
            a = 1.0 - smoothstep((dt - s.move_ns - s.hold_ns) / s.move_ns)
        return a * s.gaze_x, a * s.gaze_y

    # -- pose ----------------------------------------------------------------------------------
    def head_time_ns(self, t_ns: int) -> int:
        """The time on the head's grid (``head_step_ns``) that ``t_ns`` shows."""
        step = self.head_step_ns
        return t_ns - t_ns % step if step else t_ns

    def pose_at(self, t_ns: int, *, keep_blink: Keep | None = None,
                keep_glance: Keep | None = None) -> FacePose:
        t = self.head_time_ns(t_ns) / NS_PER_S  # the head's time
        breath = math.sin(self._breath_w * t + self._breath_ph)
        (w1, p1), (w2, p2) = self._sway
        (w3, p3), (w4, p4) = self._roll
        wb, pb = self._bob
        gx, gy = self.gaze_at(t_ns, keep_glance)
        return FacePose(
            t_ns=t_ns,
            blink=self.blink_at(t_ns, keep_blink),
            gaze_x=gx,
            gaze_y=gy,
            head_dx=1.1 * math.sin(w1 * t + p1) + 0.45 * math.sin(w2 * t + p2),
            head_dy=0.5 * math.sin(wb * t + pb) - 0.4 * breath,
            head_roll_deg=0.35 * math.sin(w3 * t + p3) + 0.15 * math.sin(w4 * t + p4),
            head_scale=1.0 + 0.003 * breath,
        )


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------

