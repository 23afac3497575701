"""An avatar's media as written to its folder: the JPEG thumbnail (the one maker, used by
registration and for the built-in avatar) and the idle loop's MP4."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

Rgb = npt.NDArray[np.uint8]

THUMBNAIL_SIDE = 256  # the long side, in pixels (smaller images stay as they are)
THUMBNAIL_QUALITY = 85
LOOP_CRF = 18


def make_thumbnail(rgb: Rgb, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG whose long side is at most ``side`` pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    if not ok:
        raise ValueError("cannot encode the thumbnail")
    return bytes(buf.tobytes())


def encode_loop(
    path: Path,
    frames: Sequence[Rgb],
    fps: float,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Write ``frames`` as an H.264 MP4 (crf 18; yuv420p, or yuv444p for odd sizes so every
    pixel keeps its place). Falls back to high-quality MPEG-4 Part 2 without libx264."""
    import av  # lazily: only loop videos need it

    h, w = frames[0].shape[:2]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as container:
        if "libx264" in av.codecs_available:
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
            stream.options = {"crf": str(LOOP_CRF), "preset": "fast"}
        else:
            if w % 2 or h % 2:
                raise ValueError(f"odd frame size {w}x{h} needs libx264")
            stream = container.add_stream("mpeg4", rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": "2"}
        stream.width, stream.height = w, h
        stream.time_base = Fraction(1, 1) / rate
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
            if progress is not None:
                progress((i + 1) / len(frames))
        for packet in stream.encode(None):
            container.mux(packet)
