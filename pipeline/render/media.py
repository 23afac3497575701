"""Audio in and clips out, with PyAV: decoding uploads, changing tempo, WAV and OGG Opus files,
and the clip encoder (H.264 + AAC in MP4, VP9 + Opus in WebM).

PCM is int16 mono everywhere; positions are sample counts at the clip's sample rate."""

from __future__ import annotations

import threading
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from common.errors import BadRequest, PipelineError
from face.yuv import Yuv

Pcm = npt.NDArray[np.int16]

_CHUNK = 4096  # samples per frame handed to filters and encoders
_BT601 = 6  # AVCOL_SPC/PRI/TRC_SMPTE170M: what rgb_to_i420 produces
_LIMITED = 1  # AVCOL_RANGE_MPEG


class DecodeCancelled(Exception):
    """``decode_audio`` saw its cancel event set."""


def decode_audio(
    path: Path,
    *,
    sample_rate: int,
    max_seconds: float,
    cancel: threading.Event | None = None,
) -> Pcm:
    """The first audio stream of the file at ``path`` as int16 mono at ``sample_rate``.

    Any container and codec FFmpeg reads (WAV, MP3, OGG, M4A, WebM, a video's sound...).
    Raises ``BadRequest`` when the file is not media, has no audio stream, cannot be decoded,
    holds no samples, or is longer than ``max_seconds`` (found while decoding: a long file
    is not decoded to its end)."""
    limit = int(max_seconds * sample_rate)
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except FileNotFoundError:
        raise BadRequest("the audio file is gone (was it removed?)") from None
    except (av.FFmpegError, UnicodeDecodeError, ValueError):
        raise BadRequest("the file given as audio is not audio: FFmpeg cannot read it") from None
    chunks: list[Pcm] = []
    total = 0
    try:
        if not container.streams.audio:
            raise BadRequest("the file given as audio has no audio stream (is it audio?)")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                if cancel is not None and cancel.is_set():
                    raise DecodeCancelled
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))
                    total += out.samples
                if total > limit:
                    raise BadRequest(
                        f"the audio is longer than the {max_seconds:g} s a render accepts"
                    )
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))
                total += out.samples
        except (av.FFmpegError, ValueError) as exc:
            raise BadRequest(f"the audio cannot be decoded ({_short(exc)})") from None
    finally:
        container.close()
    if total > limit:
        raise BadRequest(f"the audio is longer than the {max_seconds:g} s a render accepts")
    if total == 0:
        raise BadRequest("the audio holds no samples")
    return np.concatenate(chunks).astype(np.int16, copy=False)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "strerror", None) or exc or type(exc).__name__)
    return text.splitlines()[0][:120] if text else type(exc).__name__


