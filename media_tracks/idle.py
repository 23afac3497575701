"""The living idle face: blinks, glances, breathing and head sway, plus an energy-driven jaw.

``IdleTimeline`` is a pure function of media time (same seed, same ``t_ns`` -> same pose),
so any thread may ask for any frame in any order. ``FaceRenderer`` precomputes every mask,
texture and map once per avatar; ``render()`` then only touches two small eye regions, the
mouth region and runs one ``cv2.warpAffine`` over the whole frame.

Eye and mouth geometry come from the avatar's 68 dlib landmarks:
36-41 / 42-47 eyes (corner, upper lid x2, corner, lower lid x2), 17-21 / 22-26 brows,
48-59 outer lips, 60-67 inner lips, 0-16 jaw (8 = chin), 33 = nose base.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from avatars.model import Avatar

NS_PER_S = 1_000_000_000

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
_A = TypeVar("_A", bound="np.ndarray[Any, Any]")
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
_PATCH_INSET = 2  # rigs leave this many border pixels of their region unedited
LOOP_RIGS = 128  # loop-video avatars: mouth rigs kept (about 0.3 MB each at 512x512)

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


def _smoothstep(x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return x * x * (3.0 - 2.0 * x)


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


class IdleTimeline:
    """Idle face motion as a deterministic, stateless function of media time."""

    def __init__(self, *, seed: int) -> None:
        self._seed = int(seed)

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

    def blink_at(self, t_ns: int) -> float:
        k0 = t_ns // BLINK_PERIOD_NS
        for k in (k0, k0 + 1):
            if k < 1:
                continue
            start, dur = self._blink(k)
            if start <= t_ns < start + dur:
                p = (t_ns - start) / dur
                if p < _BLINK_CLOSE:
                    return _smoothstep(p / _BLINK_CLOSE)
                if p < _BLINK_CLOSE + _BLINK_HOLD:
                    return 1.0
                return 1.0 - _smoothstep(
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

    def gaze_at(self, t_ns: int) -> tuple[float, float]:
        s = self._saccade(t_ns // SACCADE_SLOT_NS)
        if s is None or not (s.start_ns <= t_ns < s.end_ns):
            return 0.0, 0.0
        dt = t_ns - s.start_ns
        if dt < s.move_ns:
            a = _smoothstep(dt / s.move_ns)
        elif dt < s.move_ns + s.hold_ns:
            a = 1.0
        else:
            a = 1.0 - _smoothstep((dt - s.move_ns - s.hold_ns) / s.move_ns)
        return a * s.gaze_x, a * s.gaze_y

    # -- pose ----------------------------------------------------------------------------------
    def pose_at(self, t_ns: int) -> FacePose:
        t = t_ns / NS_PER_S
        breath = math.sin(self._breath_w * t + self._breath_ph)
        (w1, p1), (w2, p2) = self._sway
        (w3, p3), (w4, p4) = self._roll
        wb, pb = self._bob
        gx, gy = self.gaze_at(t_ns)
        return FacePose(
            t_ns=t_ns,
            blink=self.blink_at(t_ns),
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


def _frozen(a: _A) -> _A:
    """Mark a precomputed array read-only (the renderer shares it between threads)."""
    a.setflags(write=False)
    return a


def _roi(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> Box:
    return (
        max(0, int(math.floor(x0))),
        max(0, int(math.floor(y0))),
        min(w, int(math.ceil(x1)) + 1),
        min(h, int(math.ceil(y1)) + 1),
    )


def _lid_curve(
    left: npt.NDArray[np.float64],
    right: npt.NDArray[np.float64],
    mids: npt.NDArray[np.float64],
    xs: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """y(x) through both eye corners and the two mid lid points (0 bulge outside the corners).

    The curve is the corner-to-corner line plus ``(x-xl)(xr-x)(a + b x)``: a cubic that passes
    exactly through all four landmarks and whose bulge vanishes at the corners.
    """
    xl, yl = left
    xr, yr = right
    span = max(xr - xl, 1e-3)

    def line(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return yl + (x - xl) * (yr - yl) / span

    mx, my = mids[:, 0], mids[:, 1]
    base = (mx - xl) * (xr - mx)
    a_mat = np.stack([base, base * (mx - xl) / span], axis=1)
    try:
        coef = np.linalg.solve(a_mat, my - line(mx))
    except np.linalg.LinAlgError:
        coef = np.array([np.mean((my - line(mx)) / np.maximum(base, 1e-3)), 0.0])
    xc = np.clip(xs, xl, xr)
    bump = (xc - xl) * (xr - xc) * (coef[0] + coef[1] * (xc - xl) / span)
    return np.asarray(line(xc) + bump, dtype=np.float64)


class _EyeRig:
    """Precomputed eye: lid curves, aperture mask, iris sprite and an iris-free background."""

    def __init__(
        self,
        image: U8,
        eye: npt.NDArray[np.float64],  # 6 landmarks: corner, upper x2, corner, lower x2
        brow: npt.NDArray[np.float64],  # 5 brow landmarks above this eye
    ) -> None:
        h, w = image.shape[:2]
        left, right = (eye[0], eye[3]) if eye[0, 0] <= eye[3, 0] else (eye[3], eye[0])
        eye_w = float(np.hypot(*(right - left)))
        self.eye_w = eye_w
        upper_y = float(min(eye[1, 1], eye[2, 1]))
        lower_y = float(max(eye[4, 1], eye[5, 1]))
        brow_y = float(np.max(brow[:, 1]))  # lowest brow point
        # lid texture height: skin between the upper lid and the brow, stretched over the eye
        self.lid_h = float(np.clip(0.8 * (upper_y - brow_y), 0.25 * eye_w, 0.55 * eye_w))
        # the lash band just above the upper-lid landmarks moves down with the lid edge
        self.lash_h = 0.12 * eye_w
        pad_x = 0.3 * eye_w
        x0, y0, x1, y1 = _roi(
            left[0] - pad_x,
            upper_y - self.lid_h - 0.15 * eye_w,
            right[0] + pad_x,
            lower_y + 0.3 * eye_w,
            w,
            h,
        )
        self.box = (x0, y0, x1, y1)
        rw, rh = x1 - x0, y1 - y0
        xs = np.arange(x0, x1, dtype=np.float64)
        ys = np.arange(y0, y1, dtype=np.float64)
        y_up = _lid_curve(left, right, eye[1:3], xs) - y0  # ROI coordinates from here on
        y_lo = _lid_curve(left, right, eye[4:6], xs) - y0
        y_lo = np.maximum(y_lo, y_up)
        self.y_up = _frozen(y_up.astype(np.float32)[None, :])
        self.y_lo = _frozen(y_lo.astype(np.float32)[None, :])
        opening = y_lo - y_up
        self.open_w = _frozen(
            (opening / max(float(opening.max()), 1e-3)).astype(np.float32)[None, :]
        )
        yy = (ys - y0)[:, None].astype(np.float32)
        self.yy = _frozen(np.broadcast_to(yy, (rh, rw)).copy())
        self.map_x = _frozen(
            np.broadcast_to(np.arange(rw, dtype=np.float32)[None, :], (rh, rw)).copy()
        )

        # aperture: between the lid curves, a little inside, with a 1 px feather
        inset = 0.025 * eye_w
        ap = np.clip(yy - (self.y_up + inset) + 0.5, 0, 1) * np.clip(
            (self.y_lo - inset) - yy + 0.5, 0, 1
        )
        self.aperture = _frozen(ap.astype(np.float32)[..., None])

        roi = image[y0:y1, x0:x1].astype(np.float32)
        self.src = _frozen(roi)
        # lid skin texture: the skin above the eye, softened so stretching it shows no streaks
        sigma = max(0.5, 0.035 * eye_w)
        self.skin = _frozen(cv2.GaussianBlur(roi, (0, 0), sigmaX=sigma, sigmaY=sigma))
        gray = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY).astype(np.float32)
        # iris: darkness-weighted centroid inside the (eroded) aperture, radius from eye width
        core = ap * np.clip(
            np.minimum(yy - self.y_up, self.y_lo - yy) / max(0.06 * eye_w, 0.5), 0, 1
        )
        ref = float(np.sum(gray * core) / max(float(core.sum()), 1e-6))
        weight = core * np.maximum(ref - gray, 0.0) ** 2
        if float(weight.sum()) > 1e-6:
            gx_ = np.arange(rw, dtype=np.float32)[None, :]
            cx = float(np.sum(weight * gx_) / weight.sum())
            cy = float(np.sum(weight * yy) / weight.sum())
        else:
            cx = float((left[0] + right[0]) / 2 - x0)
            cy = float(np.mean((y_up + y_lo) / 2))
        self.iris_center = (cx + x0, cy + y0)
        r = 0.21 * eye_w
        self.iris_r = r
        dist = np.hypot(np.arange(rw, dtype=np.float32)[None, :] - cx, yy - cy)
        iris_a = np.clip(r + 0.5 - dist, 0, 1).astype(np.float32)
        # sprite = premultiplied RGBA of the iris, limited to what shows between the lids
        ap_wide = np.clip(yy - self.y_up + 0.5, 0, 1) * np.clip(self.y_lo - yy + 0.5, 0, 1)
        sprite_a = iris_a * ap_wide
        self.sprite = _frozen(np.dstack([roi * sprite_a[..., None], sprite_a]).astype(np.float32))
        self.bg = _frozen(self._iris_free(roi, ap, dist, r + max(0.75, 0.05 * eye_w)))
        self.gaze_px = (0.18 * eye_w, 0.08 * eye_w)

    @staticmethod
    def _iris_free(roi: F32, ap: F32, dist: F32, r_fill: float) -> F32:
        """The eye with the iris painted over: sclera interpolated row by row across it."""
        bg = roi.copy()
        fill = (dist <= r_fill) & (ap > 0.01)
        inside = ap > 0.01
        for row in np.nonzero(fill.any(axis=1))[0]:
            cols = np.nonzero(fill[row])[0]
            ap_cols = np.nonzero(inside[row])[0]
            a0, a1 = int(ap_cols[0]), int(ap_cols[-1])
            c0, c1 = int(cols[0]), int(cols[-1])
            left = roi[row, c0 - 1] if c0 - 1 >= a0 else None
            right = roi[row, c1 + 1] if c1 + 1 <= a1 else None
            if left is None and right is None:
                # whole row is iris: borrow the nearest sclera colours of the aperture
                left = right = (
                    np.median(roi[inside & ~fill], axis=0)
                    if np.any(inside & ~fill)
                    else roi[row, c0]
                )
            elif left is None:
                left = right
            elif right is None:
                right = left
            assert left is not None and right is not None
            t = np.linspace(0.0, 1.0, c1 - c0 + 3, dtype=np.float32)[1:-1, None]
            bg[row, c0 : c1 + 1] = left * (1 - t) + right * t
        soft = cv2.GaussianBlur(bg, (3, 3), 0)
        m = fill.astype(np.float32)[..., None]
        return np.asarray(bg * (1 - m) + soft * m, dtype=np.float32)

    def patch(self, gaze_x: float, gaze_y: float, blink: float) -> U8 | None:
        """The eye region (``self.box`` of the avatar image) for this gaze and blink, or None
        when it is unchanged."""
        out: F32 | None = None
        if abs(gaze_x) > 1e-3 or abs(gaze_y) > 1e-3:
            dx = float(np.clip(gaze_x, -1, 1)) * self.gaze_px[0]
            dy = float(np.clip(gaze_y, -1, 1)) * self.gaze_px[1]
            m = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
            rh, rw = self.src.shape[:2]
            moved = cv2.warpAffine(
                self.sprite, m, (rw, rh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            eye = self.bg * (1.0 - moved[..., 3:]) + moved[..., :3]
            out = self.src + self.aperture * (eye - self.src)
        if blink > 1e-3:
            src = out if out is not None else self.src
            out = self._close_lid(src, min(blink, 1.0))
        if out is None:
            return None
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _close_lid(self, roi: F32, blink: float) -> F32:
        """The upper lid descends: skin above the eye is stretched down over the opening.

        Destination rows ``[y_top, y_edge - lash]`` sample the skin rows ``[y_top, y_up - lash]``
        (stretched), and the lash band ``[y_up - lash, y_up]`` keeps its thickness and rides
        down with the lid edge. ``blink = 0`` is the identity.
        """
        y_up, y_lo, yy = self.y_up, self.y_lo, self.yy
        lash = self.lash_h
        y_top = y_up - self.lid_h
        y_edge = y_up + blink * (y_lo + 0.1 * (y_lo - y_up) * self.open_w - y_up)
        skin_end = y_edge - lash
        src_len = self.lid_h - lash  # skin rows [y_top, y_up - lash] ...
        dst_len = np.maximum(skin_end - y_top, 1e-3)  # ... spread over [y_top, skin_end]
        # cubic Hermite: slope d at both ends (continuous with the unmoved skin above and the
        # rigid lash band below), the stretch concentrated mid-lid; d < 3 src/dst keeps it
        # monotonic
        d = np.minimum(1.0, 2.0 * src_len / dst_len)
        t = np.clip((yy - y_top) / dst_len, 0.0, 1.0)
        t2 = t * t
        t3 = t2 * t
        f = dst_len * d * (2.0 * t3 - 3.0 * t2 + t) + src_len * (3.0 * t2 - 2.0 * t3)
        map_y = np.where(
            yy <= y_top,
            yy,
            np.where(yy < skin_end, y_top + f, yy - (y_edge - y_up)),
        ).astype(np.float32)
        lid = cv2.remap(roi, self.map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        soft = cv2.remap(
            self.skin, self.map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        # where the skin is stretched a lot, use the softened texture (no streaks)
        w_soft = np.clip(dst_len / src_len - 1.0, 0.0, 1.0) * np.clip(8.0 * t * (1.0 - t), 0, 1)
        lid = lid + w_soft[..., None] * (soft - lid)
        # a slightly darker lash line along the closing lid edge, strongest mid-eye
        sigma = max(0.04 * self.eye_w, 0.5)
        dark = np.exp(-(((yy - (y_edge - 0.5 * sigma)) / sigma) ** 2)) * (self.open_w * blink)
        # and a soft shadow over the closed lid (the eyeball under it)
        shade = np.clip((yy - y_up) / np.maximum(y_edge - y_up, 1e-3), 0, 1) * (self.open_w * blink)
        lid = lid * (1.0 - 0.35 * dark - 0.06 * shade)[..., None]
        # soft (anti-aliased) lower edge of the lid
        alpha = np.clip(y_edge - yy + 0.5, 0, 1)[..., None]
        return np.asarray(roi + alpha * (lid - roi), dtype=np.float32)


def _cosine_fade(t: F64) -> F64:
    """1 at t <= 0, 0 at t >= 1, a half cosine in between (zero slope at both ends)."""
    return np.asarray(0.5 + 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0)), dtype=np.float64)


def _smooth_1d(a: F64, sigma: float) -> F64:
    """Gaussian smoothing of a 1-D profile (edges replicated)."""
    if sigma <= 0.3:
        return a
    r = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return np.asarray(np.convolve(np.pad(a, r, mode="edge"), k, mode="valid"), dtype=np.float64)


class _MouthRig:
    """The speaking mouth: displacement fields around the lips, precomputed once per image and
    weighted per frame by a ``MouthShape``, plus the painted mouth cavity.

    Two passes over the rig's box. The *vertical* pass moves the upper and the lower part of
    the mouth apart or together, each side of a fold line (the split between the lips): jaw
    drop (``open``), lips closed over the teeth (``press``), lower lip up to the upper teeth
    (``tuck``) and upper lip raised (``teeth``); where the lips part, the cavity is painted
    (dark mouth, tongue, teeth). The *lateral* pass then rounds (corners in and down, lips
    pushed forward) or spreads (corners out and up) the result, cavity included, so a rounded
    opening comes out narrower and rounder. Every field is zero on the box's border ring, so
    nothing outside the box changes and there is no seam.
    """

    def __init__(self, image: U8, lm: npt.NDArray[np.float64]) -> None:
        h, w = image.shape[:2]
        c_l, c_r = lm[48], lm[54]
        mouth_w = float(np.hypot(*(c_r - c_l)))
        self.mouth_w = mouth_w
        cx = float((c_l[0] + c_r[0]) / 2)
        chin_y = float(lm[8, 1])
        nose_y = float(lm[33, 1])
        face_h = float(chin_y - min(lm[17:27, 1].min(), lm[36:48, 1].min()))
        self.drop = 0.26 * mouth_w  # jaw drop in pixels at mouth_open = 1
        fall = max(2.5 * self.drop, 0.3 * face_h)  # below the chin the motion fades out
        jaw_l = float(lm[2:8, 0].min())
        jaw_r = float(lm[9:15, 0].max())
        # the box reaches halfway up the nose (the jaw's fields end at its base; the lips' fields
        # need the room to ease out)
        x0, y0, x1, y1 = _roi(
            min(jaw_l, c_l[0]) - 0.1 * mouth_w,
            nose_y - 0.5 * max(nose_y - float(lm[30, 1]), 0.0),
            max(jaw_r, c_r[0]) + 0.1 * mouth_w,
            chin_y + fall + _PATCH_INSET + 1,
            w,
            h,
        )
        self.box = (x0, y0, x1, y1)
        rw, rh = x1 - x0, y1 - y0
        xs = np.arange(x0, x1, dtype=np.float64)
        ys = np.arange(y0, y1, dtype=np.float64)

        # split between upper and lower lip: between the inner lip lines (nearer the lower one,
        # so visible upper teeth stay with the upper lip), out to the outer corners
        upper_in = lm[[60, 61, 62, 63, 64]]
        lower_in = lm[[60, 67, 66, 65, 64]]
        xi0, xi1 = float(lm[60, 0]), float(lm[64, 0])
        inner_x = np.linspace(xi0, xi1, 9)
        in_up = np.interp(inner_x, upper_in[:, 0], upper_in[:, 1])
        in_lo = np.interp(inner_x, lower_in[:, 0], lower_in[:, 1])
        mid_y = in_up + 0.7 * (in_lo - in_up)
        px = np.concatenate([[c_l[0]], inner_x, [c_r[0]]])
        py = np.concatenate([[c_l[1]], mid_y, [c_r[1]]])
        order = np.argsort(px)
        split = np.interp(xs, px[order], py[order])  # clamps to the corners' y outside
        split_roi = (split - y0)[None, :]

        # horizontal extent of the moving jaw: the mouth at lip level, growing to the jaw
        # angles at chin level, so the jaw line bends smoothly (most motion at the chin)
        half_lip = 0.5 * mouth_w
        half_chin = 0.5 * float(lm[13, 0] - lm[3, 0])
        yy = ys[:, None]
        lip_y = float(np.mean(py))
        tv = np.clip((yy - lip_y) / max(chin_y - lip_y, 1.0), 0, 1)
        half = half_lip + (half_chin - half_lip) * tv
        u = np.abs(xs[None, :] - cx) / half
        uc = np.clip(u, 0, 1)
        round_lip = (1.0 - uc * uc) ** 0.7  # rounded opening at the lips ...
        bend_jaw = 0.5 + 0.5 * np.cos(np.pi * uc)  # ... smooth bend along the jaw line
        wx = round_lip + (bend_jaw - round_lip) * tv
        # vertical: full below the split down to the chin, then fading out
        wy = np.where(
            yy <= chin_y, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip((yy - chin_y) / fall, 0, 1))
        )
        lower = wx * wy
        # the upper lip lifts a little (fading out towards the nose)
        lift = 0.15
        tu = np.clip((split[None, :] - yy) / max(split.mean() - nose_y, 1.0), 0, 1)
        wx_lip = np.clip(1.0 - (np.abs(xs[None, :] - cx) / half_lip) ** 2, 0, 1) ** 1.5
        upper = -lift * wx_lip * (0.5 + 0.5 * np.cos(np.pi * tu))
        # Content displacement (px, + = down) at weight 1, on each side of the fold: the
        # upper-side field applies above the fold, the lower-side one below it.
        jaw_up = (upper * self.drop).astype(np.float32)
        self.jaw_lo = _frozen((lower * self.drop).astype(np.float32))
        # where the split line lands, per column, at mouth_open = 1
        col = np.arange(rw)
        row = np.clip(np.round(split_roi[0]).astype(int), 0, rh - 1)
        self.split = _frozen(split_roi.astype(np.float32))
        self.split64 = _frozen(split_roi.astype(np.float64))
        self.split_lo = _frozen(lower[row, col].astype(np.float32)[None, :] * np.float32(self.drop))
        self.split_up = _frozen(
            (
                -lift * np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1) ** 1.5 * self.drop
            ).astype(np.float32)[None, :]
        )
        self.yy = _frozen(np.broadcast_to((ys - y0)[:, None].astype(np.float32), (rh, rw)).copy())
        self.yy64 = _frozen((ys - y0)[:, None].astype(np.float64))
        self.map_x = _frozen(
            np.broadcast_to(np.arange(rw, dtype=np.float32)[None, :], (rh, rw)).copy()
        )
        self.feather = max(1.0, 0.022 * mouth_w)
        lateral = np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1)
        self.cavity_lateral = _frozen(lateral.astype(np.float32)[None, :])
        self.cavity_dark = np.array([30.0, 12.0, 14.0], dtype=np.float32)
        self.cavity_tongue = np.array([62.0, 18.0, 20.0], dtype=np.float32)

        # -- the lip lines of the image ------------------------------------------------------
        def line(idx: list[int]) -> F64:
            pts = lm[idx]
            o = np.argsort(pts[:, 0])
            return np.asarray(np.interp(xs, pts[o, 0], pts[o, 1]) - y0, dtype=np.float64)

        sig = 0.04 * mouth_w
        in_u = _smooth_1d(line([48, 60, 61, 62, 63, 64, 54]), sig)  # inner upper lip
        in_l = _smooth_1d(line([48, 60, 67, 66, 65, 64, 54]), sig)  # inner lower lip
        out_u = _smooth_1d(line([48, 49, 50, 51, 52, 53, 54]), sig)  # outer upper lip
        out_l = _smooth_1d(line([48, 59, 58, 57, 56, 55, 54]), sig)  # outer lower lip
        s0 = split_roi[0]
        gap0 = np.maximum(in_l - in_u, 0.0)  # teeth and mouth shown between the lips at rest
        inside = (xs >= xi0) & (xs <= xi1)
        # what the image already shows between the lips (teeth, in a smile)
        self.image_gap_h = float(np.median(gap0[inside])) if inside.any() else 0.0
        self.in_u = _frozen(in_u.astype(np.float32)[None, :])
        self.in_l = _frozen(in_l.astype(np.float32)[None, :])
        # the new fields ease out before the box's border ring (the box starts at the nose)
        ring = _PATCH_INSET + 1
        y_nose = max(nose_y - y0, float(ring))
        y_chin = chin_y - y0
        yr = self.yy64
        # upper side: rigid from the split up to the inner upper lip, then easing out to the nose
        up_fall = _cosine_fade((in_u[None, :] - yr) / np.maximum(in_u[None, :] - y_nose, 1.0))
        up_fall = np.where(yr >= in_u[None, :], 1.0, up_fall)
        # lower side: rigid from the split down to the inner lower lip, easing out to the chin
        lo_fall = _cosine_fade((yr - in_l[None, :]) / np.maximum(y_chin - in_l[None, :], 1.0))
        lo_fall = np.where(yr <= in_l[None, :], 1.0, lo_fall)

        # press: the lips close over the teeth, meeting 30% of the way down the gap; the fold
        # moves up to the meeting line with them, so the lower lip covers the teeth below it
        meet = 0.3
        closing = gap0 + 0.03 * mouth_w * lateral  # a little overlap: no sliver of teeth left
        meet_y = in_u + meet * closing
        self.press_fold = _frozen(np.maximum(s0 - meet_y, 0.0)[None, :])
        # tuck (f, v): the lower lip rises to the upper teeth's edge (a little behind them) and
        # rolls in: its outer edge rises more than its inner edge, so it looks thinner
        reach = np.maximum(in_l - s0, 0.0) + 0.12 * gap0 + 0.02 * mouth_w * lateral
        lip_lo_h = np.maximum(out_l - in_l, 1.0)
        roll = 0.35 * lip_lo_h * lateral**0.7
        t_roll = np.clip((yr - in_l[None, :]) / lip_lo_h[None, :], 0.0, 1.0)
        roll_y = np.where(
            yr <= out_l[None, :],
            t_roll * t_roll * (3 - 2 * t_roll),
            _cosine_fade((yr - out_l[None, :]) / np.maximum(y_chin - out_l[None, :], 1.0)),
        )
        tuck_lo = -(reach[None, :] * lo_fall) - roll[None, :] * roll_y
        # teeth: the upper lip (with whatever teeth the image shows) rises a little
        lift_px = 0.05 * mouth_w
        lift_up = -lift_px * lateral[None, :] ** 1.5 * up_fall

        # -- lateral pass: rounding and spreading --------------------------------------------
        # Inside the mouth the lateral shift grows with the distance from the middle; beyond
        # each corner it eases out before the face's outline (the jaw contour at lip height),
        # so the cheek between them stretches and the outline itself never moves.
        dxr = xs[None, :] - cx
        lip_row = float(np.mean(py))
        contour_l = float(np.interp(lip_row, lm[0:9, 1], lm[0:9, 0]))
        contour_r = float(np.interp(lip_row, lm[8:17, 1][::-1], lm[8:17, 0][::-1]))
        margin = 0.12 * mouth_w
        fades = [
            float(np.clip(room - margin, 0.25 * half_lip, 0.85 * half_lip))
            for room in (
                cx - half_lip - max(contour_l, x0 + ring),
                min(contour_r, x1 - 1 - ring) - cx - half_lip,
            )
        ]
        fade_x = np.where(dxr < 0, fades[0], fades[1])
        ex = _cosine_fade((np.abs(dxr) - half_lip) / fade_x)  # 1 inside the mouth
        eff_dx = np.where(np.abs(dxr) <= half_lip, dxr, np.sign(dxr) * half_lip * ex)
        out_u_m = float(np.median(out_u[inside])) if inside.any() else float(s0.mean())
        out_l_m = float(np.median(out_l[inside])) if inside.any() else float(s0.mean())
        lip_top, lip_bot = out_u_m, out_l_m
        y_top = float(ring + 1)
        ey = np.where(
            yr < lip_top,
            _cosine_fade((lip_top - yr) / max(lip_top - y_top, 1.0)),
            _cosine_fade((yr - lip_bot) / max(0.8 * (y_chin - lip_bot), 1.0)),
        )
        lip_mid = 0.5 * (lip_top + lip_bot)
        corner_y = 0.5 * (c_l[1] + c_r[1]) - y0
        rel = np.clip(np.abs(dxr) / half_lip, 0.0, 1.0) ** 2 * ex
        # The lateral fields are products of one envelope and per-row/per-column factors:
        #   rounding: x -= 0.25 dx (corners in by 25% of the half width), y += the smile's
        #     corners down to the lip line + lips 10% fuller (pushed forward)
        #   spreading: x += 0.1 dx (corners out), y -= 4% of the mouth width at the corners
        window = self._window(rh, rw, ring)
        self.env = _frozen((ey * window).astype(np.float32))
        self.dx_row = _frozen(eff_dx.astype(np.float32))
        self.rel_row = _frozen(rel.astype(np.float32))
        self.ex_row = _frozen(ex.astype(np.float32))
        self.ydev_col = _frozen((yr - lip_mid).astype(np.float32))
        self.corner_drop = 0.55 * max(lip_mid - corner_y, 0.0)
        # rounded lips close at the sides but not in the middle, where they arch apart: the
        # "o" opening
        pucker = np.exp(-(np.abs(dxr[0] / (0.18 * mouth_w)) ** 3))  # flat middle, steep sides
        hole_up = -0.07 * mouth_w * pucker[None, :] * up_fall
        hole_lo = 0.01 * mouth_w * pucker[None, :] * lo_fall

        # The vertical fields only move the mouth's own columns: they are kept for those
        # columns only, [lc0, lc1), and tapered to 0 before the box's border ring.
        local = {
            "jaw": (jaw_up, None),
            "round": (hole_up, hole_lo),
            "press": (
                meet * closing[None, :] * up_fall,
                -(1.0 - meet) * closing[None, :] * lo_fall,
            ),
            "tuck": (None, tuck_lo),
            "teeth": (lift_up, None),
        }
        used = np.zeros(rw, dtype=bool)
        for pair in local.values():
            for f in pair:
                if f is not None:
                    used |= np.abs(f).max(axis=0) > 1e-6
        cols = np.flatnonzero(used)
        lc0, lc1 = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 1)
        self.local_cols = (lc0, lc1)
        win = window[:, lc0:lc1]

        def crop(f: F64 | F32 | None, taper: bool = True) -> F32 | None:
            if f is None:
                return None
            c = f[:, lc0:lc1] * (win if taper else 1.0)
            return _frozen(np.ascontiguousarray(c, dtype=np.float32))

        # the jaw's upper field is the original one, untapered (mouth_open renders as it did)
        self.fields = {k: (crop(a, k != "jaw"), crop(b)) for k, (a, b) in local.items()}
        # the same fields on the split line (per column): where the lip edges land
        zero = np.zeros((1, rw))
        edges = {
            "round": (-0.07 * mouth_w * pucker[None, :], 0.01 * mouth_w * pucker[None, :]),
            "press": ((meet * closing)[None, :], (-(1.0 - meet) * closing)[None, :]),
            "tuck": (zero, -reach[None, :]),
            "teeth": ((-lift_px * lateral**1.5)[None, :], zero),
        }
        self.edge_fields = {
            k: (_frozen(a.astype(np.float32)), _frozen(b.astype(np.float32)))
            for k, (a, b) in edges.items()
        }
        self.pucker = _frozen(pucker.astype(np.float32)[None, :])

        # -- paint ---------------------------------------------------------------------------
        self.cx_roi = cx - x0
        # upper teeth to paint under the upper lip: as much as the image does not show already
        self.paint_teeth_h = max(0.0, 0.11 * mouth_w - self.image_gap_h)
        self.teeth_rgb = self._teeth_colour(image, x0, y0, in_u, in_l, inside)
        self.tongue_half_w = 0.3 * mouth_w
        # faint gaps between painted teeth: incisors ~11% of the mouth wide, narrower to the side
        gaps = np.zeros(rw)
        for b in (0.0, 0.115, 0.205, 0.275, 0.335):
            for sgn in (-1.0, 1.0) if b else (1.0,):
                gaps += np.exp(
                    -((((xs - cx) - sgn * b * mouth_w) / max(0.6, 0.012 * mouth_w)) ** 2)
                )
        self.tooth_pattern = _frozen((1.0 - 0.22 * np.clip(gaps, 0, 1)).astype(np.float32)[None, :])
        self.tongue_rgb = np.array([200.0, 104.0, 108.0], dtype=np.float32)
        self.shadow_rgb = np.array([66.0, 32.0, 34.0], dtype=np.float32)

        opens = np.nonzero(
            ((self.split_lo[0] - self.split_up[0]) > 1e-4) | (gap0 > 1e-3) | (reach > 1e-3)
        )[0]
        if opens.size:
            self.cav_cols = (max(0, int(opens[0]) - 2), min(rw, int(opens[-1]) + 3))
        else:
            self.cav_cols = (0, rw)

    @staticmethod
    def _teeth_colour(
        image: U8, x0: int, y0: int, in_u: F64, in_l: F64, inside: npt.NDArray[np.bool_]
    ) -> F32:
        """The image's own teeth colour when it shows teeth, else a slightly shaded white."""
        default = np.array([232.0, 226.0, 212.0], dtype=np.float32)
        cols = np.flatnonzero(inside)
        px = []
        for c in cols:
            a, b = int(math.ceil(in_u[c])), int(math.floor(in_l[c]))
            if b > a:
                px.append(image[y0 + a : y0 + b, x0 + c].reshape(-1, 3))
        if not px:
            return default
        band = np.concatenate(px).astype(np.float32)
        luma = band @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        bright = band[luma > max(120.0, float(np.percentile(luma, 60)))]
        if len(bright) < 4:
            return default
        return np.asarray(np.median(bright, axis=0) * 0.92, dtype=np.float32)

    @staticmethod
    def _window(rh: int, rw: int, ring: int) -> F64:
        """1 inside the box, easing to 0 on its border ring (``ring`` pixels) over 4 pixels."""

        def ramp(n: int) -> F64:
            i = np.arange(n, dtype=np.float64)
            d = np.minimum(i, n - 1 - i) - (ring - 1)
            t = np.clip(d / 4.0, 0.0, 1.0)
            return np.asarray(t * t * (3.0 - 2.0 * t), dtype=np.float64)

        return np.asarray(ramp(rh)[:, None] * ramp(rw)[None, :], dtype=np.float64)

    def patch(self, frame: U8, shape: MouthShape | float) -> U8 | None:
        """The mouth region (``self.box`` of ``frame``) for ``shape`` (a bare float is a jaw
        drop), or None when the shape is the rest mouth."""
        if not isinstance(shape, MouthShape):
            shape = MouthShape(open=float(shape))
        s = shape.clipped()
        if s.is_rest():
            return None
        x0, y0, x1, y1 = self.box
        roi = frame[y0:y1, x0:x1]
        m = np.float32(s.open)
        lc0, lc1 = self.local_cols
        # per side: total displacement field, and the same on the split line
        jaw_up, _ = self.fields["jaw"]
        assert jaw_up is not None
        up = np.zeros_like(self.jaw_lo)
        up_local = m * jaw_up
        lo = m * self.jaw_lo
        lo_local = lo[:, lc0:lc1]  # a view: added to in place
        e_up = m * self.split_up
        e_lo = m * self.split_lo
        # rounded lips close at the sides and part in the middle (a per-column press weight)
        press: float | F32 = s.press
        if s.width < -1e-4:
            r = np.float32(-s.width)
            sides = np.sqrt(r) * (1.0 - self.pucker)
            press = (1.0 - np.float32(1.0 - s.press) * (1.0 - sides)) * (1.0 - r * r * self.pucker)
        for name, weight in (
            ("round", max(0.0, -s.width)),
            ("press", press),
            ("tuck", s.tuck),
            ("teeth", s.teeth),
        ):
            if np.max(weight) <= 1e-4:
                continue
            wf = np.asarray(weight, dtype=np.float32)
            wl = wf[:, lc0:lc1] if wf.ndim == 2 else wf
            f_up, f_lo = self.fields[name]
            if f_up is not None:
                up_local = up_local + wl * f_up
            if f_lo is not None:
                lo_local += wl * f_lo
            a, b = self.edge_fields[name]
            e_up = e_up + wf * a
            e_lo = e_lo + wf * b
        up[:, lc0:lc1] = up_local
        top = self.split + e_up  # the upper lip's edge after the move
        bot = self.split + e_lo  # the lower lip's edge
        # The fold, where the output switches from the upper side's content to the lower's.
        # Any line between the two landings of the split is seamless (lips apart: it is
        # inside the painted cavity; lips overlapping: both sides show their own content up
        # to it); pressed lips meet higher up, on the line where their edges come together.
        fold = np.clip(
            self.split64 - press * self.press_fold, np.minimum(top, bot), np.maximum(top, bot)
        )
        map_y = self.yy - np.where(self.yy64 >= fold, lo, up)
        moved = np.asarray(
            cv2.remap(roi, self.map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
            dtype=np.uint8,
        )
        self._paint(moved, s, top, bot, fold, e_up, e_lo)
        if abs(s.width) > 1e-4:
            ww = np.float32(abs(s.width))
            if s.width < 0:
                fx = np.float32(-0.25) * self.dx_row
                fy = (
                    np.float32(self.corner_drop) * self.rel_row
                    + np.float32(0.1) * self.ex_row * self.ydev_col
                )
            else:
                fx = np.float32(0.1) * self.dx_row
                fy = np.float32(-0.04 * self.mouth_w) * self.rel_row
            mx = self.map_x - (ww * fx) * self.env
            my = self.yy - (ww * fy) * self.env
            moved = np.asarray(
                cv2.remap(moved, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
                dtype=np.uint8,
            )
        return moved

    def _paint(
        self, moved: U8, s: MouthShape, top: F32, bot: F32, fold: F64, e_up: F32, e_lo: F32
    ) -> None:
        """Paint the mouth (in place) between the moved lip edges: the dark cavity where they
        parted, tongue and teeth in it, the shadow behind rounded lips, and where the lips
        touch, the thin dark line between them. ``top``/``bot``: where the split line landed on
        the upper/lower side; ``e_up``/``e_lo``: how far each side moved there."""
        c0, c1 = self.cav_cols
        top = top[:, c0:c1]
        bot = bot[:, c0:c1]
        fe = self.feather
        rh = moved.shape[0]
        lo_edge = float(min(top.min(), bot.min()))
        hi_edge = float(max(bot.max(), top.max()))
        rounding = max(0.0, -s.width)
        if rounding > 1e-3:
            lip_u = self.in_u[:, c0:c1] + e_up[:, c0:c1]
            lip_l = self.in_l[:, c0:c1] + e_lo[:, c0:c1]
            lo_edge = min(lo_edge, float(lip_u.min()))
            hi_edge = max(hi_edge, float(lip_l.max()))
        r0 = max(0, int(math.floor(lo_edge - fe)) - 1)
        r1 = min(rh, int(math.ceil(hi_edge + fe)) + 2)
        if r0 >= r1:
            return
        yy = self.yy[r0:r1, c0:c1]
        gap = bot - top
        band = moved[r0:r1, c0:c1]
        base = band.astype(np.float32)
        lat = self.cavity_lateral[:, c0:c1]
        if rounding > 1e-3:
            # lips pushed forward: what shows between them (teeth) falls into their shadow
            inner = np.clip(np.minimum(yy - lip_u, lip_l - yy) / fe + 0.5, 0, 1)
            inner *= np.clip((lip_l - lip_u) / (2.0 * fe), 0, 1)  # a sliver: barely
            dim = 0.88 * _smoothstep((rounding - 0.45) / 0.45)
            k = (np.float32(dim) * inner * np.sqrt(lat))[..., None]
            base = base + k * (self.shadow_rgb - base)
        if float(gap.max()) > 0:
            inside = np.minimum(yy - top, bot - yy)
            alpha = np.clip(inside / fe + 0.5, 0, 1) * np.clip(gap / fe, 0, 1)
            # dark mouth cavity: deepest under the upper teeth and towards the corners, a little
            # redder towards the tongue at the bottom
            gp = np.maximum(gap, 1e-3)
            v = np.clip((yy - top) / gp, 0, 1)
            light = (v * v) * lat
            cav = self.cavity_dark + light[..., None] * self.cavity_tongue
            if s.tongue > 1e-3:
                cav = self._tongue(cav, s, yy, top, gp, c0, c1)
            if s.teeth > 1e-3 and self.paint_teeth_h > 0.3:
                cav = self._teeth(cav, s, yy, top, gp, lat, c0, c1)
            a = alpha[..., None]
            base = base * (1.0 - a) + cav * a
        closed = s.press + s.tuck
        if closed > 1e-3:
            # where the lips overlap, a soft dark contact line along the fold
            shut = np.clip((top - bot) / fe, 0, 1)
            d = np.abs(yy - fold[:, c0:c1].astype(np.float32))
            line = np.exp(-(d * d) / (0.5 * fe * fe)) * shut
            line *= np.float32(0.4 * min(1.0, closed)) * np.sqrt(lat)
            base = base * (1.0 - line[..., None])
        moved[r0:r1, c0:c1] = np.clip(base + 0.5, 0, 255).astype(np.uint8)

    def _tongue(
        self, cav: F32, s: MouthShape, yy: F32, top: F32, gap: F32, c0: int, c1: int
    ) -> F32:
        """The tongue: a rounded body rising from the bottom of the cavity; with the jaw nearly
        shut (th) its tip fills the gap up to the teeth, lit; with the jaw open it lies low
        and in shadow."""
        tip = float(np.clip(s.tongue * (1.0 - 0.8 * s.open), 0.0, 1.0))
        dx = (np.arange(c0, c1, dtype=np.float32) - np.float32(self.cx_roi))[None, :]
        half_w = np.float32(self.tongue_half_w * (1.0 - 0.3 * tip))
        arch = np.sqrt(np.clip(1.0 - (dx / half_w) ** 2, 0.0, 1.0))
        height = gap * np.float32(0.3 + 0.7 * tip) * arch
        surface = top + gap - height  # the tongue's upper edge
        fe = self.feather
        cover = np.clip((yy - surface) / fe + 0.5, 0, 1) * (height > 0.2)
        cover *= np.float32(min(1.0, 1.5 * s.tongue))
        # lit towards its upper edge, darker below and at the back
        depth = np.clip((yy - surface) / np.maximum(height, 1e-3), 0, 1)
        shade = (0.55 + 0.45 * tip) * (1.0 - 0.3 * depth)
        col = self.tongue_rgb * shade[..., None]
        return np.asarray(cav + cover[..., None] * (col - cav), dtype=np.float32)

    def _teeth(
        self, cav: F32, s: MouthShape, yy: F32, top: F32, gap: F32, lat: F32, c0: int, c1: int
    ) -> F32:
        """Upper teeth under the upper lip, for images that show none of their own: shaded
        under the lip and towards the corners, with faint gaps between them."""
        fe = self.feather
        h_up = np.minimum(gap * 0.6, np.float32(self.paint_teeth_h * s.teeth)) * lat**0.3
        cover = np.clip((top + h_up - yy) / fe + 0.5, 0, 1) * (h_up > 0.3)
        v = np.clip((yy - top) / np.maximum(h_up, 1e-3), 0, 1)
        shade = (0.72 + 0.28 * np.minimum(v * 2.5, 1.0) - 0.08 * v * v) * (0.55 + 0.45 * lat)
        shade = shade * self.tooth_pattern[:, c0:c1]
        col = self.teeth_rgb * shade[..., None]
        return np.asarray(cav + cover[..., None] * (col - cav), dtype=np.float32)


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class FaceRenderer:
    """Renders an avatar for a ``FacePose``. Thread-safe: all state is read-only after init."""

    def __init__(self, avatar: Avatar) -> None:
        self._avatar = avatar
        image = np.ascontiguousarray(avatar.image, dtype=np.uint8)
        self._image = _frozen(image)
        self._h, self._w = image.shape[:2]
        lm = avatar.landmarks.astype(np.float64)
        self._eyes = (_EyeRig(image, lm[36:42], lm[17:22]), _EyeRig(image, lm[42:48], lm[22:27]))
        self._mouth = _MouthRig(image, lm)
        face_h = float(lm[8, 1] - lm[17:27, 1].min())
        # head motion pivots at the neck, below the chin
        self._pivot = (float(lm[8, 0]), float(lm[8, 1] + 0.35 * face_h))
        self._loop = avatar.loop_frames
        self._loop_fps = avatar.loop_fps
        self._loop_cycle = avatar.loop_mode == "cycle"
        # mouth rigs of loop frames with their own landmarks, built on first use (only
        # speaking frames need one) and kept for the most recently used LOOP_RIGS frames (a
        # 30 s loop would otherwise hold 750 rigs); a race builds the same rig twice, harmlessly
        self._loop_mouths: OrderedDict[int, _MouthRig] = OrderedDict()
        self._loop_lock = threading.Lock()

    @property
    def avatar(self) -> Avatar:
        return self._avatar

    def _loop_mouth(self, i: int) -> _MouthRig:
        """The mouth rig for loop frame ``i``: its own landmarks when the avatar has them."""
        lms = self._avatar.loop_landmarks
        if not lms:
            return self._mouth
        with self._loop_lock:
            rig = self._loop_mouths.get(i)
            if rig is not None:
                self._loop_mouths.move_to_end(i)
                return rig
        rig = _MouthRig(self._loop[i], lms[i].astype(np.float64))
        with self._loop_lock:
            self._loop_mouths[i] = rig
            while len(self._loop_mouths) > LOOP_RIGS:
                self._loop_mouths.popitem(last=False)
        return rig

    def loop_index(self, t_ns: int) -> int:
        """Loop frame shown at ``t_ns``: ping-pong 0, 1, .., n-1, n-2, .., 1, 0, 1, ..., or for
        a seamless (``cycle``) loop 0, 1, .., n-1, 0, 1, ..."""
        n = len(self._loop)
        if n <= 1:
            return 0
        i = int(math.floor(max(t_ns, 0) * self._loop_fps / NS_PER_S))
        if self._loop_cycle:
            return i % n
        i %= 2 * (n - 1)
        return i if i < n else 2 * (n - 1) - i

    def head_matrix(self, pose: FacePose) -> npt.NDArray[np.float64] | None:
        """The frame's affine warp for the pose, or None when it is the identity."""
        if (
            abs(pose.head_dx) < 1e-3
            and abs(pose.head_dy) < 1e-3
            and abs(pose.head_roll_deg) < 1e-4
            and abs(pose.head_scale - 1.0) < 1e-6
        ):
            return None
        m = cv2.getRotationMatrix2D(self._pivot, pose.head_roll_deg, pose.head_scale)
        m[0, 2] += pose.head_dx
        m[1, 2] += pose.head_dy
        return np.asarray(m, dtype=np.float64)

    def _patches(self, pose: FacePose) -> list[tuple[Box, U8]]:
        """Changed regions of the avatar image (source coordinates) for this pose."""
        out: list[tuple[Box, U8]] = []
        for eye in self._eyes:
            p = eye.patch(pose.gaze_x, pose.gaze_y, pose.blink)
            if p is not None:
                out.append((eye.box, p))
        p = self._mouth.patch(self._image, pose.mouth_shape())
        if p is not None:
            out.append((self._mouth.box, p))
        return out

    def render(self, pose: FacePose) -> U8:
        """HxWx3 uint8 RGB frame for ``pose`` (a new array every call)."""
        if self._loop:
            i = self.loop_index(pose.t_ns)
            frame = self._loop[i].copy()
            shape = pose.mouth_shape()
            if not shape.is_rest():
                rig = self._loop_mouth(i)
                p = rig.patch(frame, shape)
                if p is not None:
                    x0, y0, x1, y1 = rig.box
                    frame[y0:y1, x0:x1] = p
            return frame
        patches = self._patches(pose)
        m = self.head_matrix(pose)
        if (
            m is None
            or abs(pose.head_roll_deg) > 10.0  # _warp_patch assumes a small rotation
            or any(_overlap(a[0], b[0]) for i, a in enumerate(patches) for b in patches[i + 1 :])
        ):
            frame = self._image.copy()
            for (x0, y0, x1, y1), p in patches:
                frame[y0:y1, x0:x1] = p
            if m is None:
                return frame
            return np.asarray(self._warp(frame, m), dtype=np.uint8)
        # warp the untouched image once, then warp only the small changed regions on top
        out = self._warp(self._image, m)
        for box, p in patches:
            self._warp_patch(out, p, box, m)
        return out

    def _warp(self, frame: U8, m: npt.NDArray[np.float64]) -> U8:
        out = cv2.warpAffine(
            frame, m, (self._w, self._h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return np.asarray(out, dtype=np.uint8)

    def _warp_patch(self, out: U8, patch: U8, box: Box, m: npt.NDArray[np.float64]) -> None:
        """Warp ``patch`` (the image region ``box``, already edited) into ``out`` in place.

        Only the destination pixels whose source lies at least ``_PATCH_INSET`` pixels inside
        the patch are written: the rigs never edit that border ring, so the base warp already
        holds the right pixels there and the seam is invisible.
        """
        x0, y0, x1, y1 = box
        k = _PATCH_INSET
        sx0, sy0, sx1, sy1 = x0 + k, y0 + k, x1 - 1 - k, y1 - 1 - k
        if sx0 >= sx1 or sy0 >= sy1:
            return
        c = np.array([[sx0, sy0, 1.0], [sx1, sy0, 1.0], [sx0, sy1, 1.0], [sx1, sy1, 1.0]]) @ m.T
        # the axis-aligned rectangle inside the (slightly rotated) image of the inner box; a
        # side of the box on the frame's edge is edited up to the edge and replicated there by
        # both warps alike, so it extends to the frame's edge
        dx0 = 0 if x0 == 0 else max(0, int(math.ceil(max(c[0, 0], c[2, 0]))))
        dx1 = self._w if x1 == self._w else min(self._w, int(math.floor(min(c[1, 0], c[3, 0]))) + 1)
        dy0 = 0 if y0 == 0 else max(0, int(math.ceil(max(c[0, 1], c[1, 1]))))
        dy1 = self._h if y1 == self._h else min(self._h, int(math.floor(min(c[2, 1], c[3, 1]))) + 1)
        if dx0 >= dx1 or dy0 >= dy1:
            return
        mp = m.copy()
        mp[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64) - np.array([dx0, dy0])
        out[dy0:dy1, dx0:dx1] = cv2.warpAffine(
            patch,
            mp,
            (dx1 - dx0, dy1 - dy0),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
