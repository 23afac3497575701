"""The speaking mouth rig: displacement fields around the lips plus the painted mouth cavity,
precomputed once per image from landmarks 48-67 and weighted per frame by a ``MouthShape``.
One concept, honestly long: the vertical and lateral passes, the cavity and the teeth."""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from face.geometry import F32, F64, PATCH_INSET, U8, frozen, roi_box, smoothstep
from face.timeline import MouthShape


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


class MouthRig:
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
        x0, y0, x1, y1 = roi_box(
            min(jaw_l, c_l[0]) - 0.1 * mouth_w,
            nose_y - 0.5 * max(nose_y - float(lm[30, 1]), 0.0),
            max(jaw_r, c_r[0]) + 0.1 * mouth_w,
            chin_y + fall + PATCH_INSET + 1,
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
        self.jaw_lo = frozen((lower * self.drop).astype(np.float32))
        # where the split line lands, per column, at mouth_open = 1
        col = np.arange(rw)
        row = np.clip(np.round(split_roi[0]).astype(int), 0, rh - 1)
        self.split = frozen(split_roi.astype(np.float32))
        self.split64 = frozen(split_roi.astype(np.float64))
        self.split_lo = frozen(lower[row, col].astype(np.float32)[None, :] * np.float32(self.drop))
        self.split_up = frozen(
            (
                -lift * np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1) ** 1.5 * self.drop
            ).astype(np.float32)[None, :]
        )
        self.yy = frozen(np.broadcast_to((ys - y0)[:, None].astype(np.float32), (rh, rw)).copy())
        self.yy64 = frozen((ys - y0)[:, None].astype(np.float64))
        self.map_x = frozen(
            np.broadcast_to(np.arange(rw, dtype=np.float32)[None, :], (rh, rw)).copy()
        )
        self.feather = max(1.0, 0.022 * mouth_w)
        lateral = np.clip(1.0 - (np.abs(xs - cx) / half_lip) ** 2, 0, 1)
        self.cavity_lateral = frozen(lateral.astype(np.float32)[None, :])
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
        self.in_u = frozen(in_u.astype(np.float32)[None, :])
        self.in_l = frozen(in_l.astype(np.float32)[None, :])
        # the new fields ease out before the box's border ring (the box starts at the nose)
        ring = PATCH_INSET + 1
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
        self.press_fold = frozen(np.maximum(s0 - meet_y, 0.0)[None, :])
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
        self.env = frozen((ey * window).astype(np.float32))
        self.dx_row = frozen(eff_dx.astype(np.float32))
        self.rel_row = frozen(rel.astype(np.float32))
        self.ex_row = frozen(ex.astype(np.float32))
        self.ydev_col = frozen((yr - lip_mid).astype(np.float32))
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
            return frozen(np.ascontiguousarray(c, dtype=np.float32))

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
            k: (frozen(a.astype(np.float32)), frozen(b.astype(np.float32)))
            for k, (a, b) in edges.items()
        }
        self.pucker = frozen(pucker.astype(np.float32)[None, :])

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
        self.tooth_pattern = frozen((1.0 - 0.22 * np.clip(gaps, 0, 1)).astype(np.float32)[None, :])
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
            dim = 0.88 * smoothstep((rounding - 0.45) / 0.45)
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