def change_tempo(pcm: Pcm, sample_rate: int, speed: float) -> Pcm:
    """``pcm`` played ``speed`` times faster at the same pitch (FFmpeg's ``atempo``, 0.5..2):
    ``round(len(pcm) / speed)`` samples."""
    if speed == 1.0 or pcm.size == 0:
        return pcm
    if not 0.5 <= speed <= 2.0:
        raise BadRequest(f"speed must be in 0.5..2.0, got {speed:g}")
    graph = av.filter.Graph()
    src = graph.add_abuffer(
        format="s16", sample_rate=sample_rate, layout="mono", time_base=Fraction(1, sample_rate)
    )
    tempo = graph.add("atempo", f"{speed:.6f}")
    fmt = graph.add("aformat", f"sample_fmts=s16:channel_layouts=mono:sample_rates={sample_rate}")
    sink = graph.add("abuffersink")
    src.link_to(tempo)
    tempo.link_to(fmt)
    fmt.link_to(sink)
    graph.configure()
    out: list[Pcm] = []

    def drain() -> None:
        while True:
            try:
                frame = sink.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            assert isinstance(frame, av.AudioFrame)
            out.append(frame.to_ndarray().reshape(-1).astype(np.int16, copy=False))

    # atempo keeps back the end of its last window: feed some silence after the sound and
    # cut the result to the exact length
    want = int(round(pcm.size / speed))
    padded = np.concatenate([pcm, np.zeros(sample_rate // 5, np.int16)])
    for pos in range(0, padded.size, _CHUNK):
        src.push(_audio_frame(padded[pos : pos + _CHUNK], sample_rate, pos))
        drain()
    src.push(None)
    drain()
    result = np.concatenate(out) if out else np.zeros(0, np.int16)
    if result.size < want:
        result = np.concatenate([result, np.zeros(want - result.size, np.int16)])
    return result[:want]


def _audio_frame(pcm: Pcm, sample_rate: int, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    return frame


def write_wav(path: Path, pcm: Pcm, sample_rate: int) -> None:
    """16-bit PCM (s16le) mono WAV."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def write_ogg_opus(path: Path, pcm: Pcm, sample_rate: int, *, bitrate: int = 64_000) -> None:
    """Opus in an OGG file (libopus; ``sample_rate`` one of 8/12/16/24/48 kHz)."""
    with av.open(str(path), mode="w", format="ogg") as container:
        stream: Any = container.add_stream("libopus", rate=sample_rate, layout="mono")
        stream.bit_rate = bitrate
        for pos in range(0, pcm.size, _CHUNK):
            for packet in stream.encode(_audio_frame(pcm[pos : pos + _CHUNK], sample_rate, pos)):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def video_options(fmt: str, *, h264_preset: str, h264_crf: int, vp9_crf: int) -> dict[str, str]:
    """Encoder options: libx264 at ``h264_preset``/``h264_crf``; libvpx-vp9 in constant
    quality (``vp9_crf``, no bitrate cap) with the realtime deadline, cpu-used 6 and row
    multithreading: on 2 cores about 300 frames/s at 512x512, where the "good" deadline
    manages 40-60 (bench/render.py compares them)."""
    if fmt == "mp4":
        return {"preset": h264_preset, "crf": str(h264_crf)}
    if fmt == "webm":
        return {
            "crf": str(vp9_crf),
            "b": "0",
            "deadline": "realtime",
            "cpu-used": "6",
            "row-mt": "1",
            "tile-columns": "1",
        }
    raise BadRequest(f"format must be one of mp4, webm; got {fmt!r}")


_CODECS = {"mp4": ("libx264", "aac"), "webm": ("libvpx-vp9", "libopus")}


class ClipEncoder:
    """Writes one clip: video frames in order, the audio interleaved with them.

    ``add_frame`` encodes video frame ``k`` (I420) and the audio it covers (samples up to
    ``(k + 1) * sample_rate // fps``); ``close`` writes what remains and finishes the file
    (MP4: moov atom first, for streaming). Not thread-safe: one thread drives it."""

    def __init__(
        self,
        path: Path,
        *,
        fmt: str,
        width: int,
        height: int,
        fps: int,
        pcm: Pcm,
        sample_rate: int,
        options: dict[str, str],
        threads: int = 0,
        audio_bitrate: int = 96_000,
    ) -> None:
        if fmt not in _CODECS:
            raise BadRequest(f"format must be one of mp4, webm; got {fmt!r}")
        vcodec, acodec = _CODECS[fmt]
        self.fps = fps
        self.sample_rate = sample_rate
        self.frames = 0
        self._pcm = pcm
        self._audio_pos = 0
        opts = {"movflags": "+faststart"} if fmt == "mp4" else {}
        try:
            self._container: Any = av.open(str(path), mode="w", format=fmt, options=opts)
            video: Any = self._container.add_stream(vcodec, rate=fps, options=dict(options))
            video.width = width
            video.height = height
            video.pix_fmt = "yuv420p"
            ctx = video.codec_context
            ctx.time_base = Fraction(1, fps)
            if threads:
                ctx.thread_count = threads
            ctx.color_range = _LIMITED
            ctx.colorspace = _BT601
            ctx.color_primaries = _BT601
            ctx.color_trc = _BT601
            audio: Any = self._container.add_stream(acodec, rate=sample_rate, layout="mono")
            audio.bit_rate = audio_bitrate
        except av.FFmpegError as exc:
            raise PipelineError(f"cannot start the {fmt} encoder: {_short(exc)}") from exc
        self._video = video
        self._audio = audio
        self._time_base = Fraction(1, fps)
        self._closed = False

    def add_frame(self, yuv: Yuv) -> None:
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self.frames
        frame.time_base = self._time_base
        frame.color_range = _LIMITED
        frame.colorspace = _BT601
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        self.frames += 1
        self._audio_until(self.frames * self.sample_rate // self.fps)

    def _audio_until(self, end: int) -> None:
        end = min(end, self._pcm.size)
        while self._audio_pos < end:
            n = min(_CHUNK, end - self._audio_pos)
            frame = _audio_frame(
                self._pcm[self._audio_pos : self._audio_pos + n], self.sample_rate, self._audio_pos
            )
            for packet in self._audio.encode(frame):
                self._container.mux(packet)
            self._audio_pos += n

    def close(self) -> None:
        """Encode the remaining audio, flush both encoders and finish the file."""
        if self._closed:
            return
        self._audio_until(self._pcm.size)
        for packet in self._video.encode(None):
            self._container.mux(packet)
        for packet in self._audio.encode(None):
            self._container.mux(packet)
        self._closed = True
        self._container.close()

    def abort(self) -> None:
        """Close the file without flushing (the caller removes it)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except (av.FFmpegError, OSError):
            pass
