"""A fake ``prepare_avatar`` (avatars/LAYOUT.md): no face detector, instant.

It "finds" one face in the middle of every frame (the default avatar's landmarks, scaled into
a centred box) and builds crops, masks and a thumbnail from it, so the store, the service,
the API and the CLI can be tested without the real analysis. It refuses like the real one
(a 422 with a code) when told to, or for frames of one flat colour ("no_face")."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from avatars.model import DEFAULT_AVATAR_DIR
from common.errors import AvatarServerError


class FakeRefused(AvatarServerError):
    """Shaped like ``avatars.prepare.RegistrationRefused``."""

    status = 422

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class FakePreparedAvatar:
    frames: list[np.ndarray]
    fps: float
    boxes: np.ndarray
    landmarks: np.ndarray
    crops: np.ndarray
    mouth_masks: np.ndarray
    face_masks: np.ndarray
    thumbnail_jpeg: bytes
    quality: dict[str, Any]


def _template() -> np.ndarray:
    """The default avatar's 68 landmarks normalised to a unit box."""
    meta = json.loads((DEFAULT_AVATAR_DIR / "avatar.json").read_text(encoding="utf-8"))
    pts = np.array(meta["landmarks"], dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - lo) / (hi - lo)


@dataclass
class FakeAnalyzer:
    name: str = "fake"


@dataclass
class FakePrepare:
    """Callable like ``prepare_avatar(media, analyzer, *, crop_size, progress)``."""

    refuse: tuple[str, str] | None = None  # (code, detail) to refuse every upload with
    refuse_flat: bool = True  # one flat colour -> no_face
    sleep_s: float = 0.0
    calls: int = 0
    threads: list[str] = field(default_factory=list)
    crop_sizes: list[int] = field(default_factory=list)
    thresholds: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self,
        media: Any,
        analyzer: Any,
        *,
        crop_size: int = 96,
        progress: Callable[[float], None] | None = None,
        quality_thresholds: Mapping[str, Any] | None = None,
    ) -> FakePreparedAvatar:
        with self._lock:
            self.calls += 1
            self.threads.append(threading.current_thread().name)
            self.crop_sizes.append(crop_size)
            self.thresholds.append(dict(quality_thresholds or {}))
        if self.sleep_s:
            threading.Event().wait(self.sleep_s)
        if self.refuse is not None:
            raise FakeRefused(*self.refuse)
        frames = list(media.frames)
        if self.refuse_flat and float(np.std(frames[0])) < 1.0:
            raise FakeRefused("no_face", "no face found in the picture")
        h, w = frames[0].shape[:2]
        side = 0.5 * min(w, h)
        x0, y0 = (w - side) / 2, (h - side) / 2
        template = _template()
        n = len(frames)
        landmarks = np.empty((n, 68, 2), np.float32)
        boxes = np.empty((n, 4), np.float32)
        crops = np.empty((n, crop_size, crop_size, 3), np.uint8)
        mouth = np.zeros((n, crop_size, crop_size), np.uint8)
        face = np.zeros((n, crop_size, crop_size), np.uint8)
        c = crop_size // 2
        for i, rgb in enumerate(frames):
            landmarks[i] = template * side + (x0, y0)
            boxes[i] = (x0, y0, x0 + side, y0 + side)
            patch = rgb[int(y0) : int(y0 + side), int(x0) : int(x0 + side)]
            crops[i] = cv2.resize(patch, (crop_size, crop_size), interpolation=cv2.INTER_AREA)
            cv2.ellipse(face[i], (c, c), (c - 2, c - 2), 0, 0, 360, 255, -1)
            cv2.ellipse(mouth[i], (c, c + c // 2), (c // 3, c // 6), 0, 0, 360, 255, -1)
            if progress is not None:
                progress((i + 1) / n)
        thumb = cv2.resize(frames[0], (64, 64), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
        assert ok
        return FakePreparedAvatar(
            frames=frames,
            fps=media.fps if n > 1 else 0.0,
            boxes=boxes,
            landmarks=landmarks,
            crops=crops,
            mouth_masks=mouth,
            face_masks=face,
            thumbnail_jpeg=jpeg.tobytes(),
            quality={"face_px": np.float32(side), "sharpness": 123.4, "analyzer": "fake"},
        )


# --------------------------------------------------------------------------- sample media


def portrait_rgb(size: tuple[int, int] | None = None) -> np.ndarray:
    """The default avatar's portrait (a real face), optionally resized to (w, h)."""
    bgr = cv2.imread(str(DEFAULT_AVATAR_DIR / "astronaut.png"), cv2.IMREAD_COLOR)
    assert bgr is not None
    if size is not None:
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def encode_image(rgb: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params or [])
    assert ok
    return buf.tobytes()


def moving_frames(n: int, size: tuple[int, int] = (256, 256)) -> list[np.ndarray]:
    """``n`` frames of the portrait gently swaying (a small circular shift)."""
    base = portrait_rgb(size)
    out = []
    for i in range(n):
        dx = round(3 * np.sin(2 * np.pi * i / max(n, 1)))
        m = np.float32([[1, 0, dx], [0, 1, 0]])
        out.append(cv2.warpAffine(base, m, size, borderMode=cv2.BORDER_REFLECT))
    return out


def encode_video(
    frames: list[np.ndarray],
    fps: float = 25,
    *,
    container: str = "mp4",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
) -> bytes:
    """Frames as a video file in memory (mp4, mov, webm, matroska, gif)."""
    import io
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@dataclass
class FrameMedia:
    """Decoded media held in memory (what ``prepare_avatar`` reads), for tests and benches."""

    kind: str
    frames: list[np.ndarray]
    fps: float = 0.0
    width: int = field(init=False)
    height: int = field(init=False)

    def __post_init__(self) -> None:
        self.height, self.width = self.frames[0].shape[:2]
