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
from dataclasses import dataclass
from typing import Any, TypeVar

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
class FacePose:
    t_ns: int  # media time in ns since the session epoch (used to pick loop-video frames)
    blink: float  # 0 = eyes open, 1 = fully closed
    gaze_x: float  # eye (iris) offset, -1..1 (left..right), maps to a few pixels
    gaze_y: float  # -1..1 (up..down)
    head_dx: float  # pixels
    head_dy: float  # pixels
    head_roll_deg: float
    head_scale: float  # ~1.0 (breathing)
    mouth_open: float = 0.0  # 0..1, set by the compositor for speech

    @classmethod
    def neutral(cls, t_ns: int = 0, *, mouth_open: float = 0.0) -> FacePose:
        """Eyes open and centred, no head motion."""
        return cls(t_ns, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, mouth_open)


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


class _MouthRig:
    """Jaw drop: a precomputed displacement field plus the split line between the lips."""

    def __init__(self, image: U8, lm: npt.NDArray[np.float64]) -> None:
        h, w = image.shape[:2]
        c_l, c_r = lm[48], lm[54]
        mouth_w = float(np.hypot(*(c_r - c_l)))
        cx = float((c_l[0] + c_r[0]) / 2)
        chin_y = float(lm[8, 1])
        nose_y = float(lm[33, 1])
        face_h = float(chin_y - min(lm[17:27, 1].min(), lm[36:48, 1].min()))
        self.drop = 0.26 * mouth_w  # jaw drop in pixels at mouth_open = 1
        fall = max(2.5 * self.drop, 0.3 * face_h)  # below the chin the motion fades out
        jaw_l = float(lm[2:8, 0].min())
        jaw_r = float(lm[9:15, 0].max())
        x0, y0, x1, y1 = _roi(
            min(jaw_l, c_l[0]) - 0.1 * mouth_w,
            nose_y,
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
        below = (ys[:, None] - y0) >= split_roi
        field = np.where(below, lower, upper) * self.drop
        self.field = _frozen(field.astype(np.float32))
        # where the split line lands, per column, at mouth_open = 1
        col = np.arange(rw)
        row = np.clip(np.round(split_roi[0]).astype(int), 0, rh - 1)
        self.split = _frozen(split_roi.astype(np.float32))
        self.split_lo = _frozen(lower[row, col].astype(np.float32)[None, :] * np.float32(self.drop))
        self.split_up = _frozen(
            (
                -lift * np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1) ** 1.5 * self.drop
            ).astype(np.float32)[None, :]
        )
        self.yy = _frozen(np.broadcast_to((ys - y0)[:, None].astype(np.float32), (rh, rw)).copy())
        self.map_x = _frozen(
            np.broadcast_to(np.arange(rw, dtype=np.float32)[None, :], (rh, rw)).copy()
        )
        self.feather = max(1.0, 0.022 * mouth_w)
        opens = np.nonzero((self.split_lo[0] - self.split_up[0]) > 1e-4)[0]
        if opens.size:
            self.cav_cols = (max(0, int(opens[0]) - 2), min(rw, int(opens[-1]) + 3))
        else:
            self.cav_cols = (0, rw)
        lateral = np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1)
        self.cavity_lateral = _frozen(lateral.astype(np.float32)[None, :])
        self.cavity_dark = np.array([30.0, 12.0, 14.0], dtype=np.float32)
        self.cavity_tongue = np.array([62.0, 18.0, 20.0], dtype=np.float32)

    def patch(self, frame: U8, mouth_open: float) -> U8 | None:
        """The mouth region (``self.box`` of ``frame``) with the jaw dropped, or None when
        ``mouth_open`` is 0."""
        m = float(np.clip(mouth_open, 0.0, 1.0))
        if m <= 1e-3:
            return None
        x0, y0, x1, y1 = self.box
        roi = frame[y0:y1, x0:x1]
        map_y = self.yy - np.float32(m) * self.field
        moved = cv2.remap(roi, self.map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # the cavity only exists between the moved lip edges: work on that band only
        c0, c1 = self.cav_cols
        mf = np.float32(m)
        top = self.split[:, c0:c1] + mf * self.split_up[:, c0:c1]  # upper lip edge, lifted
        bot = self.split[:, c0:c1] + mf * self.split_lo[:, c0:c1]  # lower lip edge, dropped
        fe = self.feather
        rh = moved.shape[0]
        r0 = max(0, int(math.floor(float(top.min()) - fe)) - 1)
        r1 = min(rh, int(math.ceil(float(bot.max()) + fe)) + 2)
        if r0 >= r1:
            return np.asarray(moved, dtype=np.uint8)
        yy = self.yy[r0:r1, c0:c1]
        gap = bot - top
        inside = np.minimum(yy - top, bot - yy)
        alpha = np.clip(inside / fe + 0.5, 0, 1) * np.clip(gap / fe, 0, 1)
        # dark mouth cavity: deepest under the upper teeth and towards the corners, a little
        # redder towards the tongue at the bottom
        v = np.clip((yy - top) / np.maximum(gap, 1e-3), 0, 1)
        light = (v * v) * self.cavity_lateral[:, c0:c1]
        a = alpha[..., None]
        cav = self.cavity_dark + light[..., None] * self.cavity_tongue
        band = moved[r0:r1, c0:c1]
        blended = band.astype(np.float32) * (1.0 - a) + cav * a
        moved[r0:r1, c0:c1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        return np.asarray(moved, dtype=np.uint8)


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
        # speaking frames need one); a race builds the same rig twice, harmlessly
        self._loop_mouths: dict[int, _MouthRig] = {}

    @property
    def avatar(self) -> Avatar:
        return self._avatar

    def _loop_mouth(self, i: int) -> _MouthRig:
        """The mouth rig for loop frame ``i``: its own landmarks when the avatar has them."""
        lms = self._avatar.loop_landmarks
        if not lms:
            return self._mouth
        rig = self._loop_mouths.get(i)
        if rig is None:
            rig = _MouthRig(self._loop[i], lms[i].astype(np.float64))
            self._loop_mouths[i] = rig
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
        p = self._mouth.patch(self._image, pose.mouth_open)
        if p is not None:
            out.append((self._mouth.box, p))
        return out

    def render(self, pose: FacePose) -> U8:
        """HxWx3 uint8 RGB frame for ``pose`` (a new array every call)."""
        if self._loop:
            i = self.loop_index(pose.t_ns)
            frame = self._loop[i].copy()
            if pose.mouth_open > 1e-3:
                rig = self._loop_mouth(i)
                p = rig.patch(frame, pose.mouth_open)
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
