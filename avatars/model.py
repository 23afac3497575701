"""Avatar assets: a portrait image (or an idle loop video) plus 68 face landmarks.

An avatar directory holds ``avatar.json``::

    {"id": "default", "name": "...", "image": "portrait.png",
     "landmarks": [[x, y], ... 68 points, dlib 68-point order, pixels in the image],
     "loop_video": "idle.mp4"}            # optional

``load_avatar_dir`` fits everything to the output video size (scale to cover, then crop
around the face) so the renderer works directly in output pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

DEFAULT_AVATAR_DIR: Path = Path(__file__).resolve().parent / "default"
BUILTIN_ID = "default"  # the id of the avatar shipped in DEFAULT_AVATAR_DIR
N_LANDMARKS = 68
# The face box (landmark bounding box grown by this fraction of its size on each side, more
# on top for the forehead and hair) is kept inside the crop whenever it fits.
_FACE_MARGIN = 0.35
_FACE_MARGIN_TOP = 0.8

Rgb = npt.NDArray[np.uint8]


class AvatarError(ValueError):
    """An avatar directory is missing files or holds invalid data."""


@dataclass(frozen=True, slots=True)
class Avatar:
    avatar_id: str
    name: str
    image: Rgb  # HxWx3 uint8 RGB at the output video size
    landmarks: npt.NDArray[np.float32]  # (68, 2) dlib 68-point order, pixel coords in `image`
    loop_frames: tuple[Rgb, ...] = ()  # optional idle loop frames (RGB, same size)
    loop_fps: float = 0.0
    # per loop frame: (68, 2) landmarks in output pixels (registered video avatars); empty:
    # ``landmarks`` holds for every frame
    loop_landmarks: tuple[npt.NDArray[np.float32], ...] = ()
    loop_mode: str = "pingpong"  # "pingpong" (0..n-1..0) or "cycle" (0..n-1, 0..: seamless)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise AvatarError(
                f"image must be HxWx3 uint8, got {self.image.shape} {self.image.dtype}"
            )
        if self.landmarks.shape != (N_LANDMARKS, 2):
            raise AvatarError(f"landmarks must be ({N_LANDMARKS}, 2), got {self.landmarks.shape}")
        for frame in self.loop_frames:
            if frame.shape != self.image.shape or frame.dtype != np.uint8:
                raise AvatarError("loop frames must have the image's shape and dtype")
        if self.loop_frames and not (math.isfinite(self.loop_fps) and self.loop_fps > 0):
            raise AvatarError(f"loop_fps must be > 0 with loop frames, got {self.loop_fps}")
        if self.loop_landmarks and len(self.loop_landmarks) != len(self.loop_frames):
            raise AvatarError(
                f"{len(self.loop_landmarks)} landmark sets for {len(self.loop_frames)} loop frames"
            )
        if any(lm.shape != (N_LANDMARKS, 2) for lm in self.loop_landmarks):
            raise AvatarError(f"loop landmarks must be ({N_LANDMARKS}, 2) each")
        if self.loop_mode not in ("pingpong", "cycle"):
            raise AvatarError(f"loop_mode must be 'pingpong' or 'cycle', got {self.loop_mode!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class _Fit:
    """Scale to cover, then crop: ``dst = (src + 0.5) * (sw / src_w) - 0.5 - x0`` (same in y)."""

    src_w: int
    src_h: int
    sw: int  # scaled size, before the crop
    sh: int
    x0: int
    y0: int
    width: int
    height: int

    def apply_image(self, rgb: Rgb) -> Rgb:
        scaled = rgb
        if (self.sw, self.sh) != (self.src_w, self.src_h):
            shrink = self.sw < self.src_w
            interp = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
            scaled = np.asarray(cv2.resize(rgb, (self.sw, self.sh), interpolation=interp))
        out = scaled[self.y0 : self.y0 + self.height, self.x0 : self.x0 + self.width]
        return np.ascontiguousarray(out, dtype=np.uint8)

    def apply_points(self, pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        scale = np.array([self.sw / self.src_w, self.sh / self.src_h])
        return (pts + 0.5) * scale - 0.5 - np.array([self.x0, self.y0], dtype=np.float64)


def _plan_fit(
    src_w: int, src_h: int, landmarks: npt.NDArray[np.float64], width: int, height: int
) -> _Fit:
    scale = max(width / src_w, height / src_h)
    sw, sh = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    fit = _Fit(src_w, src_h, sw, sh, 0, 0, width, height)
    face = fit.apply_points(landmarks)
    fx0, fy0 = face.min(axis=0)
    fx1, fy1 = face.max(axis=0)
    fw, fh = fx1 - fx0, fy1 - fy0
    box = (
        fx0 - _FACE_MARGIN * fw,
        fy0 - _FACE_MARGIN_TOP * fh,
        fx1 + _FACE_MARGIN * fw,
        fy1 + _FACE_MARGIN * fh,
    )

    def place(size: int, full: int, lo: float, hi: float) -> int:
        start = (full - size) / 2.0  # centre crop ...
        if hi - lo <= size:  # ... moved as little as needed to keep the face box inside
            start = min(max(start, hi - size), lo)
        else:  # face box larger than the frame: centre on it
            start = (lo + hi - size) / 2.0
        return int(round(min(max(start, 0.0), float(full - size))))

    return _Fit(
        src_w,
        src_h,
        sw,
        sh,
        x0=place(width, sw, box[0], box[2]),
        y0=place(height, sh, box[1], box[3]),
        width=width,
        height=height,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AvatarError(f"missing {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AvatarError(f"bad avatar json {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise AvatarError(f"bad avatar json {path}: top level must be an object")
    return meta


def _str_field(meta: dict[str, Any], key: str, path: Path, default: str | None = None) -> str:
    value = meta.get(key, default)
    if not isinstance(value, str) or not value:
        raise AvatarError(f"{path}: field {key!r} must be a non-empty string")
    return value


def _parse_landmarks(meta: dict[str, Any], path: Path) -> npt.NDArray[np.float64]:
    raw = meta.get("landmarks")
    if not isinstance(raw, list):
        raise AvatarError(f"{path}: 'landmarks' must be a list of [x, y]")
    if len(raw) != N_LANDMARKS:
        raise AvatarError(f"{path}: expected {N_LANDMARKS} landmarks, got {len(raw)}")
    try:
        pts = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AvatarError(f"{path}: landmarks must be numbers: {exc}") from exc
    if pts.shape != (N_LANDMARKS, 2) or not np.all(np.isfinite(pts)):
        raise AvatarError(f"{path}: landmarks must be {N_LANDMARKS} finite [x, y] pairs")
    return pts


def _resolve(base: Path, name: str, what: str) -> Path:
    p = (base / name).resolve()
    if not p.is_file():
        raise AvatarError(f"missing {what} file {p}")
    return p


def _read_image(path: Path) -> Rgb:
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise AvatarError(f"cannot decode image {path}")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def _read_loop_video(path: Path, fit_frame: Callable[[Rgb], Rgb]) -> tuple[list[Rgb], float]:
    """Decode the loop video, fitting each frame as it comes (``fit_frame``) so that only
    output-sized frames are ever held: a 10 s 720p loop would otherwise peak at ~700 MB."""
    import av  # imported lazily: only loop-video avatars need it

    frames: list[Rgb] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AvatarError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.base_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            for frame in container.decode(stream):
                rgb: Rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
                frames.append(fit_frame(rgb))
    except AvatarError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AvatarError(f"cannot decode loop video {path}: {exc}") from exc
    if not frames:
        raise AvatarError(f"loop video {path} has no frames")
    if not (math.isfinite(fps) and fps > 0):
        fps = 25.0
    return frames, fps


def load_avatar_dir(path: Path, *, width: int, height: int) -> Avatar:
    """Load ``path/avatar.json`` and fit the avatar to ``width`` x ``height`` output pixels.

    Raises ``AvatarError`` (a ``ValueError``) for a missing directory/file, bad JSON, a wrong
    landmark count or an undecodable image/video.
    """
    if width <= 0 or height <= 0:
        raise AvatarError(f"bad output size {width}x{height}")
    path = Path(path)
    if not path.is_dir():
        raise AvatarError(f"avatar directory {path} does not exist")
    json_path = path / "avatar.json"
    meta = _read_json(json_path)
    avatar_id = _str_field(meta, "id", json_path, default=path.name)
    name = _str_field(meta, "name", json_path, default=avatar_id)
    image_path = _resolve(path, _str_field(meta, "image", json_path), "image")
    landmarks = _parse_landmarks(meta, json_path)

    src = _read_image(image_path)
    src_h, src_w = src.shape[:2]
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    if lo[0] < -0.5 or lo[1] < -0.5 or hi[0] > src_w - 0.5 or hi[1] > src_h - 0.5:
        raise AvatarError(f"{json_path}: landmarks lie outside the {src_w}x{src_h} image")
    fit = _plan_fit(src_w, src_h, landmarks, width, height)
    image = fit.apply_image(src)

    loop_frames: tuple[Rgb, ...] = ()
    loop_fps = 0.0
    loop_name = meta.get("loop_video")
    if loop_name is not None:
        if not isinstance(loop_name, str) or not loop_name:
            raise AvatarError(f"{json_path}: 'loop_video' must be a non-empty string")

        def fit_frame(frame: Rgb) -> Rgb:
            vh, vw = frame.shape[:2]
            if (vh, vw) != (src_h, src_w):
                # the loop video must show the image's framing (landmarks are the image's)
                if abs(vw / vh - src_w / src_h) > 0.01 * (src_w / src_h):
                    raise AvatarError(
                        f"loop video {loop_name} is {vw}x{vh}: aspect ratio differs from "
                        f"the {src_w}x{src_h} image"
                    )
                interp = cv2.INTER_AREA if vw > src_w else cv2.INTER_CUBIC
                frame = np.asarray(cv2.resize(frame, (src_w, src_h), interpolation=interp))
            return fit.apply_image(frame)

        fitted, loop_fps = _read_loop_video(_resolve(path, loop_name, "loop video"), fit_frame)
        loop_frames = tuple(fitted)

    loop_landmarks: tuple[npt.NDArray[np.float32], ...] = ()
    face_data = path / "face_data.npz"
    if loop_frames and face_data.is_file():
        try:
            with np.load(face_data) as data:
                per_frame = np.asarray(data["landmarks"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as exc:
            raise AvatarError(f"cannot read {face_data}: {exc}") from exc
        if per_frame.shape != (len(loop_frames), N_LANDMARKS, 2):
            raise AvatarError(
                f"{face_data}: landmarks {per_frame.shape} do not match "
                f"{len(loop_frames)} loop frames"
            )
        loop_landmarks = tuple(fit.apply_points(lm).astype(np.float32) for lm in per_frame)
        for lm in loop_landmarks:
            lm.setflags(write=False)
    loop_mode = meta.get("loop_mode", "pingpong")
    if loop_mode not in ("pingpong", "cycle"):
        raise AvatarError(f"{json_path}: 'loop_mode' must be 'pingpong' or 'cycle'")

    image.setflags(write=False)
    pts = fit.apply_points(landmarks).astype(np.float32)
    pts.setflags(write=False)
    for frame in loop_frames:
        frame.setflags(write=False)
    return Avatar(
        avatar_id=avatar_id,
        name=name,
        image=image,
        landmarks=pts,
        loop_frames=loop_frames,
        loop_fps=loop_fps,
        loop_landmarks=loop_landmarks,
        loop_mode=str(loop_mode),
    )
