"""The microphone side of a call: its level, how soon aiortc hands its frames on, and where
they are decoded.

aiortc decodes a call's incoming audio on a thread of its own and hands every 20 ms frame back
to the event loop (a task and a self-pipe wake-up a frame), where the session would only pass
it on to its mic thread (resampling, VAD). :func:`tap_microphone` skips both trips: the
encoded frames go from aiortc's jitter buffer, on the loop, straight to the mic thread, which
decodes them (Opus to mono: the server only listens) and measures the level there."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
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
    """One call's microphone frames decoded: Opus (48 kHz, mono), or another codec with
    aiortc's decoder for it (PCMU, PCMA). A frame that does not decode is logged and
    skipped; the decoder keeps its state, as aiortc's receiver does."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._decoder: Any = None
        self.errors = 0

    def decode(self, codec: Any, encoded_frame: Any) -> Frames:
        name = str(codec.name).lower()
        if name != self._name:
            self._name = name
            self._decoder = _mono_opus() if name == "opus" else get_decoder(codec)
        try:
            if name == "opus":
                return list(self._decoder.decode(av.Packet(encoded_frame.data)))
            return list(self._decoder.decode(encoded_frame))
        except av.FFmpegError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 100 == 0:
                logger.warning("a microphone frame did not decode (%s; %d so far)", exc,
                               self.errors)
            return []


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
