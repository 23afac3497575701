"""The eye rig: lid curves, aperture mask, iris sprite and an iris-free background, precomputed
once per image from landmarks 36-47 (eyes) and 17-26 (brows); per frame it draws one small
region for a blink amount and a gaze offset."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from face.geometry import F32, U8, frozen, roi_box


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


class EyeRig:
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
        x0, y0, x1, y1 = roi_box(
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
        self.y_up = frozen(y_up.astype(np.float32)[None, :])
        self.y_lo = frozen(y_lo.astype(np.float32)[None, :])
        opening = y_lo - y_up
        self.open_w = frozen(
            (opening / max(float(opening.max()), 1e-3)).astype(np.float32)[None, :]
        )
        yy = (ys - y0)[:, None].astype(np.float32)
        self.yy = frozen(np.broadcast_to(yy, (rh, rw)).copy())
        self.map_x = frozen(
            np.broadcast_to(np.arange(rw, dtype=np.float32)[None, :], (rh, rw)).copy()
        )

        # aperture: between the lid curves, a little inside, with a 1 px feather
        inset = 0.025 * eye_w
        ap = np.clip(yy - (self.y_up + inset) + 0.5, 0, 1) * np.clip(
            (self.y_lo - inset) - yy + 0.5, 0, 1
        )
        self.aperture = frozen(ap.astype(np.float32)[..., None])

        roi = image[y0:y1, x0:x1].astype(np.float32)
        self.src = frozen(roi)
        # lid skin texture: the skin above the eye, softened so stretching it shows no streaks
        sigma = max(0.5, 0.035 * eye_w)
        self.skin = frozen(cv2.GaussianBlur(roi, (0, 0), sigmaX=sigma, sigmaY=sigma))
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
        self.sprite = frozen(np.dstack([roi * sprite_a[..., None], sprite_a]).astype(np.float32))
        self.bg = frozen(self._iris_free(roi, ap, dist, r + max(0.75, 0.05 * eye_w)))
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

