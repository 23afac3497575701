"""Registration quality checks: is this face usable as a talking avatar?

Checks, in the order they are applied (the first failure is the refusal; every check is still
measured and reported):

=================  =========================================================================
code               refused when (keyword argument of :func:`check_quality`, default)
=================  =========================================================================
``no_face``        the analyzer finds no face
``multiple_faces`` another face's box has at least ``multiple_face_ratio`` (0.25) of the
                   main (largest) face's box area, i.e. it is at least half as tall (small
                   faces in the background are fine); the refusal lists every face found,
                   left to right, with its box
``face_too_small`` the face box's shorter side is under ``min_face_px`` (96 px: the
                   Wav2Lip crop size, so the crop is never an upscale)
``face_turned``    the head is turned more than ``max_yaw_deg`` (35°) left/right, tilted
                   more than ``max_pitch_deg`` (30°) up/down or rolled more than
                   ``max_roll_deg`` (30°) sideways (estimated from the landmarks)
``too_dark``       the mean luma (BT.601, 0..255) of the face is under ``min_brightness`` (40)
``too_bright``     ... or over ``max_brightness`` (220)
``too_blurry``     the face's sharpness is under ``min_sharpness`` (0.45, see
                   :func:`sharpness`: about 1 when sharp; 0.45 is a blur of σ ≈ 1.5 px
                   on a 96 px face crop)
=================  =========================================================================

The **face box** here is backend-independent: it is derived from the 68 landmarks
(:func:`face_box_from_landmarks`), sized like the boxes of the CNN face detectors lip-sync
models are trained with (forehead to just under the chin, cheek to cheek).

Brightness is checked before blur because an under/over-exposed face also has little detail:
the refusal then names the cause. Sharpness is normalised by the face's contrast, so a dark
but sharp face is not called blurry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from avatars.analysis.base import Box, DetectedFace, clip_box
from common.errors import AvatarServerError

__all__ = [
    "REFUSAL_CODES",
    "RegistrationRefused",
    "assess_quality",
    "brightness",
    "check_quality",
    "face_box_from_landmarks",
    "head_pose",
    "image_sharpness",
    "sharpness",
]

REFUSAL_CODES = (
    "no_face",
    "multiple_faces",
    "face_too_small",
    "face_turned",
    "too_dark",
    "too_bright",
    "too_blurry",
)

# Face box from landmarks (fractions of the landmarks' width/height): grown sideways,
# upwards for the forehead (the brows are the top landmarks) and a little under the chin.
_BOX_SIDE = 0.10
_BOX_TOP = 0.30
_BOX_BOTTOM = 0.08

# Head-pose model (orthographic, millimetres, relative to the nose tip; average adult face):
# outer eye corners are _EYE_HALF_W to each side and _EYE_DEPTH behind the nose tip; the
# jaw-line ends (landmarks 0/16) _JAW_HALF_W to each side, _JAW_DEPTH behind. The eye line
# is _EYE_ABOVE above the nose tip, the mouth corners _MOUTH_BELOW below and _MOUTH_DEPTH
# behind. A yaw of θ moves the nose tip sideways by depth·sinθ against width·cosθ.
_EYE_HALF_W, _EYE_DEPTH = 45.0, 38.0
_JAW_HALF_W, _JAW_DEPTH = 68.0, 85.0
_EYE_ABOVE, _MOUTH_BELOW = 38.0, 22.0
_EYE_LINE_DEPTH, _MOUTH_DEPTH = 32.0, 25.0

# Sharpness: the face box is resampled to this size before the Laplacian.
_SHARP_PX = 64


class RegistrationRefused(AvatarServerError):
    """The upload is a valid image/video but not a usable avatar (HTTP 422). ``code`` is one
    of :data:`REFUSAL_CODES`; ``detail`` says why in plain English."""

    status = 422

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def face_box_from_landmarks(landmarks: npt.ArrayLike) -> Box:
    """The backend-independent face box (x0, y0, x1, y1) around 68 landmarks."""
    pts = np.asarray(landmarks, dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi - lo
    return (
        float(lo[0] - _BOX_SIDE * w),
        float(lo[1] - _BOX_TOP * h),
        float(hi[0] + _BOX_SIDE * w),
        float(hi[1] + _BOX_BOTTOM * h),
    )


def _yaw_from(nose: float, left: float, right: float, half_w: float, depth: float) -> float:
    span = right - left
    if span <= 1e-6:
        return 90.0
    # nose offset from the midpoint, in units of the half span: (depth / half_w) * tan(yaw)
    ratio = float(np.clip((2.0 * nose - left - right) / span, -1.0, 1.0))
    return math.degrees(math.atan(ratio * half_w / depth))


def head_pose(landmarks: npt.ArrayLike) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 68 landmarks (dlib order), rough (±10°) estimates.

    roll: angle of the line between the eye centres (positive: clockwise on screen).
    yaw: where the nose tip sits between the outer eye corners and between the jaw-line ends
    (averaged), through the model above; positive: the nose points to image right.
    pitch: where the nose tip sits between the eye line and the mouth corners; positive:
    looking up. Yaw and pitch are measured after undoing the roll."""
    pts = np.asarray(landmarks, dtype=np.float64)
    eye_l, eye_r = pts[36:42].mean(axis=0), pts[42:48].mean(axis=0)
    dx, dy = eye_r - eye_l
    roll = math.degrees(math.atan2(dy, dx))
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    centre = (eye_l + eye_r) / 2
    p = (pts - centre) @ np.array([[c, s], [-s, c]])  # rotate by -roll
    nose = p[30]
    yaw_eyes = _yaw_from(nose[0], p[36, 0], p[45, 0], _EYE_HALF_W, _EYE_DEPTH)
    yaw_jaw = _yaw_from(nose[0], p[0, 0], p[16, 0], _JAW_HALF_W, _JAW_DEPTH)
    yaw = (yaw_eyes + yaw_jaw) / 2

    eye_y = (p[36:48, 1]).mean()
    mouth_y = (p[48, 1] + p[54, 1]) / 2
    span = mouth_y - eye_y
    if span <= 1e-6:
        pitch = 90.0
    else:
        f = (nose[1] - eye_y) / span
        # f = (A cosφ - De sinφ) / ((A + B) cosφ + (Dm - De) sinφ), solved for tanφ
        a, b = _EYE_ABOVE, _MOUTH_BELOW
        tan_phi = (a - f * (a + b)) / (f * (_MOUTH_DEPTH - _EYE_LINE_DEPTH) + _EYE_LINE_DEPTH)
        pitch = math.degrees(math.atan(tan_phi))
    return yaw, pitch, roll


