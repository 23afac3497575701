"""The outgoing voice's encoder: mono Opus, one packet per audio frame of the session.

aiortc's own ``OpusEncoder`` upmixes every frame to stereo through a resampler that cuts it
into 20 ms pieces, and encodes at 96 kbit/s. A frame longer than 20 ms then becomes several
packets that aiortc's sender sends with one RTP timestamp, so the session could only send
20 ms frames: 50 packets a second, each a trip through the track, the executor, the encoder,
RTP, SRTP and the socket on the event loop. Here:

* the track's mono samples go to libopus as they are (mono Opus is valid in an
  ``opus/48000/2`` stream: every packet says whether it is mono; 8, 12, 16, 24 and 48 kHz
  are native Opus input rates);
* one packet per frame of ``media.audio_frame_ms`` (libopus ``frame_duration``), its RTP
  timestamp the frame's own pts on the 48 kHz Opus clock (the media clock, like the video's);
* ``webrtc.opus_bitrate_kbps`` (default 32: wideband speech; aiortc's 96 kbit/s is music
  quality), application ``voip``, at ``webrtc.opus_complexity`` (default 5; libopus's 10
  costs 30 % more CPU on the event loop for speech).

In a call the audio track encodes each frame itself (:meth:`MonoOpusEncoder.packet`) and hands
aiortc's sender the Opus packet, which the sender only packs (``pack``): no trip through the
executor and its futures (a wake-up of the event loop through its self-pipe for every packet),
and no RFC 6464 audio level worked out in Python over the frame's samples (aiortc does that for
every audio *frame* it is given: 72 us of a 20 ms frame; nothing the server serves reads that
header, and a browser's ``audioLevel`` statistics come from the audio it decodes). Measured in
one call: see ``bench/RESULTS.md``.

The encoder is a subclass of aiortc's, so the server's executor (``MediaExecutor``) still
recognises its ``encode`` as an audio encode and runs it at once on the loop, should aiortc's
sender be handed a frame after all.
"""

from __future__ import annotations

import fractions
import logging
from typing import TYPE_CHECKING

import av
from aiortc import RTCRtpTransceiver
from aiortc.codecs.base import Encoder
from aiortc.codecs.opus import OpusEncoder
from av.frame import Frame
from av.packet import Packet

from media_tracks.aiortc_compat import give_sender_encoder, negotiated_codec_name

if TYPE_CHECKING:
    from config import Settings
    from media_tracks.tracks import AvatarAudioTrack

logger = logging.getLogger(__name__)

OPUS_CLOCK = 48_000  # RTP clock rate of Opus, whatever the input rate
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_FRAME_MS = (10, 20, 40, 60)  # what media.audio_frame_ms allows, all valid Opus frames


