"""The microphone side of a call: its level, how soon aiortc hands its frames on, and where
they are decoded.

aiortc decodes a call's incoming audio on a thread of its own and hands every 20 ms frame back
to the event loop (a task and a self-pipe wake-up a frame), where the session would only pass
it on to its mic thread (resampling, VAD). :func:`tap_microphone` skips both trips: the
encoded frames go from aiortc's jitter buffer, on the loop, straight to the mic thread, which
decodes them and measures the level there. Opus is decoded by libopus itself at 16 kHz mono,
the rate the VAD and Whisper take (FFmpeg's Opus decoders only give 48 kHz, which then had
to be resampled: about as much CPU as the VAD on a 20 ms frame)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.codecs import get_decoder

from media_tracks.aiortc_compat import set_receiver_prefetch, tap_encoded_frames

logger = logging.getLogger(__name__)

Frames = list[av.AudioFrame]


@dataclass(slots=True)
class MicStats:
    """The microphone level: mean power over roughly the last second, in dBFS."""

    frames_received: int = 0
    mean_power: float = 0.0
    tapped: bool = False  # decoded on the mic thread (tap_microphone), not by aiortc

    def observe(self, power: float) -> None:
        alpha = 1.0 if self.frames_received == 0 else 0.05
        self.mean_power += (power - self.mean_power) * alpha
        self.frames_received += 1

    @property
    def rms_dbfs(self) -> float:
        return 10 * math.log10(max(self.mean_power, 1e-12))


def frame_power(frame: av.AudioFrame) -> float:
    """Mean power of an s16 frame's samples, relative to full scale (1.0: 0 dBFS)."""
    pcm = frame.to_ndarray().reshape(-1).astype(np.float32)
    return float(np.dot(pcm, pcm)) / (pcm.size * 32768.0**2) if pcm.size else 0.0


def set_audio_prefetch(pc: RTCPeerConnection, track: MediaStreamTrack, frames: int) -> bool:
    """Make the receiver of the remote audio ``track`` hand a frame on once ``frames`` more
    have arrived behind it (aiortc always waits for 4: 80 ms the VAD would lose before it
    hears speech). The server only analyses the microphone, never plays it, so it needs the
    packets in order, not smoothed. False where aiortc's receiver does not have the buffer
    this replaces (then nothing changes)."""
    for receiver in pc.getReceivers():
        if receiver.track is track:
            return set_receiver_prefetch(receiver, frames)
    return False


class MicDecoder:
    """One call's microphone frames decoded: Opus at 16 kHz mono (:class:`Opus16k`; FFmpeg's
    decoder at 48 kHz where libopus cannot be loaded), or another codec with aiortc's
    decoder for it (PCMU, PCMA). A frame that does not decode is logged and
    skipped; the decoder keeps its state, as aiortc's receiver does."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._decode: Callable[[Any], Frames] | None = None
        self.errors = 0

    def decode(self, codec: Any, encoded_frame: Any) -> Frames:
        name = str(codec.name).lower()
        if name != self._name or self._decode is None:
            self._name = name
            self._decode = _decoder_for(codec)
        try:
            return self._decode(encoded_frame)
        except (av.FFmpegError, OpusError) as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                logger.warning("a microphone frame did not decode (%s; %d so far)", exc,
                               self.errors)
            return []


def _decoder_for(codec: Any) -> Callable[[Any], Frames]:
    """``encoded_frame -> frames`` for ``codec``: libopus at 16 kHz, else FFmpeg's Opus
    decoder at 48 kHz, for Opus; aiortc's decoder for the others."""
    if str(codec.name).lower() != "opus":
        decoder = get_decoder(codec)
        return lambda encoded_frame: [f for f in decoder.decode(encoded_frame)
                                      if isinstance(f, av.AudioFrame)]
    opus16k = Opus16k.create()
    if opus16k is not None:
        return lambda encoded_frame: opus16k.decode(encoded_frame.data)
    context = _mono_opus()
    return lambda encoded_frame: list(context.decode(av.Packet(encoded_frame.data)))