def _face_crop_grey(rgb: npt.NDArray[np.uint8], box: Box) -> npt.NDArray[np.float64] | None:
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = clip_box(box, w, h)
    ix0, iy0, ix1, iy1 = int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))
    if ix1 - ix0 < 4 or iy1 - iy0 < 4:
        return None
    grey = np.asarray(cv2.cvtColor(rgb[iy0:iy1, ix0:ix1], cv2.COLOR_RGB2GRAY))
    shrink = (ix1 - ix0) > _SHARP_PX
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.asarray(
        cv2.resize(grey, (_SHARP_PX, _SHARP_PX), interpolation=interp), dtype=np.float64
    )


def _band_ratio(grey: npt.NDArray[np.float64]) -> float:
    fine = cv2.GaussianBlur(grey, (0, 0), 1.0)
    coarse = cv2.GaussianBlur(grey, (0, 0), 2.0)
    finest = float(np.var(grey - fine))
    next_band = float(np.var(fine - coarse))
    if next_band < 1e-6:
        return 0.0
    return finest / next_band


def sharpness(rgb: npt.NDArray[np.uint8], box: Box) -> float:
    """How much of the face's finest detail survives: the face box, grey, resampled to 64x64;
    the variance of its finest band (the image minus its Gaussian blur at σ = 1 px) divided by
    the variance of the next band (σ 1 to 2 px). Natural sharp photographs have about equal
    energy in the two (0.9-1.3 measured on faces); blur removes the finest band first (0.5 for
    a blur of σ ≈ 1 px at this 64 px scale, 0.3 for σ ≈ 2 px). The ratio does not depend on
    exposure or contrast, and faces larger than 64 px are measured at the same scale."""
    crop = _face_crop_grey(rgb, box)
    if crop is None:
        return 0.0
    return _band_ratio(crop)


