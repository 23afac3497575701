"""dlib backend (the default): HOG frontal-face detector + 68-point shape predictor.

- The HOG detector runs on a grey copy whose long side is at most 640 px (about 20 ms). Its
  window is 80 px, so it runs once more with dlib's 2x upsampling (4x the cost) when that
  finds nothing or when the largest face found is small enough that a second face big
  enough to matter (0.6x its size) could be under 80 px. Faces down to about 40 px in the
  copy are found (and refused as too small rather than as missing).
- The shape predictor (``face_recognition_models``' ``shape_predictor_68_face_landmarks``) runs
  on a grey crop around the box rescaled so the box is about 200 px wide: full-resolution
  detail for small faces, sub-pixel landmarks (dlib returns integer points) and the same cost
  (about 3 ms) whatever the frame size.

Thread safety: dlib's detector and predictor objects are not documented as safe for
concurrent calls, so each :class:`DlibAnalyzer` serialises its calls with a lock.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from avatars.analysis.base import (
    N_LANDMARKS,
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

__all__ = ["DlibAnalyzer", "ShapePredictor"]

# dlib's HOG detector window: the smallest face it finds without upsampling (pixels).
_HOG_WINDOW = 80.0
# Faces smaller than this fraction of the largest one (linear) do not matter for the
# multiple-faces check (0.6^2 = 36 % of the area, under its 40 % threshold).
_SECOND_FACE = 0.6
# The predictor sees the face box at about this width (pixels).
_PREDICT_BOX_PX = 200.0
# Context kept around the box in the predictor's crop (fraction of the box size, each side).
_PREDICT_CONTEXT = 0.5


def _overlap(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:
        raise AnalyzerError(
            f"the dlib face analysis backend needs the dlib-bin package: {exc}"
        ) from exc
    return dlib


class ShapePredictor:
    """dlib's 68-point shape predictor with the crop/rescale described in the module doc.
    Not thread-safe on its own (the analyzers that own one hold a lock around it)."""

    def __init__(self) -> None:
        dlib = _import_dlib()
        try:
            import face_recognition_models
        except ImportError as exc:
            raise AnalyzerError(
                f"dlib landmarks need the face-recognition-models package: {exc}"
            ) from exc
        path = face_recognition_models.pose_predictor_model_location()
        try:
            self._predictor = dlib.shape_predictor(path)
        except RuntimeError as exc:  # missing or corrupt model file
            raise AnalyzerError(f"cannot load dlib shape predictor {path}: {exc}") from exc
        self._rectangle = dlib.rectangle

    def __call__(self, rgb: Rgb, box: Box) -> Points:
        """68 landmarks (pixel centres, full-image coordinates) for the face in ``box`` (a box
        in dlib's HOG convention; other detectors' boxes should be converted first)."""
        height, width = rgb.shape[:2]
        x0, y0, x1, y1 = box
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx0 = int(np.clip(np.floor(x0 - _PREDICT_CONTEXT * bw), 0, width - 1))
        cy0 = int(np.clip(np.floor(y0 - _PREDICT_CONTEXT * bh), 0, height - 1))
        cx1 = int(np.clip(np.ceil(x1 + _PREDICT_CONTEXT * bw), cx0 + 1, width))
        cy1 = int(np.clip(np.ceil(y1 + _PREDICT_CONTEXT * bh), cy0 + 1, height))
        roi = np.asarray(cv2.cvtColor(rgb[cy0:cy1, cx0:cx1], cv2.COLOR_RGB2GRAY))
        k = _PREDICT_BOX_PX / bw
        rw, rh = max(1, round((cx1 - cx0) * k)), max(1, round((cy1 - cy0) * k))
        kx, ky = rw / (cx1 - cx0), rh / (cy1 - cy0)  # exact scales of the rounded size
        if (rw, rh) != roi.shape[::-1]:
            interp = cv2.INTER_AREA if k < 1.0 else cv2.INTER_LINEAR
            roi = np.asarray(cv2.resize(roi, (rw, rh), interpolation=interp))
        rect = self._rectangle(
            round((x0 - cx0) * kx),
            round((y0 - cy0) * ky),
            round((x1 - cx0) * kx) - 1,
            round((y1 - cy0) * ky) - 1,
        )
        shape = self._predictor(np.ascontiguousarray(roi), rect)
        pts = np.array(
            [(shape.part(i).x, shape.part(i).y) for i in range(N_LANDMARKS)], dtype=np.float64
        )
        # pixel centres: x_small = (x + 0.5) * k - 0.5
        pts[:, 0] = (pts[:, 0] + 0.5) / kx - 0.5 + cx0
        pts[:, 1] = (pts[:, 1] + 0.5) / ky - 0.5 + cy0
        return pts.astype(np.float32)


class DlibAnalyzer(Serialised):
    """HOG detector + shape predictor; models are loaded once, in the constructor (about 1 s,
    80 MB of memory). ``min_score``: HOG detections scoring lower are dropped (real faces
    score about 0.5-2; logos and patterns that fool HOG, about 0-0.2)."""

    name = "dlib"

    def __init__(self, *, max_detect_side: int = 640, min_score: float = 0.25) -> None:
        super().__init__()
        self._min_score = min_score
        dlib = _import_dlib()
        self._detector = dlib.get_frontal_face_detector()
        self._predict = ShapePredictor()
        self._max_side = max_detect_side

    def _run(self, grey: npt.NDArray[np.uint8], upsample: int) -> list[tuple[Box, float]]:
        rects, scores, _ = self._detector.run(grey, upsample, self._min_score)
        return [
            ((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s))
            for r, s in zip(rects, scores, strict=True)
        ]

    def _boxes(self, rgb: Rgb) -> list[tuple[Box, float]]:
        grey, scale = detection_copy(rgb, self._max_side)
        found = self._run(grey, 0)
        smallest_wanted = _SECOND_FACE * max((b[2] - b[0] for b, _ in found), default=0.0)
        if not found or smallest_wanted < _HOG_WINDOW:
            # faces under the HOG window are only found on a 2x upsampled copy; look there
            # too when there is nothing, or when a face big enough to matter could hide there
            for box, score in self._run(grey, 1):
                if all(_overlap(box, b) < 0.3 for b, _ in found):
                    found.append((box, score))
        return [
            ((b[0] / scale, b[1] / scale, b[2] / scale, b[3] / scale), score) for b, score in found
        ]

    def detect(self, rgb: Rgb) -> list[DetectedFace]:
        check_rgb(rgb)
        with self._lock:
            faces = [
                DetectedFace(box=box, score=score, landmarks=self._predict(rgb, box))
                for box, score in self._boxes(rgb)
            ]
        return sort_largest_first(faces)

    def landmarks_in_box(self, rgb: Rgb, box: Box) -> Points:
        check_rgb(rgb)
        with self._lock:
            return self._predict(rgb, box)
