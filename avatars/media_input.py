"""Uploaded media → RGB frames: the type comes from the content (magic bytes), confirmed by
a real decode; the file name is never consulted.

Supported: JPEG, PNG, WebP (stills, OpenCV); GIF, MP4, MOV, WebM/Matroska (PyAV, with the
demuxer forced to the detected container so no other parser sees the bytes).

Memory stays bounded whatever the upload claims: header dimensions are checked before any
pixel is decoded, frames are scaled down as they are decoded (long side at most
``max_side``), video frame rates are capped at ``max_fps`` (frames dropped by timestamp), and
a video's frames are sized so that all of them fit in ``max_frames_bytes``. Frames always have
even width and height (one edge column/row is dropped if needed) so they encode as yuv420p.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from common.errors import AvatarServerError

__all__ = [
    "MAX_SOURCE_PIXELS",
    "DecodedMedia",
    "MediaTooLarge",
    "MediaTooLong",
    "Sniffed",
    "UnsupportedMedia",
    "sniff",
    "sniff_and_decode",
]

Rgb = npt.NDArray[np.uint8]
MediaKind = Literal["image", "video", "gif"]

SUPPORTED = "JPEG, PNG, WebP, GIF, MP4, MOV or WebM"
# Largest source frame (width x height) ever decoded; a JPEG may be larger when its
# reduced-size decode (1/2, 1/4, 1/8) fits under it.
MAX_SOURCE_PIXELS = 50_000_000
DEFAULT_MAX_SIDE = 1280
DEFAULT_MAX_FPS = 30.0
# A video's decoded frames together (they are all held until the avatar is stored): 10 s
# at 25 fps keep 955x537 of a 1280x720 source, more than a 512x512 call needs.
DEFAULT_MAX_FRAMES_BYTES = 384 * 1024 * 1024
# Container durations are rounded; this much over the limit is still accepted.
_DURATION_SLACK_S = 0.05


class UnsupportedMedia(AvatarServerError):
    """Not an image/video type we accept, or it does not decode (HTTP 415)."""

    status = 415
    code = "unsupported_media"


class MediaTooLong(AvatarServerError):
    """A video or animation longer than the configured limit (HTTP 422)."""

    status = 422
    code = "video_too_long"


class MediaTooLarge(AvatarServerError):
    """Frame dimensions too large to decode safely (HTTP 422)."""

    status = 422
    code = "resolution_too_high"


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the magic bytes say: a label for messages ("a PNG image"), the MIME type, the
    kind and, for PyAV, the demuxer to force (None for stills decoded by OpenCV)."""

    label: str
    mime: str
    kind: MediaKind
    demuxer: str | None


@dataclass(frozen=True, slots=True)
class DecodedMedia:
    kind: MediaKind
    mime: str
    frames: list[Rgb]  # HxWx3 uint8 RGB, all the same size
    fps: float  # 0.0 for a still image
    width: int
    height: int
    duration_s: float  # 0.0 for a still image


# --------------------------------------------------------------------------- sniffing

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1",
                b"avif", b"avis"}
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"ID3", "an MP3 audio file"),
    (b"OggS", "an Ogg file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
)


def _describe_unknown(data: bytes) -> str:
    if not data:
        return "an empty file"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "a WAV audio file"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "an AVI video (not supported)"
    for magic, what in _OTHER_MAGIC:
        if data.startswith(magic):
            return what
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text.rstrip("\x00")[:-4]):
        return "a text file, not an image or video"
    return "unrecognised content (starts with " + head[:8].hex(" ") + ")"


