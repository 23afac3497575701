"""insightface backend: a model pack (SCRFD detector + a landmark model) read from a folder.

Model packs (``buffalo_l``, ``buffalo_s``, ``antelopev2``...) are not on PyPI, and this server
never downloads one: the folder must already hold it, laid out the way insightface expects,
``<root>/models/<pack>/*.onnx`` (``root`` may also be the pack folder itself). A missing or
empty folder is an :class:`AnalyzerError` raised *before* insightface is asked for anything
(insightface would otherwise try to download the pack).

Landmarks: the pack's ``1k3d68`` model (68 points in iBUG order: its x, y are used as they
are) is preferred; otherwise ``2d106det`` (106 points) is mapped to dlib's 68.

Thread safety: calls on one :class:`InsightFaceAnalyzer` are serialised with a lock
(insightface's model objects keep per-call state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    sort_largest_first,
)

__all__ = ["DEFAULT_PACK", "InsightFaceAnalyzer", "map_106_to_68"]

DEFAULT_PACK = "buffalo_l"
_TASKS = ("detection", "landmark_3d_68", "landmark_2d_106")


def _106_jaw_order() -> list[int]:
    # 2d106det's 33 contour points: 0 is the chin; 1 (top) then 9..16 and 2..8 run down the
    # image-left side; 17 (top) then 25..32 and 18..24 run down the image-right side.
    left = [1, *range(9, 17), *range(2, 9)]
    right = [17, *range(25, 33), *range(18, 25)]
    return [*left, 0, *reversed(right)]


# dlib-68 index -> 2d106det index. Jaw: every second point of the ordered 33-point contour.
_MAP_106_TO_68: tuple[int, ...] = (
    *_106_jaw_order()[::2],
    # brows (17-21 image-left, outer to inner; 22-26 image-right, inner to outer)
    43, 48, 49, 51, 50,
    102, 103, 104, 105, 101,
    # nose bridge 27-30, nostrils 31-35
    72, 73, 74, 86,
    78, 79, 80, 85, 84,
    # eyes 36-41 (image-left), 42-47 (image-right): corner, two upper lid, corner, two lower
    35, 41, 42, 39, 37, 36,
    89, 95, 96, 93, 91, 90,
    # outer lip 48-59, inner lip 60-67
    52, 64, 63, 71, 67, 68, 61, 58, 59, 53, 56, 55,
    65, 66, 62, 70, 69, 57, 60, 54,
)  # fmt: skip


def map_106_to_68(points: npt.ArrayLike) -> Points:
    """2d106det landmarks (106, 2) -> dlib 68-point order (68, 2) float32."""
    pts = np.asarray(points, dtype=np.float32)
    if pts.shape[0] != 106 or pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"expected (106, 2) landmarks, got {pts.shape}")
    return np.ascontiguousarray(pts[list(_MAP_106_TO_68), :2])


def _find_pack(root: Path, pack: str | None) -> tuple[str, Path]:
    """(pack name, pack folder) or AnalyzerError naming what was expected."""
    expected = (
        f"expected {root}/models/<pack>/ holding the pack's .onnx files (a detector det_*.onnx "
        f"and a landmark model 1k3d68.onnx or 2d106det.onnx, e.g. the buffalo_l pack); "
        f"model packs are never downloaded"
    )
    if not root.is_dir():
        raise AnalyzerError(f"insightface model folder {root} does not exist: {expected}")
    if pack is None and any(root.glob("*.onnx")):
        return root.name, root  # the root is a pack folder
    candidates: list[Path]
    if pack is not None:
        candidates = [root / "models" / pack, root / pack]
    else:
        models = root / "models"
        found = sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
        preferred = [p for p in found if p.name == DEFAULT_PACK]
        candidates = preferred or found
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder.name, folder
    name = pack or DEFAULT_PACK
    raise AnalyzerError(
        f"insightface model pack {name!r} not found in {root} (no .onnx files in "
        f"{root / 'models' / name}): {expected}"
    )


class InsightFaceAnalyzer(Serialised):
    name = "insightface"

    def __init__(
        self,
        root: str | Path,
        *,
        pack: str | None = None,
        providers: Sequence[str] | None = None,
        det_size: tuple[int, int] = (640, 640),
    ) -> None:
        super().__init__()
        root = Path(root).expanduser()
        pack_name, pack_dir = _find_pack(root, pack)
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise AnalyzerError(
                f"the insightface backend needs the insightface package: {exc}"
            ) from exc
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        ctx_id = 0 if "CUDAExecutionProvider" in providers else -1
        try:
            if pack_dir == root / "models" / pack_name:
                app = FaceAnalysis(
                    name=pack_name,
                    root=str(root),
                    providers=list(providers),
                    allowed_modules=list(_TASKS),
                )
            else:  # a pack folder given directly (insightface accepts a folder as the name)
                app = FaceAnalysis(
                    name=str(pack_dir), providers=list(providers), allowed_modules=list(_TASKS)
                )
            app.prepare(ctx_id=ctx_id, det_size=det_size)
        except Exception as exc:  # insightface raises anything: asserts, ORT errors...
            raise AnalyzerError(
                f"insightface model pack {pack_dir} could not be loaded "
                f"({type(exc).__name__}: {exc}); expected the pack's .onnx files "
                f"(det_*.onnx and 1k3d68.onnx or 2d106det.onnx), unmodified"
            ) from exc
        models: dict[str, Any] = dict(app.models)
        if "detection" not in models:
            raise AnalyzerError(f"insightface model pack {pack_dir} has no face detector")
        self._landmark_task = next(
            (t for t in ("landmark_3d_68", "landmark_2d_106") if t in models), None
        )
        if self._landmark_task is None:
            raise AnalyzerError(
                f"insightface model pack {pack_dir} has no landmark model "
                f"(1k3d68.onnx or 2d106det.onnx)"
            )
        self._app = app
        self._landmark_model = models[self._landmark_task]
        self.pack = pack_name
        self.pack_dir = pack_dir

    def _to_68(self, raw: Any) -> Points:
        pts = np.asarray(raw, dtype=np.float32)
        if self._landmark_task == "landmark_3d_68":
            return np.ascontiguousarray(pts[:, :2])
        return map_106_to_68(pts)

    def detect(self, rgb: Rgb) -> list[DetectedFace]:
        check_rgb(rgb)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface takes OpenCV's BGR
        with self._lock:
            found = self._app.get(bgr)
        faces = []
        for f in found:
            raw = f.get(self._landmark_task)
            if raw is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in f.bbox[:4])
            faces.append(
                DetectedFace(
                    box=(x0, y0, x1, y1), score=float(f.det_score), landmarks=self._to_68(raw)
                )
            )
        return sort_largest_first(faces)

    def landmarks_in_box(self, rgb: Rgb, box: Box) -> Points:
        check_rgb(rgb)
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        face = Face(bbox=np.asarray(box, dtype=np.float32), kps=None, det_score=1.0)
        with self._lock:
            raw = self._landmark_model.get(bgr, face)
        return self._to_68(raw)