class MonoOpusEncoder(OpusEncoder):
    """libopus on the track's mono s16 frames of ``frame_ms`` at ``sample_rate``: one
    packet a frame, at ``bitrate_bps``. ``packets`` counts what it produced."""

    def __init__(self, *, sample_rate: int, frame_ms: int, bitrate_bps: int = 32_000,
                 complexity: int = 5) -> None:
        # aiortc's __init__ builds its stereo codec and resampler: not wanted here
        if sample_rate not in OPUS_RATES:
            raise ValueError(f"Opus does not take {sample_rate} Hz input")
        if frame_ms not in OPUS_FRAME_MS:
            raise ValueError(f"{frame_ms} ms is not an Opus frame duration here")
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.frame_samples = sample_rate * frame_ms // 1000
        self.bitrate_bps = bitrate_bps
        self.complexity = complexity
        self.time_base = fractions.Fraction(1, sample_rate)
        self.packets = 0
        self.codec = self._open()

    def _open(self) -> av.AudioCodecContext:
        codec = av.CodecContext.create("libopus", "w")
        assert isinstance(codec, av.AudioCodecContext)
        codec.bit_rate = self.bitrate_bps
        codec.format = "s16"
        codec.layout = "mono"
        codec.sample_rate = self.sample_rate
        codec.time_base = self.time_base
        codec.options = {"application": "voip", "frame_duration": str(self.frame_ms),
                         "compression_level": str(self.complexity)}
        return codec

    def _encode(self, frame: Frame) -> list[Packet]:
        assert isinstance(frame, av.AudioFrame)
        if frame.samples != self.frame_samples or frame.layout.name != "mono":
            raise ValueError(
                f"expected mono frames of {self.frame_samples} samples, got {frame.samples} "
                f"({frame.layout.name})"
            )
        assert frame.pts is not None
        packets = self.codec.encode(frame)
        self.packets += len(packets)
        return packets

    def timestamp(self, pts: int) -> int:
        """The RTP timestamp (48 kHz Opus clock) of the frame with ``pts`` (in samples): the
        frame's own time, so a lost or late frame leaves a gap in the timestamps, as it
        should, instead of shifting everything after it."""
        return pts * OPUS_CLOCK // self.sample_rate

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        packets = self._encode(frame)
        assert frame.pts is not None
        return [bytes(p) for p in packets], self.timestamp(frame.pts)

    def packet(self, frame: Frame) -> Packet:
        """``frame`` encoded, as the one packet aiortc's sender sends for it (``pack``),
        stamped with the frame's pts and time base. libopus makes exactly one packet of a
        frame of ``frame_ms``; were it ever none, the packet is empty and nothing is sent."""
        packets = self._encode(frame)
        assert frame.pts is not None
        if len(packets) != 1:  # not seen: libopus encodes each whole frame at once
            logger.warning("libopus made %d packets of one %d ms frame; sending the first",
                           len(packets), self.frame_ms)
        packet = packets[0] if packets else Packet(0)
        packet.pts = frame.pts
        packet.time_base = self.time_base
        return packet

    def pack(self, packet: Packet) -> tuple[list[bytes], int]:
        """What aiortc's sender sends for a packet from :meth:`packet`: its bytes, at its
        frame's timestamp (none for an empty packet)."""
        assert packet.pts is not None
        return ([bytes(packet)] if packet.size else []), self.timestamp(packet.pts)


def install_audio_encoder(
    transceiver: RTCRtpTransceiver, *, sample_rate: int, frame_ms: int, bitrate_bps: int,
    complexity: int = 5,
) -> Encoder | None:
    """Give the audio sender a ``MonoOpusEncoder`` when Opus was negotiated; returns it, or
    None (PCMU/PCMA, or an aiortc without the encoder slot: aiortc's encoder is used, and it
    sends 20 ms frames only, which the session's settings then must be). Call it right after
    ``setLocalDescription(answer)``, like ``install_video_encoder``."""
    if (negotiated_codec_name(transceiver) or "").lower() != "opus":
        return None
    encoder = MonoOpusEncoder(sample_rate=sample_rate, frame_ms=frame_ms, bitrate_bps=bitrate_bps,
                              complexity=complexity)
    return encoder if give_sender_encoder(transceiver.sender, encoder) else None


def install_session_audio_encoder(
    transceiver: RTCRtpTransceiver, track: AvatarAudioTrack, settings: Settings
) -> Encoder | None:
    """``install_audio_encoder`` from the session's settings (``media.audio_sample_rate``,
    ``media.audio_frame_ms``, ``webrtc.opus_bitrate_kbps``). Where aiortc's encoder stays, the
    track goes back to 20 ms frames, the only length that encoder sends correctly."""
    media = settings.media
    encoder = install_audio_encoder(
        transceiver,
        sample_rate=media.audio_sample_rate,
        frame_ms=media.audio_frame_ms,
        bitrate_bps=settings.webrtc.opus_bitrate_kbps * 1000,
        complexity=settings.webrtc.opus_complexity,
    )
    if encoder is None:
        track.frame_samples = media.audio_sample_rate // 50
    elif isinstance(encoder, MonoOpusEncoder):
        track.encoder = encoder  # the track hands the sender packets, not frames
    return encoder