class OpusError(Exception):
    """libopus could not decode a packet."""


_libopus: Any = None  # ctypes handle; False: none found


def _load_libopus() -> Any:
    """libopus, as PyAV's wheel ships it (FFmpeg already has it in the process), else the
    system's; None where neither is found."""
    global _libopus
    if _libopus is None:
        _libopus = False
        here = Path(av.__file__).resolve().parent.parent / "av.libs"
        candidates = [str(p) for p in sorted(here.glob("libopus*.so*"))]
        system = ctypes.util.find_library("opus")
        candidates += [system] if system else []
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)
                lib.opus_decoder_create.restype = ctypes.c_void_p
                lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int,
                                                    ctypes.POINTER(ctypes.c_int)]
                lib.opus_decode.restype = ctypes.c_int
                lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                            ctypes.POINTER(ctypes.c_int16), ctypes.c_int,
                                            ctypes.c_int]
                lib.opus_decoder_destroy.restype = None
                lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
            except (OSError, AttributeError) as exc:
                logger.debug("libopus at %s not usable: %s", path, exc)
                continue
            _libopus = lib
            break
    return _libopus or None


class Opus16k:
    """libopus's decoder at ``RATE`` Hz, mono: one s16 frame per packet."""

    RATE = 16_000
    MAX_SAMPLES = RATE * 120 // 1000  # the longest Opus packet: 120 ms

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        error = ctypes.c_int(0)
        self._state = lib.opus_decoder_create(self.RATE, 1, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise OpusError(f"opus_decoder_create failed ({error.value})")
        self._pcm = (ctypes.c_int16 * self.MAX_SAMPLES)()

    @classmethod
    def create(cls) -> Opus16k | None:
        lib = _load_libopus()
        if lib is None:
            return None
        try:
            return cls(lib)
        except OpusError as exc:
            logger.warning("%s: the microphone is decoded at 48 kHz and resampled", exc)
            return None

    def decode(self, data: bytes) -> Frames:
        n = self._lib.opus_decode(self._state, data, len(data), self._pcm, self.MAX_SAMPLES, 0)
        if n < 0:
            raise OpusError(f"opus_decode failed ({n})")
        pcm = np.ctypeslib.as_array(self._pcm)[:n].copy()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.RATE
        return [frame]

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_decoder_destroy(state)


def _mono_opus() -> av.AudioCodecContext:
    codec = av.CodecContext.create("libopus", "r")
    assert isinstance(codec, av.AudioCodecContext)
    codec.layout = "mono"
    codec.format = "s16"
    return codec


def tap_microphone(
    pc: RTCPeerConnection, track: MediaStreamTrack, *,
    feed: Callable[[Callable[[], Frames]], None], stats: MicStats, heard: Callable[[], None],
) -> bool:
    """Take the remote audio ``track``'s encoded frames from its receiver (at the track
    event, before the receiver starts): for each, ``heard()`` runs on the loop, and ``feed``
    is given the work that decodes it and observes its level in ``stats``, to run on the mic
    thread in order (``Conversation.feed_later``). False, changing nothing, where aiortc's
    receiver cannot be tapped: its track then delivers decoded frames as usual."""
    receiver = next((r for r in pc.getReceivers() if r.track is track), None)
    if receiver is None:
        return False
    decoder = MicDecoder()

    def decode(codec: Any, encoded_frame: Any) -> Frames:  # on the mic thread
        frames = decoder.decode(codec, encoded_frame)
        for frame in frames:
            stats.observe(frame_power(frame))
        return frames

    def sink(codec: Any, encoded_frame: Any) -> None:  # on the loop
        heard()
        feed(functools.partial(decode, codec, encoded_frame))

    stats.tapped = tap_encoded_frames(receiver, sink)
    return stats.tapped
