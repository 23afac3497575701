"""The recording analysis used by the browser test, checked on synthetic webm files whose
A/V offset is known."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from face.yuv import FLASH_LUMA
from media_tracks.clapper import clapper_pcm, flash_frames
from tests.browser import analyze_clapper_recording

FPS = 25
RATE = 48000


def synthetic_webm(
    *, offset_ms: int, audio_start_ms: int = 0, count: int = 5, size: int = 64
) -> bytes:
    """A vp8+opus webm of a clapper segment: flashes on the clapper frames, beeps
    ``offset_ms`` later (> 0: audio late); the audio track starts ``audio_start_ms`` after
    the video track (as when a recorder's first audio packet comes late)."""
    pcm = clapper_pcm(count=count, fps=FPS, sample_rate=RATE)
    shift = offset_ms * RATE // 1000
    pcm = np.concatenate([np.zeros(shift, np.int16), pcm]) if shift >= 0 else pcm[-shift:]
    pcm = pcm[audio_start_ms * RATE // 1000 :]
    flashes = set(flash_frames(count, FPS))
    n_frames = max(flashes) + FPS

    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        vs = c.add_stream("libvpx", rate=FPS)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.bit_rate = 1_000_000
        aus = c.add_stream("libopus", rate=RATE)
        aus.layout = "mono"

        rng = np.random.default_rng(1)
        for k in range(n_frames):
            if k in flashes:
                y = np.full((size, size), FLASH_LUMA, np.uint8)
            else:
                y = rng.integers(30, 110, (size, size), dtype=np.uint8)
            yuv = np.concatenate([y, np.full((size // 2, size), 128, np.uint8)])
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = k
            frame.time_base = Fraction(1, FPS)
            c.mux(vs.encode(frame))
        c.mux(vs.encode())

        step = 960
        start = audio_start_ms * RATE // 1000
        for i in range(0, len(pcm) - step + 1, step):
            chunk = av.AudioFrame.from_ndarray(pcm[None, i : i + step], format="s16", layout="mono")
            chunk.sample_rate = RATE
            chunk.pts = start + i
            chunk.time_base = Fraction(1, RATE)
            c.mux(aus.encode(chunk))
        c.mux(aus.encode())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("offset_ms", "audio_start_ms"), [(0, 0), (25, 0), (-30, 0), (15, 180), (-60, 120)]
)
def test_recovers_known_offset(offset_ms: int, audio_start_ms: int) -> None:
    result = analyze_clapper_recording(
        synthetic_webm(offset_ms=offset_ms, audio_start_ms=audio_start_ms)
    )
    assert result.flashes_ms == pytest.approx([400 + 1000 * i for i in range(5)], abs=1)
    assert len(result.offsets_ms) == 5
    assert result.offsets_ms == pytest.approx([offset_ms] * 5, abs=3)
    assert result.frame_size == (64, 64)


def test_no_flashes_no_offsets() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as c:
        vs = c.add_stream("libvpx", rate=FPS)
        vs.width = vs.height = 32
        vs.pix_fmt = "yuv420p"
        for k in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 32), 60, np.uint8), format="yuv420p")
            frame.pts = k
            c.mux(vs.encode(frame))
        c.mux(vs.encode())
    result = analyze_clapper_recording(buf.getvalue())
    assert result.flashes_ms == [] and result.beeps_ms == [] and result.offsets_ms == []
    assert result.video_frames == 10
