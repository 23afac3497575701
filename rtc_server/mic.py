"""The microphone side of a call: its level, how soon aiortc hands its frames on, and where
they are decoded.

aiortc decodes a call's incoming audio on a thread of its own and hands every 20 ms frame back
to the event loop (a task and a self-pipe wake-up a frame), where the session would only pass
it on to its mic thread (resampling, VAD). :func:`tap_microphone` skips both trips: the
encoded frames go from aiortc's jitter buffer, on the loop, straight to the mic thread, which
decodes them and measures the level there. Opus is decoded by libopus itself at 16 kHz mono,
the rate the VAD and Whisper take (FFmpeg's Opus decoders only give 48 kHz, which then had
to be resampled: about as much CPU as the VAD on a 20 ms frame).

The server asks a browser for Opus DTX (``webrtc.opus_dtx``): while the person is silent it
sends ~2 packets in 400 ms instead of 20, and nothing arrives for the time between. The VAD
still has to hear that silence, or the end of a turn would wait for the next packet:
:class:`GapFill` gives it silence for the time the stream left out, at wall-clock pace while
the sender is in DTX, and from the RTP timestamps where a packet shows a gap."""

from __future__ import annotations

import asyncio
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

from media_tracks.aiortc_compat import (
    receiver_jitter_buffer,
    set_receiver_prefetch,
    tap_encoded_frames,
)
from media_tracks.jitter import DTX_MAX_BYTES

logger = logging.getLogger(__name__)

Frames = list[av.AudioFrame]


@dataclass(slots=True)
class MicStats:
    """The microphone level: mean power over roughly the last second, in dBFS."""

    frames_received: int = 0  # packets decoded and silence given for left-out time
    mean_power: float = 0.0
    tapped: bool = False  # decoded on the mic thread (tap_microphone), not by aiortc
    silence_ms: int = 0  # of frames_received: time the sender left out (DTX), as silence

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
        self.rate = Opus16k.RATE  # of the frames it gives (the last one decoded)

    def decode(self, codec: Any, encoded_frame: Any) -> Frames:
        name = str(codec.name).lower()
        if name != self._name or self._decode is None:
            self._name = name
            self._decode = _decoder_for(codec)
        try:
            frames = self._decode(encoded_frame)
            if frames:
                self.rate = frames[-1].sample_rate
            return frames
        except (av.FFmpegError, OpusError) as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                logger.warning("a microphone frame did not decode (%s; %d so far)", exc,
                               self.errors)
            return []

    def silence(self, ticks: int, clock_rate: int) -> Frames:
        """``ticks`` of the RTP clock ``clock_rate`` of silence, a frame at the decoded rate."""
        n = ticks * self.rate // clock_rate
        if n <= 0:
            return []
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = self.rate
        return [frame]


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


def load_libopus() -> Any:
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
        lib = load_libopus()
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


def _signed32(d: int) -> int:
    return (d + (1 << 31)) % (1 << 32) - (1 << 31)


class GapFill:
    """The silence to give the VAD where a call's microphone stream leaves time out, in ticks
    of the stream's RTP clock ``clock_rate``.

    ``frame(ts, size, now_ns)``, for each frame the jitter buffer hands on (in order): the
    silence due before it, the gap between its timestamp and the end of what was given so
    far (none past ``MAX_GAP_S``: a stream that restarted). A frame of at most
    ``DTX_MAX_BYTES`` says that the sender went quiet (DTX); from then on, until the next
    frame, ``due(now_ns)`` gives the whole frames of silence that wall-clock time has brought
    since, ``LAG_NS`` behind it (a packet a little late is then not overtaken). Where the
    silence given ran ahead of the next frame's timestamp, that frame follows it: the
    stream's time stays that much ahead (no more than a packet's lateness)."""

    LAG_NS = 20_000_000
    MAX_GAP_S = 10.0

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self._last_ts: int | None = None  # the last frame's RTP timestamp (32-bit)
        self._last = 0  # ... unwrapped
        self._end = 0  # unwrapped RTP time up to which the stream has been given
        self._step = clock_rate // 50  # a frame's duration: the smallest step seen (20 ms)
        self._quiet: tuple[int, int] | None = None  # (wall ns, _end) as the sender went quiet
        # since when the sender has been quiet, its comfort-noise updates (each followed by a
        # DTX packet) included; two frames with sound in a row end it
        self._quiet_since: int | None = None
        self._sound_run = 0

    @property
    def in_dtx(self) -> bool:
        return self._quiet is not None

    def quiet_for_ns(self, now_ns: int) -> int:
        return 0 if self._quiet_since is None else now_ns - self._quiet_since

    def frame(self, ts: int, size: int, now_ns: int) -> int:
        gap = 0
        if self._last_ts is None:
            t = self._end = ts
        else:
            d = _signed32(ts - self._last_ts)
            t = self._last + d
            if 0 < d < self._step:
                self._step = d
            ahead = t - self._end
            if 0 < ahead <= self.MAX_GAP_S * self.clock_rate:
                gap = ahead
        self._last_ts, self._last = ts, t
        self._end = max(self._end, t) + self._step
        if size <= DTX_MAX_BYTES:
            self._quiet = (now_ns, self._end)
            self._sound_run = 0
            if self._quiet_since is None:
                self._quiet_since = now_ns
        else:
            self._quiet = None
            self._sound_run += 1
            if self._sound_run >= 2:
                self._quiet_since = None
        return gap

    def due(self, now_ns: int) -> int:
        if self._quiet is None:
            return 0
        wall0, end0 = self._quiet
        target = end0 + (now_ns - wall0 - self.LAG_NS) * self.clock_rate // 1_000_000_000
        n = (target - self._end) // self._step * self._step
        if n <= 0:
            return 0
        self._end += n
        return n


