"""One interface over the face detectors/landmarkers used at registration time.

Every backend returns :class:`DetectedFace` objects: a detector box, a score and 68 landmarks
in dlib's 68-point (iBUG 300-W) order, whatever the backend's native markup is.

Coordinates: landmarks are pixel *centres* (pixel ``(i, j)`` is the point ``x=i, y=j``);
boxes are ``(x0, y0, x1, y1)`` floats with ``x1 - x0`` the width in pixels. Box conventions
differ between detectors (dlib's HOG box is tight, from the brows to the lower lip/chin;
Haar and SCRFD boxes take in more forehead), so code that needs a backend-independent face
box derives it from the landmarks (:func:`avatars.quality.face_box_from_landmarks`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt

from common.errors import AvatarServerError

__all__ = [
    "BACKENDS",
    "N_LANDMARKS",
    "AnalyzerError",
    "Box",
    "DetectedFace",
    "FaceAnalyzer",
    "LandmarkTracker",
]

N_LANDMARKS = 68
BACKENDS = ("dlib", "haar", "insightface")

Box = tuple[float, float, float, float]
Rgb = npt.NDArray[np.uint8]
Points = npt.NDArray[np.float32]

# Long side of the copy the box detectors run on (boxes are mapped back to full resolution).
DETECT_MAX_SIDE = 640


class AnalyzerError(AvatarServerError):
    """A face-analysis backend is unknown, not installed, or its model files are missing or
    broken (HTTP 500: a server configuration problem, not the upload's fault)."""

    status = 500
    code = "face_analyzer_unavailable"


@dataclass(frozen=True, slots=True, eq=False)
class DetectedFace:
    """One face: detector ``box`` (x0, y0, x1, y1), detector ``score`` (backend-specific
    scale: higher is more confident) and ``landmarks`` (68, 2) float32, dlib 68-point order."""

    box: Box
    score: float
    landmarks: Points

    def __post_init__(self) -> None:
        if self.landmarks.shape != (N_LANDMARKS, 2):
            raise ValueError(f"landmarks must be ({N_LANDMARKS}, 2), got {self.landmarks.shape}")

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)


@runtime_checkable
class FaceAnalyzer(Protocol):
    """Finds faces in an RGB uint8 image. ``detect`` returns all faces, largest box first."""

    name: str

    def detect(self, rgb: Rgb) -> list[DetectedFace]: ...


@runtime_checkable
class LandmarkTracker(Protocol):
    """Optional extra of an analyzer: 68 landmarks for a face known to be in ``box`` (a box in
    this backend's detector convention), without running the detector. Video preparation
    uses it between detections; analyzers without it are asked to ``detect`` every frame."""

    def landmarks_in_box(self, rgb: Rgb, box: Box) -> Points: ...


def sort_largest_first(faces: list[DetectedFace]) -> list[DetectedFace]:
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def check_rgb(rgb: Rgb) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")


def detection_copy(
    rgb: Rgb, max_side: int = DETECT_MAX_SIDE
) -> tuple[npt.NDArray[np.uint8], float]:
    """Grey copy scaled so its long side is at most ``max_side``, and the scale used
    (small = full * scale, in pixel-edge coordinates)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = rgb
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
        scale = size[0] / w  # the exact scale of the rounded size (x; y differs < 1 px)
    grey = np.asarray(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    return grey, scale


def clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return (
        min(max(x0, 0.0), float(width)),
        min(max(y0, 0.0), float(height)),
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
    )


class Serialised:
    """Mixin: one lock per analyzer object. The native detectors (dlib, OpenCV's cascade,
    insightface's models) keep per-call scratch state, so calls on one analyzer never overlap;
    for parallel registrations create one analyzer per worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