def image_sharpness(rgb: npt.NDArray[np.uint8]) -> float:
    """The :func:`sharpness` measure over the whole image (long side resampled to 128 px)."""
    h, w = rgb.shape[:2]
    scale = 128 / max(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    grey = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = np.asarray(cv2.resize(grey, size, interpolation=interp), dtype=np.float64)
    return _band_ratio(small)


def brightness(rgb: npt.NDArray[np.uint8], landmarks: npt.ArrayLike) -> float:
    """Mean BT.601 luma (0..255) inside the convex hull of the 68 landmarks (the skin)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    h, w = rgb.shape[:2]
    lo = np.clip(np.floor(pts.min(axis=0)).astype(int), 0, [w - 1, h - 1])
    hi = np.clip(np.ceil(pts.max(axis=0)).astype(int) + 1, lo + 1, [w, h])
    roi = rgb[lo[1] : hi[1], lo[0] : hi[0]]
    mask = np.zeros(roi.shape[:2], np.uint8)
    hull = cv2.convexHull(np.round((pts - lo) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    luma = np.asarray(cv2.cvtColor(roi, cv2.COLOR_RGB2GRAY))
    if not mask.any():
        return float(luma.mean())
    return float(luma[mask.astype(bool)].mean())


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _r(value: float, nd: int = 2) -> float:
    return round(float(value), nd)


def assess_quality(
    rgb: npt.NDArray[np.uint8],
    faces: Sequence[DetectedFace],
    *,
    backend: str,
    min_face_px: int = 96,
    multiple_face_ratio: float = 0.25,
    max_yaw_deg: float = 35.0,
    max_pitch_deg: float = 30.0,
    max_roll_deg: float = 30.0,
    min_brightness: float = 40.0,
    max_brightness: float = 220.0,
    min_sharpness: float = 0.45,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Measure everything; return (report, failures) where failures are (code, detail) in
    check order. ``faces`` is the analyzer's output for ``rgb`` (largest first). Thresholds:
    see the module doc."""
    checks: dict[str, str] = {code: "skipped" for code in REFUSAL_CODES}
    failures: list[tuple[str, str]] = []
    report: dict[str, Any] = {
        "backend": backend,
        "faces": len(faces),
        "image_size": [int(rgb.shape[1]), int(rgb.shape[0])],
        "checks": checks,
        "thresholds": {
            "min_face_px": min_face_px,
            "multiple_face_ratio": multiple_face_ratio,
            "max_yaw_deg": max_yaw_deg,
            "max_pitch_deg": max_pitch_deg,
            "max_roll_deg": max_roll_deg,
            "min_brightness": min_brightness,
            "max_brightness": max_brightness,
            "min_sharpness": min_sharpness,
        },
    }

    def verdict(code: str, ok: bool, detail: str) -> None:
        checks[code] = "pass" if ok else "fail"
        if not ok:
            failures.append((code, detail))

    if not faces:
        detail = "no face was found in the image"
        grey_std = float(np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)).std())
        if grey_std < 4.0:
            detail += " (the image is blank)"
        elif image_sharpness(rgb) < min_sharpness:
            detail += " (the image is very blurry, which can hide a face)"
        verdict("no_face", False, detail)
        return report, failures
    verdict("no_face", True, "")
    main = faces[0]
    # compared on landmark face boxes: detector boxes snap to the detector's pyramid levels
    # (dlib's can differ 1.4x in area for two identical faces)
    main_area = _area(face_box_from_landmarks(main.landmarks))
    others = [_area(face_box_from_landmarks(f.landmarks)) for f in faces[1:]]
    ratio = max(others) / main_area if others and main_area > 0 else 0.0
    report["second_face_ratio"] = _r(ratio, 3)
    boxes = sorted(face_box_from_landmarks(f.landmarks) for f in faces)  # left to right
    report["face_boxes"] = [[_r(v, 1) for v in b] for b in boxes]
    listed = "; ".join(
        f"{i}: x {b[0]:.0f}-{b[2]:.0f}, y {b[1]:.0f}-{b[3]:.0f}" for i, b in enumerate(boxes)
    )
    verdict(
        "multiple_faces",
        ratio < multiple_face_ratio,
        f"there is more than one face: another face is {ratio:.0%} the size of the main one "
        f"(at most {multiple_face_ratio:.0%} allowed); upload a picture of one person. "
        f"Faces found, left to right: {listed[:600]}",
    )

    box = face_box_from_landmarks(main.landmarks)
    size = min(box[2] - box[0], box[3] - box[1])
    report["detector_box"] = [_r(v, 1) for v in main.box]
    report["face_box"] = [_r(v, 1) for v in box]
    report["face_size_px"] = _r(size, 1)
    verdict(
        "face_too_small",
        size >= min_face_px,
        f"the face is too small: {size:.0f} px, at least {min_face_px} px needed",
    )

    yaw, pitch, roll = head_pose(main.landmarks)
    report.update(yaw_deg=_r(yaw, 1), pitch_deg=_r(pitch, 1), roll_deg=_r(roll, 1))
    turned = []
    if abs(yaw) > max_yaw_deg:
        turned.append(f"turned {abs(yaw):.0f}° to the side (at most {max_yaw_deg:.0f}°)")
    if abs(pitch) > max_pitch_deg:
        way = "up" if pitch > 0 else "down"
        turned.append(f"tilted {abs(pitch):.0f}° {way} (at most {max_pitch_deg:.0f}°)")
    if abs(roll) > max_roll_deg:
        turned.append(f"leaning {abs(roll):.0f}° sideways (at most {max_roll_deg:.0f}°)")
    verdict(
        "face_turned",
        not turned,
        "the face is not looking at the camera: " + ", ".join(turned),
    )

    luma = brightness(rgb, main.landmarks)
    report["brightness"] = _r(luma, 1)
    verdict(
        "too_dark",
        luma >= min_brightness,
        f"the face is too dark: mean brightness {luma:.0f} of 255, at least "
        f"{min_brightness:.0f} needed",
    )
    verdict(
        "too_bright",
        luma <= max_brightness,
        f"the face is too bright (overexposed): mean brightness {luma:.0f} of 255, at most "
        f"{max_brightness:.0f} allowed",
    )

    sharp = sharpness(rgb, box)
    report["sharpness"] = _r(sharp, 3)
    verdict(
        "too_blurry",
        sharp >= min_sharpness,
        f"the face is too blurry: sharpness {sharp:.2f}, at least {min_sharpness:.2f} needed",
    )
    return report, failures


def check_quality(
    rgb: npt.NDArray[np.uint8],
    faces: Sequence[DetectedFace],
    *,
    backend: str,
    **thresholds: Any,
) -> dict[str, Any]:
    """:func:`assess_quality`, raising :class:`RegistrationRefused` for the first failed check
    (in :data:`REFUSAL_CODES` order). Returns the report (JSON-ready) when all pass."""
    report, failures = assess_quality(rgb, faces, backend=backend, **thresholds)
    if failures:
        code, detail = failures[0]
        raise RegistrationRefused(code, detail)
    return report
