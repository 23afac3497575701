"""Face analysis for avatar registration: detectors + 68-point landmarks behind one interface.

``create_analyzer("dlib" | "haar" | "insightface", insightface_root=...)`` builds one; see
:mod:`avatars.analysis.base`. Backends import their native libraries lazily.
"""

from avatars.analysis.base import (
    BACKENDS,
    AnalyzerError,
    DetectedFace,
    FaceAnalyzer,
    LandmarkTracker,
    create_analyzer,
)

__all__ = [
    "BACKENDS",
    "AnalyzerError",
    "DetectedFace",
    "FaceAnalyzer",
    "LandmarkTracker",
    "create_analyzer",
]
