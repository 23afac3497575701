"""Haar backend: OpenCV's frontal-face Haar cascade for the box.

Landmarks: when dlib's shape predictor is importable (dlib-bin + face-recognition-models),
the Haar box is converted to the box convention the predictor was trained with and the
predictor runs on it (then once more on a box re-centred on its own landmarks). Otherwise
the landmarks are **estimates**: a mean frontal 68-point template scaled into the Haar box.
Template landmarks do not follow the mouth, eyes or head pose; they are good enough for
crops and coarse masks of a frontal face, not for lip-sync geometry.

Thread safety: ``cv2.CascadeClassifier`` is not documented as safe for concurrent calls on
one object, so each :class:`HaarAnalyzer` serialises its calls with a lock.
"""

from __future__ import annotations

import cv2
import cv2.data  # the cascades' folder (not in OpenCV's type stubs)
import numpy as np
import numpy.typing as npt

from avatars.analysis.base import (
    AnalyzerError,
    Box,
    DetectedFace,
    Points,
    Rgb,
    Serialised,
    check_rgb,
    detection_copy,
    sort_largest_first,
)

__all__ = ["MEAN_TEMPLATE", "HaarAnalyzer", "dlib_box_from_landmarks", "template_landmarks"]

# Mean frontal face, dlib 68-point order, in units of the Haar box: (0, 0) is its top-left
# corner, (1, 1) its bottom-right. Made once from the default avatar's landmarks in its Haar
# box, averaged with their mirror image so the template is left/right symmetric.
MEAN_TEMPLATE: npt.NDArray[np.float32] = np.array(
    [
        (0.015, 0.416),
        (0.022, 0.539),
        (0.039, 0.659),
        (0.062, 0.782),
        (0.100, 0.900),
        (0.173, 1.004),
        (0.271, 1.089),
        (0.379, 1.161),
        (0.500, 1.183),
        (0.621, 1.161),
        (0.729, 1.089),
        (0.827, 1.004),
        (0.900, 0.900),
        (0.938, 0.782),
        (0.961, 0.659),
        (0.978, 0.539),
        (0.985, 0.416),
        (0.083, 0.318),
        (0.142, 0.254),
        (0.228, 0.239),
        (0.316, 0.250),
        (0.398, 0.283),
        (0.602, 0.283),
        (0.684, 0.250),
        (0.772, 0.239),
        (0.858, 0.254),
        (0.917, 0.318),
        (0.500, 0.380),
        (0.500, 0.467),
        (0.500, 0.554),
        (0.500, 0.643),
        (0.393, 0.687),
        (0.445, 0.702),
        (0.500, 0.717),
        (0.555, 0.702),
        (0.607, 0.687),
        (0.182, 0.385),
        (0.238, 0.347),
        (0.307, 0.352),
        (0.368, 0.405),
        (0.303, 0.412),
        (0.233, 0.412),
        (0.632, 0.405),
        (0.693, 0.352),
        (0.762, 0.347),
        (0.818, 0.385),
        (0.767, 0.412),
        (0.697, 0.412),
        (0.264, 0.779),
        (0.351, 0.775),
        (0.439, 0.776),
        (0.500, 0.788),
        (0.561, 0.776),
        (0.649, 0.775),
        (0.736, 0.779),
        (0.655, 0.888),
        (0.567, 0.935),
        (0.500, 0.943),
        (0.433, 0.935),
        (0.345, 0.888),
        (0.295, 0.791),
        (0.438, 0.812),
        (0.500, 0.822),
        (0.562, 0.812),
        (0.705, 0.791),
        (0.565, 0.879),
        (0.500, 0.888),
        (0.435, 0.879),
    ],  # fmt: skip
    dtype=np.float32,
)

# Haar box -> dlib HOG box (what the shape predictor expects), in units of the Haar box
# size: measured on the default avatar (Haar 177,66,272,161; HOG 179,83,267,171).
_HOG_SHIFT_X = -0.016
_HOG_SHIFT_Y = 0.142
_HOG_SCALE = 0.926
# HOG box from landmarks: side = this x the landmark extent, centre raised by _LM_RAISE x the
# landmark height (same measurement).
_LM_SIDE = 0.96
_LM_RAISE = 0.063

_CASCADE = "haarcascade_frontalface_default.xml"


def template_landmarks(box: Box) -> Points:
    """The mean template fitted into a Haar box (an estimate, see the module doc)."""
    x0, y0, x1, y1 = box
    size = np.array([x1 - x0, y1 - y0], dtype=np.float32)
    return (MEAN_TEMPLATE * size + np.array([x0, y0], dtype=np.float32)).astype(np.float32)


def dlib_box_from_haar(box: Box) -> Box:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx = (x0 + x1) / 2 + _HOG_SHIFT_X * side
    cy = (y0 + y1) / 2 + _HOG_SHIFT_Y * side
    half = _HOG_SCALE * side / 2
    return (cx - half, cy - half, cx + half, cy + half)


def dlib_box_from_landmarks(landmarks: Points) -> Box:
    """A box in dlib's HOG convention around 68 landmarks (to re-run the predictor on)."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    ext = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    cx = float(lo[0] + hi[0]) / 2
    cy = float(lo[1] + hi[1]) / 2 - _LM_RAISE * float(hi[1] - lo[1])
    half = _LM_SIDE * ext / 2
    return (cx - half, cy - half, cx + half, cy + half)


class HaarAnalyzer(Serialised):
    """Haar cascade box + dlib landmarks (or template estimates, ``use_dlib=False`` or dlib
    missing). ``landmarks_are_estimates`` says which."""

    name = "haar"

    def __init__(
        self,
        *,
        use_dlib: bool | None = None,
        max_detect_side: int = 640,
        min_neighbors: int = 5,
    ) -> None:
        super().__init__()
        path = cv2.data.haarcascades + _CASCADE
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise AnalyzerError(f"cannot load OpenCV Haar cascade {path}")
        self._max_side = max_detect_side
        self._min_neighbors = min_neighbors
        self._predict = None
        if use_dlib is not False:
            try:
                from avatars.analysis.dlib_backend import ShapePredictor

                self._predict = ShapePredictor()
            except AnalyzerError:
                if use_dlib:
                    raise
        self.landmarks_are_estimates = self._predict is None

    def _landmarks(self, rgb: Rgb, box: Box) -> Points:
        if self._predict is None:
            return template_landmarks(box)
        pts = self._predict(rgb, dlib_box_from_haar(box))
        return self._predict(rgb, dlib_box_from_landmarks(pts))

    def detect(self, rgb: Rgb) -> list[DetectedFace]:
        check_rgb(rgb)
        grey, scale = detection_copy(rgb, self._max_side)
        grey = np.asarray(cv2.equalizeHist(grey))
        with self._lock:
            rects, neighbours = self._cascade.detectMultiScale2(
                grey, scaleFactor=1.1, minNeighbors=self._min_neighbors, minSize=(36, 36)
            )
            faces = []
            for (x, y, w, h), n in zip(rects, neighbours, strict=True):
                box = (
                    float(x / scale),
                    float(y / scale),
                    float((x + w) / scale),
                    float((y + h) / scale),
                )
                faces.append(
                    DetectedFace(box=box, score=float(n), landmarks=self._landmarks(rgb, box))
                )
        return sort_largest_first(faces)

    def landmarks_in_box(self, rgb: Rgb, box: Box) -> Points:
        check_rgb(rgb)
        with self._lock:
            return self._landmarks(rgb, box)