def sniff(data: bytes) -> Sniffed:
    """The media type from the magic bytes; raises UnsupportedMedia for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return Sniffed("a JPEG image", "image/jpeg", "image", None)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return Sniffed("a PNG image", "image/png", "image", None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return Sniffed("a WebP image", "image/webp", "image", None)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return Sniffed("a GIF", "image/gif", "gif", "gif")
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            raise UnsupportedMedia(
                f"detected a HEIF/AVIF image (brand {brand.decode('latin-1')!r}), which is "
                f"not supported; upload {SUPPORTED}"
            )
        if brand == b"qt  ":
            return Sniffed("a QuickTime (MOV) video", "video/quicktime", "video", "mov")
        return Sniffed("an MP4 video", "video/mp4", "video", "mov")
    if data[:4] == b"\x1a\x45\xdf\xa3":
        if b"webm" in data[:64]:
            return Sniffed("a WebM video", "video/webm", "video", "matroska")
        return Sniffed("a Matroska video", "video/x-matroska", "video", "matroska")
    raise UnsupportedMedia(f"detected {_describe_unknown(data)}; upload {SUPPORTED}")


# --------------------------------------------------------------------------- stills


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, or None."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        b = data[21:25]
        return 1 + (b[0] | (b[1] & 0x3F) << 8), 1 + (b[1] >> 6 | b[2] << 2 | (b[3] & 0x0F) << 10)
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    return None


def _header_size(data: bytes, mime: str) -> tuple[int, int] | None:
    if mime == "image/png" and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if mime == "image/jpeg":
        return _jpeg_size(data)
    if mime == "image/webp":
        return _webp_size(data)
    if mime == "image/gif" and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    return None


def _too_large(label: str, width: int, height: int) -> MediaTooLarge:
    return MediaTooLarge(
        f"detected {label} of {width}x{height} px; at most "
        f"{MAX_SOURCE_PIXELS // 1_000_000} megapixels are accepted"
    )


def _even(rgb: Rgb) -> Rgb:
    h, w = rgb.shape[:2]
    return rgb[: h - h % 2, : w - w % 2]


def _shrink(img: npt.NDArray[Any], max_side: int) -> npt.NDArray[Any]:
    """``img`` (any sample type) area-averaged down to ``max_side`` on its long side."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA))


def _fit_side(rgb: Rgb, max_side: int) -> Rgb:
    return np.ascontiguousarray(_even(_shrink(rgb, max_side)), dtype=np.uint8)


# Strips of this many rows are converted at a time: float temporaries stay a few MB whatever
# the image's size.
_STRIP_ROWS = 64
# A still whose full decode (with alpha, at 16 bits where it has them) would pass this is
# decoded straight to 8-bit colour instead (any transparency is then dropped): the decode of a
# 49-megapixel 16-bit RGBA PNG alone would take 392 MB.
MAX_DECODE_BYTES = 160 * 1024 * 1024