FILL_TICK_S = 0.02  # while the sender is quiet: silence every 20 ms at first ...
FILL_SLOW_TICK_S = 0.1  # ... then every 100 ms, once it has been quiet for FILL_SLOW_AFTER_NS
FILL_SLOW_AFTER_NS = 1_000_000_000


def tap_microphone(
    pc: RTCPeerConnection, track: MediaStreamTrack, *,
    feed: Callable[[Callable[[], Frames]], None], stats: MicStats, heard: Callable[[], None],
    now_ns: Callable[[], int],
    call_later: Callable[[float, Callable[[], None]], Any] | None = None,
) -> bool:
    """Take the remote audio ``track``'s encoded frames from its receiver (at the track
    event, before the receiver starts): for each, ``heard()`` runs on the loop, and ``feed``
    is given the work that decodes it and observes its level in ``stats``, to run on the mic
    thread in order (``Conversation.feed_later``). Time the stream leaves out (Opus DTX) is
    fed as silence (:class:`GapFill`): while the sender is quiet, every ``FILL_TICK_S``
    (``FILL_SLOW_TICK_S`` after the first second). False, changing nothing, where aiortc's
    receiver cannot be tapped: its track then delivers decoded frames as usual. ``now_ns``:
    the session's clock (``MediaClock.now_ns``), which paces the fill; ``call_later``: its
    timers (the loop's by default)."""
    receiver = next((r for r in pc.getReceivers() if r.track is track), None)
    if receiver is None:
        return False
    decoder = MicDecoder()
    fill: GapFill | None = None
    timer: Any = None

    def later(delay_s: float, callback: Callable[[], None]) -> Any:
        if call_later is not None:
            return call_later(delay_s, callback)
        return asyncio.get_running_loop().call_later(delay_s, callback)

    def decode(codec: Any, encoded_frame: Any, gap: int) -> Frames:  # on the mic thread
        frames = silence(gap, codec.clockRate) if gap else []
        decoded = decoder.decode(codec, encoded_frame)
        for frame in decoded:
            stats.observe(frame_power(frame))
        return frames + decoded

    def silence(ticks: int, clock_rate: int) -> Frames:  # on the mic thread
        frames = decoder.silence(ticks, clock_rate)
        for _ in frames:
            stats.observe(0.0)
        stats.silence_ms += ticks * 1000 // clock_rate
        return frames

    def tick() -> None:  # on the loop, while the sender is quiet
        nonlocal timer
        timer = None
        if fill is None or not fill.in_dtx or track.readyState != "live":
            return
        now = now_ns()
        # a packet held by the jitter buffer (a comfort-noise update waiting for the next
        # one) is newer sound: its gap is filled from its timestamp once it goes on
        held = getattr(receiver_jitter_buffer(receiver), "held", 0)
        ticks = 0 if held else fill.due(now)
        if ticks:
            feed(functools.partial(silence, ticks, fill.clock_rate))
        slow = fill.quiet_for_ns(now) >= FILL_SLOW_AFTER_NS
        timer = later(FILL_SLOW_TICK_S if slow else FILL_TICK_S, tick)

    def sink(codec: Any, encoded_frame: Any) -> None:  # on the loop
        nonlocal fill, timer
        heard()
        if fill is None or fill.clock_rate != codec.clockRate:
            fill = GapFill(codec.clockRate)
        gap = fill.frame(encoded_frame.timestamp, len(encoded_frame.data), now_ns())
        feed(functools.partial(decode, codec, encoded_frame, gap))
        if fill.in_dtx and timer is None:
            timer = later(FILL_TICK_S, tick)

    stats.tapped = tap_encoded_frames(receiver, sink)
    return stats.tapped
