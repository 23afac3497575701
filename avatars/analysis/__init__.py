"""Face analysis for avatar registration: detectors + 68-point landmarks behind one interface
(:mod:`avatars.analysis.base`). ``create_analyzer`` is the plugin factory: it imports the
backend it is asked for (and the backend its native library) only then.
"""

from avatars.analysis.base import (
    BACKENDS,
    AnalyzerError,
    DetectedFace,
    FaceAnalyzer,
    LandmarkTracker,
)

__all__ = [
    "BACKENDS",
    "AnalyzerError",
    "DetectedFace",
    "FaceAnalyzer",
    "LandmarkTracker",
    "create_analyzer",
]


def create_analyzer(
    backend: str,
    *,
    insightface_root: str | None = None,
    insightface_pack: str | None = None,
) -> FaceAnalyzer:
    """Build (and load the models of) the analyzer named ``backend``.

    - ``"dlib"`` (default choice): HOG detector + 68-point shape predictor
      (``face_recognition_models``).
    - ``"haar"``: OpenCV Haar cascade box + dlib's shape predictor when importable, else a
      mean-template landmark estimate.
    - ``"insightface"``: a model pack (SCRFD detector + 1k3d68 or 2d106det landmarks) read
      from ``insightface_root``; packs are never downloaded.

    Loading takes about a second (dlib's predictor is a 100 MB file): create one analyzer per
    process (or per worker thread) and reuse it. Raises :class:`AnalyzerError`."""
    if backend == "dlib":
        from avatars.analysis.dlib_backend import DlibAnalyzer

        return DlibAnalyzer()
    if backend == "haar":
        from avatars.analysis.haar_backend import HaarAnalyzer

        return HaarAnalyzer()
    if backend == "insightface":
        from avatars.analysis.insightface_backend import InsightFaceAnalyzer

        if not insightface_root:
            raise AnalyzerError(
                "the insightface backend needs a model folder (insightface_root): a folder "
                "holding models/<pack>/ with the pack's .onnx files; packs are never downloaded"
            )
        return InsightFaceAnalyzer(insightface_root, pack=insightface_pack)
    raise AnalyzerError(
        f"unknown face analysis backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    )
