"""avatars/media_input.py: type from the content (never the name), real decode, limits."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from avatars.media_input import (
    MAX_SOURCE_PIXELS,
    MediaTooLarge,
    MediaTooLong,
    UnsupportedMedia,
    _rotate,
    sniff,
    sniff_and_decode,
)
from tests.fakes.prepare import encode_image, encode_video, moving_frames, portrait_rgb


def decode(data: bytes, **kw):
    kw.setdefault("max_video_s", 30)
    return sniff_and_decode(data, **kw)


def refused(exc_type, data: bytes, **kw):
    with pytest.raises(exc_type) as info:
        decode(data, **kw)
    return info.value


def solid(rgb: tuple[int, int, int], w: int = 64, h: int = 48) -> np.ndarray:
    return np.tile(np.array(rgb, np.uint8), (h, w, 1))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF
    )


# --------------------------------------------------------------------------- stills


@pytest.mark.parametrize(
    ("ext", "mime"),
    [(".png", "image/png"), (".jpg", "image/jpeg"), (".webp", "image/webp")],
)
def test_still_images_decode_to_one_rgb_frame(ext, mime):
    src = portrait_rgb((200, 150))
    media = decode(encode_image(src, ext))
    assert (media.kind, media.mime) == ("image", mime)
    assert len(media.frames) == 1
    frame = media.frames[0]
    assert frame.dtype == np.uint8 and frame.shape == (150, 200, 3)
    assert (media.width, media.height, media.fps, media.duration_s) == (200, 150, 0.0, 0.0)
    # RGB, not BGR: close to the source
    assert np.abs(frame.astype(int) - src.astype(int)).mean() < 8


def test_colour_order_is_rgb():
    media = decode(encode_image(solid((220, 20, 30)), ".png"))
    assert tuple(media.frames[0][10, 10]) == (220, 20, 30)


def test_long_side_is_capped_and_sides_are_even():
    media = decode(encode_image(portrait_rgb((2001, 1001)), ".png"))
    assert max(media.width, media.height) <= 1280
    assert media.width % 2 == 0 and media.height % 2 == 0
    assert media.frames[0].shape == (media.height, media.width, 3)
    odd = decode(encode_image(portrait_rgb((101, 75)), ".png"))
    assert (odd.width, odd.height) == (100, 74)


def test_large_jpeg_decodes_reduced():
    media = decode(encode_image(portrait_rgb((4000, 3000)), ".jpg"))
    assert (media.width, media.height) == (1280, 960)


def test_alpha_is_composited_over_white_and_grey_becomes_rgb():
    import cv2

    bgra = np.zeros((20, 20, 4), np.uint8)
    bgra[:, :10] = (0, 0, 255, 255)  # opaque red (BGRA)
    ok, png = cv2.imencode(".png", bgra)  # right half fully transparent
    media = decode(png.tobytes())
    assert tuple(media.frames[0][5, 2]) == (255, 0, 0)
    assert tuple(media.frames[0][5, 15]) == (255, 255, 255)
    ok, grey16 = cv2.imencode(".png", np.full((8, 8), 40000, np.uint16))
    media = decode(grey16.tobytes())
    assert media.frames[0].shape == (8, 8, 3) and media.frames[0].dtype == np.uint8
    assert tuple(media.frames[0][0, 0]) == (156, 156, 156)


def test_huge_dimensions_are_refused_before_decoding():
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    err = refused(MediaTooLarge, data)
    assert err.status == 422 and err.code == "resolution_too_high"
    assert "20000x20000" in err.detail
    assert 20000 * 20000 > MAX_SOURCE_PIXELS
    gif = b"GIF89a" + struct.pack("<HH", 30000, 30000) + bytes(20)
    assert "30000x30000" in refused(MediaTooLarge, gif).detail


# --------------------------------------------------------------------------- videos


@pytest.mark.parametrize(
    ("container", "codec", "mime"),
    [
        ("mp4", "libx264", "video/mp4"),
        ("mov", "libx264", "video/quicktime"),
        ("webm", "libvpx", "video/webm"),
        ("matroska", "mpeg4", "video/x-matroska"),
    ],
)
def test_videos_decode_every_frame(container, codec, mime):
    frames = moving_frames(20, (128, 96))
    media = decode(encode_video(frames, 25, container=container, codec=codec))
    assert (media.kind, media.mime) == ("video", mime)
    assert len(media.frames) == 20
    assert media.fps == pytest.approx(25)
    assert media.duration_s == pytest.approx(0.8)
    assert (media.width, media.height) == (128, 96)
    assert all(f.shape == (96, 128, 3) and f.dtype == np.uint8 for f in media.frames)
    assert np.abs(media.frames[7].astype(int) - frames[7].astype(int)).mean() < 12


def test_animated_gif_decodes_as_gif():
    frames = moving_frames(6, (64, 64))
    media = decode(encode_video(frames, 10, container="gif", codec="gif", pix_fmt="rgb8"))
    assert (media.kind, media.mime) == ("gif", "image/gif")
    assert len(media.frames) == 6
    assert media.fps == pytest.approx(10)


def test_high_frame_rates_are_reduced():
    media = decode(encode_video(moving_frames(120, (64, 48)), 60))
    assert media.fps == pytest.approx(30)
    assert 59 <= len(media.frames) <= 61


def test_video_frames_fit_the_memory_budget():
    budget = 2_000_000
    media = decode(encode_video(moving_frames(50, (320, 240)), 25), max_frames_bytes=budget)
    assert len(media.frames) == 50
    assert sum(f.nbytes for f in media.frames) <= budget
    assert media.width % 2 == 0 and media.height % 2 == 0
    assert media.width / media.height == pytest.approx(320 / 240, rel=0.05)


def test_video_longer_than_the_limit_is_422():
    data = encode_video(moving_frames(100, (64, 48)), 25)  # 4 s
    err = refused(MediaTooLong, data, max_video_s=3)
    assert err.status == 422 and err.code == "video_too_long"
    assert "4.0 s" in err.detail and "3 s" in err.detail
    assert len(decode(data, max_video_s=4).frames) == 100
    gif = encode_video(moving_frames(30, (32, 32)), 10, container="gif", codec="gif",
                       pix_fmt="rgb8")
    assert "animation" in refused(MediaTooLong, gif, max_video_s=2).detail


def test_rotation_follows_the_display_matrix():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert _rotate(img, 0) is img
    assert _rotate(img, -90).shape == (3, 2, 3)  # a phone portrait video: shown upright
    assert np.array_equal(_rotate(img, -90), np.rot90(img, 3))
    assert np.array_equal(_rotate(img, 180), img[::-1, ::-1])


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"hello, I am a text file renamed to portrait.jpg\n", "text"),
        (b"%PDF-1.7\n...", "PDF"),
        (b"BM" + bytes(60), "BMP"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(40), "HEIF"),
        (bytes(range(256)) * 4, "unrecognised"),
    ],
)
def test_unsupported_content_is_415_saying_what_was_detected(data, needle):
    err = refused(UnsupportedMedia, data)
    assert err.status == 415 and err.code == "unsupported_media"
    assert needle in err.detail
    assert "JPEG, PNG" in err.detail  # says what would be accepted


def test_truncated_png_is_415():
    png = encode_image(portrait_rgb((200, 200)), ".png")
    err = refused(UnsupportedMedia, png[: len(png) // 2])
    assert "PNG" in err.detail and "decode" in err.detail


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xff\xd8\xff\xe0" + b"garbage" * 20, "JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "PNG"),
        (b"RIFF\x00\x01\x00\x00WEBPVP8 " + b"garbage" * 20, "WebP"),
        (b"GIF89a\x10\x00\x10\x00" + b"garbage" * 20, "GIF"),
        (b"\x00\x00\x00\x20ftypisom" + b"garbage" * 20, "MP4"),
        (b"\x00\x00\x00\x14ftypqt  " + b"garbage" * 20, "MOV"),
        (b"\x1a\x45\xdf\xa3" + b"garbage webm" * 20, "WebM"),
    ],
)
def test_right_magic_but_undecodable_is_415(data, needle):
    err = refused(UnsupportedMedia, data)
    assert needle in err.detail


def test_truncated_video_is_415():
    data = encode_video(moving_frames(10, (64, 48)), 25)
    err = refused(UnsupportedMedia, data[: len(data) // 3])
    assert "MP4" in err.detail


def test_audio_only_container_is_415():
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    err = refused(UnsupportedMedia, buf.getvalue())
    assert "no video" in err.detail


def test_sniff_ignores_everything_but_the_bytes():
    png = encode_image(solid((1, 2, 3)), ".png")
    assert sniff(png).mime == "image/png"
    assert sniff(encode_image(solid((1, 2, 3)), ".jpg")).mime == "image/jpeg"
    assert sniff(encode_video(moving_frames(2, (32, 32)), container="mov")).mime == (
        "video/quicktime"
    )
