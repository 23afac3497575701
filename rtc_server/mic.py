"""The microphone side of a call: its level, and how soon aiortc hands its frames on."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiortc import MediaStreamTrack, RTCPeerConnection

from media_tracks.aiortc_compat import set_receiver_prefetch


@dataclass(slots=True)
class MicStats:
    """The microphone level: mean power over roughly the last second, in dBFS."""

    frames_received: int = 0
    mean_power: float = 0.0

    def observe(self, power: float) -> None:
        alpha = 1.0 if self.frames_received == 0 else 0.05
        self.mean_power += (power - self.mean_power) * alpha
        self.frames_received += 1

    @property
    def rms_dbfs(self) -> float:
        return 10 * math.log10(max(self.mean_power, 1e-12))


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