def _to_rgb8(img: npt.NDArray[Any]) -> Rgb:
    """OpenCV's decode (BGR/BGRA/gray, 8 or 16 bit) → RGB uint8; alpha over white. Converted
    strip by strip: the only full-size allocation is the 8-bit result."""
    if img.dtype not in (np.uint8, np.uint16):
        raise UnsupportedMedia(f"unsupported sample type {img.dtype}")
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise UnsupportedMedia(f"unsupported channel count {img.shape[2]}")
    h, w = img.shape[:2]
    out = np.empty((h, w, 3), dtype=np.uint8)
    for top in range(0, h, _STRIP_ROWS):
        strip = img[top : top + _STRIP_ROWS]
        if strip.dtype == np.uint16:
            strip = (strip >> 8).astype(np.uint8)
        if strip.ndim == 2 or strip.shape[2] == 1:
            rgb = cv2.cvtColor(strip, cv2.COLOR_GRAY2RGB)
        elif strip.shape[2] == 3:
            rgb = cv2.cvtColor(strip, cv2.COLOR_BGR2RGB)
        else:
            alpha = strip[:, :, 3:4].astype(np.float32) / 255.0
            bgr = strip[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            rgb = cv2.cvtColor(np.clip(bgr + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_BGR2RGB)
        out[top : top + _STRIP_ROWS] = rgb
    return out


def _png_decode_bytes(data: bytes, width: int, height: int) -> int:
    """What OpenCV's unchanged decode of a PNG needs: samples per pixel × bytes per sample
    from the header (colour type, bit depth); 4 × 2 when the header cannot tell."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return width * height * 8
    depth, colour = data[24], data[25]
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(colour, 4)  # palette, gray+alpha -> BGRA
    return width * height * channels * (2 if depth == 16 else 1)


_JPEG_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _decode_still(data: bytes, sniffed: Sniffed, *, max_side: int) -> DecodedMedia:
    size = _header_size(data, sniffed.mime)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise UnsupportedMedia(f"detected {sniffed.label}, but its header is damaged")
    width, height = size
    flags = cv2.IMREAD_UNCHANGED  # keeps alpha and 16-bit samples for PNG/WebP
    if sniffed.mime == "image/jpeg":
        # libjpeg decodes at 1/2, 1/4, 1/8 scale directly: use the largest reduction that
        # still leaves at least max_side on the long side, or more if needed to fit.
        factor = 1
        for f in (2, 4, 8):
            if max(width, height) // f >= max_side:
                factor = f
        while factor < 8 and (width // factor) * (height // factor) > MAX_SOURCE_PIXELS:
            factor *= 2
        if (width // factor) * (height // factor) > MAX_SOURCE_PIXELS:
            raise _too_large(sniffed.label, width, height)
        flags = _JPEG_REDUCED[factor]  # IMREAD_COLOR variants also apply EXIF orientation
    elif width * height > MAX_SOURCE_PIXELS:
        raise _too_large(sniffed.label, width, height)
    else:
        full = (_png_decode_bytes(data, width, height) if sniffed.mime == "image/png"
                else width * height * 4)
        if full > MAX_DECODE_BYTES:
            flags = cv2.IMREAD_COLOR  # 8-bit BGR: 3 bytes a pixel, no 16-bit, no alpha
            if max(width, height) // 2 >= max_side:
                # halved inside OpenCV (bilinear): its full-size 8-bit buffer is then not
                # copied out whole (7000x7000: a 178 MB peak instead of 283 MB)
                flags = cv2.IMREAD_REDUCED_COLOR_2
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        raise UnsupportedMedia(
            f"detected {sniffed.label}, but it does not decode: {exc}"
        ) from exc
    if img is None or img.size == 0:
        raise UnsupportedMedia(
            f"detected {sniffed.label}, but it does not decode (truncated or damaged?)"
        )
    if img.ndim == 2 or img.shape[2] < 4:
        # no alpha: scale down first, so the colour conversion makes no full-size copy
        img = _shrink(img, max_side)
    rgb = _fit_side(_to_rgb8(img), max_side)
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise UnsupportedMedia(f"detected {sniffed.label} too small to use ({width}x{height})")
    return DecodedMedia(
        kind="image",
        mime=sniffed.mime,
        frames=[rgb],
        fps=0.0,
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        duration_s=0.0,
    )


# --------------------------------------------------------------------------- video / GIF


def _too_long(kind: MediaKind, seconds: float, max_video_s: float) -> MediaTooLong:
    what = "animation" if kind == "gif" else "video"
    return MediaTooLong(
        f"the {what} is {seconds:.1f} s long; at most {max_video_s:g} s is accepted "
        "(trim it to a short idle loop)"
    )


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return seconds
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / 1_000_000.0  # AV_TIME_BASE
    return None


def _rotate(rgb: Rgb, rotation: int) -> Rgb:
    """Apply a display-matrix rotation (degrees counter-clockwise, as PyAV reports it)."""
    k = round(rotation / 90.0) % 4
    if k == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k))


def _even_size(w: float, h: float) -> tuple[int, int]:
    return max(2, int(w) // 2 * 2), max(2, int(h) // 2 * 2)


def _decode_animated(
    data: bytes,
    sniffed: Sniffed,
    *,
    max_video_s: float,
    max_side: int,
    max_fps: float,
    max_frames_bytes: int,
) -> DecodedMedia:
    import av  # lazily: only videos and GIFs need it

    label = sniffed.label
    try:
        container = av.open(io.BytesIO(data), mode="r", format=sniffed.demuxer)
    except Exception as exc:  # any demuxer failure on untrusted bytes
        raise UnsupportedMedia(f"detected {label}, but it does not open: {exc}") from exc
    frames: list[Rgb] = []
    with container:
        if not container.streams.video:
            raise UnsupportedMedia(f"detected {label}, but it holds no video stream")
        stream = container.streams.video[0]
        src_w, src_h = int(stream.codec_context.width), int(stream.codec_context.height)
        if src_w <= 0 or src_h <= 0:
            raise UnsupportedMedia(f"detected {label}, but its frame size is unknown")
        if src_w * src_h > MAX_SOURCE_PIXELS:
            raise _too_large(label, src_w, src_h)
        declared = _declared_duration(container, stream)
        if declared is not None and declared > max_video_s + _DURATION_SLACK_S:
            raise _too_long(sniffed.kind, declared, max_video_s)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        src_fps = float(rate) if rate else 0.0
        if not (math.isfinite(src_fps) and 0 < src_fps <= 1000):
            src_fps = 0.0
        out_fps = min(src_fps, max_fps) if src_fps else max_fps
        # size every frame so that all of them together fit the budget
        expected = max(1.0, min(declared or max_video_s, max_video_s) * out_fps + 1)
        scale = min(1.0, max_side / max(src_w, src_h))
        per_frame = max_frames_bytes / expected
        scale = min(scale, math.sqrt(per_frame / (3.0 * src_w * src_h)))
        out_w, out_h = _even_size(src_w * scale, src_h * scale)
        max_frames = int(max_video_s * out_fps) + 2

        first_t: float | None = None
        next_keep = 0.0
        step = 1.0 / out_fps
        index = 0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None or not math.isfinite(t):
                    t = index / (src_fps or out_fps)
                index += 1
                if first_t is None:
                    first_t = t
                rel = t - first_t
                if rel > max_video_s + _DURATION_SLACK_S:
                    raise _too_long(sniffed.kind, rel, max_video_s)
                if src_fps > max_fps:
                    if rel + 1e-6 < next_keep:
                        continue
                    next_keep = max(next_keep + step, rel + step / 2)
                rgb = frame.reformat(
                    width=out_w, height=out_h, format="rgb24", interpolation="AREA"
                ).to_ndarray()
                rgb = _rotate(np.asarray(rgb, dtype=np.uint8), int(getattr(frame, "rotation", 0)))
                frames.append(np.ascontiguousarray(rgb, dtype=np.uint8))
                if len(frames) > max_frames:
                    raise _too_long(sniffed.kind, len(frames) / out_fps, max_video_s)
        except AvatarServerError:
            raise
        except Exception as exc:  # decoder errors on damaged data
            if not frames:
                raise UnsupportedMedia(
                    f"detected {label}, but it does not decode: {exc}"
                ) from exc
            # a damaged tail: keep what decoded
    if not frames:
        raise UnsupportedMedia(f"detected {label}, but no frame decodes")
    fps = out_fps if len(frames) > 1 else 0.0  # a one-frame GIF is a still
    h, w = frames[0].shape[:2]
    return DecodedMedia(
        kind=sniffed.kind,
        mime=sniffed.mime,
        frames=frames,
        fps=fps,
        width=int(w),
        height=int(h),
        duration_s=len(frames) / fps if fps else 0.0,
    )


# --------------------------------------------------------------------------- entry point


def sniff_and_decode(
    data: bytes,
    *,
    max_video_s: float,
    max_side: int = DEFAULT_MAX_SIDE,
    max_fps: float = DEFAULT_MAX_FPS,
    max_frames_bytes: int = DEFAULT_MAX_FRAMES_BYTES,
) -> DecodedMedia:
    """Detect the type of ``data`` from its content and decode it to RGB frames.

    Raises UnsupportedMedia (415) for an unsupported or undecodable file, MediaTooLong
    (422 ``video_too_long``) for a video/GIF longer than ``max_video_s`` and MediaTooLarge
    (422) for frames too large to decode. Blocking: call it from a worker thread."""
    if max_video_s <= 0 or max_side < 2 or max_fps <= 0:
        raise ValueError("max_video_s, max_side and max_fps must be positive")
    sniffed = sniff(data)
    if sniffed.demuxer is None:
        return _decode_still(data, sniffed, max_side=max_side)
    if sniffed.mime == "image/gif":
        size = _header_size(data, sniffed.mime)
        if size is not None and size[0] * size[1] > MAX_SOURCE_PIXELS:
            raise _too_large(sniffed.label, *size)
    return _decode_animated(
        data,
        sniffed,
        max_video_s=max_video_s,
        max_side=max_side,
        max_fps=max_fps,
        max_frames_bytes=max_frames_bytes,
    )


def describe(media: DecodedMedia) -> dict[str, object]:
    """A short summary for logs and the CLI."""
    return {
        "kind": media.kind,
        "mime": media.mime,
        "frames": len(media.frames),
        "fps": round(media.fps, 3),
        "width": media.width,
        "height": media.height,
        "duration_s": round(media.duration_s, 3),
    }
