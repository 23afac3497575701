"""Encoders for the server's outgoing video: libx264 at a real-time preset, and VP8, both
started at a bitrate suited to the frame size.

aiortc's own encoders (``aiortc.codecs.get_encoder``) run libx264 at its default preset
(medium: about 12 ms per 512x512 frame on a 2-core machine, against about 1.6 ms for VP8)
and start both codecs at 1 Mbit/s whatever the frame size, clamped to 0.5..3 Mbit/s. Here:

* H.264: ``webrtc.h264_preset`` (default veryfast), tune zerolatency (no B-frames, no
  lookahead, sliced threads), Constrained Baseline at level 3.1 (what aiortc negotiates:
  ``profile-level-id`` 42001f / 42e01f), with a one-second VBV buffer at the target rate.
* VP8: real-time libvpx (CBR, ``deadline=realtime``, no lag) at ``cpu-used=-webrtc.vp8_speed``
  (default 12; aiortc's is 6) and without aiortc's temporal denoiser (``noise-sensitivity``
  4): our frames are drawn, not filmed, so the denoiser only blurred them and cost a third of
  the encode (512x512: 2.22 ms a frame at 39.3 dB luma PSNR with it, 1.52 ms at 42.6 dB
  without, 1.34 ms at 41.8 dB at speed 12), and with a static threshold of 1500
  (``webrtc.vp8_static_thresh``; WebRTC's is 1): macroblocks already within that squared
  error of their prediction skip the mode search (0.99 → 0.66 ms a frame, 42.53 → 42.38 dB,
  the mouth's region 41.33 → 41.69 dB).
* Bitrate (``VideoBitrate``): ``webrtc.video_bitrate_kbps`` when above 0, else 0.1 bit per
  pixel per frame at the session's fps (512x512 at 25 fps: 655 kbit/s; 1280x720: 2304
  kbit/s), never below 32 kbit/s. Receiver feedback (REMB, through the ``target_bitrate``
  setter aiortc calls) moves it between a quarter and 1.5 times that start value (the
  talking avatar at 512x512, VP8: 42.4 dB luma PSNR at the start rate, 44.3 dB at 1.5 times,
  47.4 dB at 3 times; past 1.5 times the extra bits buy no visible detail but cost packets,
  each ~0.25 ms of the event loop's CPU in a call, and encode time). A new
  rate rebuilds the encoder (its first frame is a keyframe), so a change waits until the
  encoder has been open 3 s of media time, unless the target fell under half (congestion).

``encode`` is called by aiortc's sender through ``loop.run_in_executor``: off the event loop
(PyAV releases the GIL while libx264 and libvpx work).
"""

from __future__ import annotations

import fractions
import logging
import multiprocessing
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder, number_of_threads
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from av.frame import Frame
from av.video.codeccontext import VideoCodecContext

from media_tracks.aiortc_compat import (
    give_sender_encoder,
    negotiated_codec_name,
)

if TYPE_CHECKING:
    from config import Settings

logger = logging.getLogger(__name__)

BITS_PER_PIXEL = 0.1
MIN_BITRATE_BPS = 32_000
# REMB may move the bitrate within [start / REMB_DOWN, start * REMB_UP_NUM / REMB_UP_DEN]
REMB_DOWN = 4
REMB_UP_NUM, REMB_UP_DEN = 3, 2
# aiortc rebuilds its encoder when the target moves by more than this share; so do we. A
# rebuilt encoder starts with a keyframe (a burst of bits and encode time: libvpx and libx264
# do not take a new bitrate on the fly through PyAV), and REMB moves a little every second,
# so after a (re)open the next change waits REOPEN_MIN_S of media time, unless the target
# fell under REOPEN_DROP of the current rate (congestion is followed at once)
REOPEN_SHARE = 0.1
REOPEN_MIN_S = 3.0
REOPEN_DROP = 0.5
H264_LEVEL = "31"  # level 3.1: up to 1280x720 at 30 fps, as negotiated by aiortc
# aiortc's sender keeps its encoder in this (name-mangled) attribute


@dataclass(frozen=True, slots=True)
class VideoBitrate:
    """One stream's bitrate in bit/s: ``start_bps`` to begin with, REMB feedback clamped to
    ``min_bps``..``max_bps``."""

    start_bps: int
    min_bps: int
    max_bps: int

    @classmethod
    def for_frames(
        cls, *, width: int, height: int, fps: int, bitrate_kbps: int = 0
    ) -> VideoBitrate:
        """``bitrate_kbps`` (kbit/s) when above 0, else 0.1 bit per pixel per frame."""
        if bitrate_kbps > 0:
            start = bitrate_kbps * 1000
        else:
            start = round(BITS_PER_PIXEL * width * height * fps)
        start = max(start, MIN_BITRATE_BPS)
        return cls(
            start_bps=start,
            min_bps=max(start // REMB_DOWN, MIN_BITRATE_BPS),
            max_bps=start * REMB_UP_NUM // REMB_UP_DEN,
        )

    def clamp(self, bps: int) -> int:
        return max(self.min_bps, min(int(bps), self.max_bps))


@dataclass(frozen=True, slots=True)
class VideoEncoding:
    """What the outgoing video encoders are built from: the frame size (pixels) and rate
    (frames/s) of the session, the libx264 preset, and ``bitrate_kbps`` (0 = by frame size)."""

    width: int
    height: int
    fps: int
    h264_preset: str = "veryfast"
    bitrate_kbps: int = 0
    vp8_speed: int = 12
    vp8_static_thresh: int = 1500
    codecs: tuple[str, ...] = ("VP8", "H264")

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoEncoding:
        media, webrtc = settings.media, settings.webrtc
        return cls(
            width=media.video_width,
            height=media.video_height,
            fps=media.fps,
            h264_preset=webrtc.h264_preset,
            bitrate_kbps=webrtc.video_bitrate_kbps,
            vp8_speed=webrtc.vp8_speed,
            vp8_static_thresh=webrtc.vp8_static_thresh,
            codecs=tuple(webrtc.video_codecs),
        )

    def bitrate_for(self, width: int, height: int) -> VideoBitrate:
        return VideoBitrate.for_frames(
            width=width, height=height, fps=self.fps, bitrate_kbps=self.bitrate_kbps
        )


def _needs_reopen(
    codec: VideoCodecContext,
    frame: av.VideoFrame,
    target_bps: int,
    open_for: fractions.Fraction | None,
) -> bool:
    """The frame size changed; or the target moved by more than ``REOPEN_SHARE`` and the
    codec has been open for ``REOPEN_MIN_S`` of media (``open_for``, exact; None: unknown,
    no pts), or the target fell under ``REOPEN_DROP`` of the current rate."""
    if frame.width != codec.width or frame.height != codec.height:
        return True
    current = codec.bit_rate or 0
    if abs(target_bps - current) <= REOPEN_SHARE * current:
        return False
    long_enough = open_for is None or open_for >= REOPEN_MIN_S
    return long_enough or target_bps < REOPEN_DROP * current


def _media_time(frame: av.VideoFrame) -> fractions.Fraction | None:
    """The frame's media time, exact (pts x time base), or None without them."""
    if frame.pts is None or frame.time_base is None:
        return None
    return frame.pts * fractions.Fraction(frame.time_base)


class _RateMixin:
    """The bitrate policy shared by both encoders: a start value for the frame size,
    REMB-driven changes clamped to its bounds."""

    def _init_rate(self, encoding: VideoEncoding) -> None:
        self.encoding = encoding
        self.rate = encoding.bitrate_for(encoding.width, encoding.height)
        self._target_bps = self.rate.start_bps
        self._rate_size = (encoding.width, encoding.height)
        self._opened_at: fractions.Fraction | None = None  # media time the codec opened at

    def _follow_frame_size(self, frame: av.VideoFrame) -> None:
        """Frames of another size than planned: a new start value (and bounds) for it."""
        size = (frame.width, frame.height)
        if size != self._rate_size:
            self._rate_size = size
            self.rate = self.encoding.bitrate_for(*size)
            self._target_bps = self.rate.start_bps

    codec: VideoCodecContext | None

    def _open(self, frame: av.VideoFrame) -> VideoCodecContext:
        raise NotImplementedError

    def _reopening(self) -> None:
        """Called when the codec is dropped to be opened again (size or bitrate changed)."""

    def _encode_bytes(self, frame: av.VideoFrame, force_keyframe: bool) -> bytes:
        """``frame`` encoded, the codec (re)opened first if the size or the target moved."""
        self._follow_frame_size(frame)
        now = _media_time(frame)
        open_for = None if now is None or self._opened_at is None else now - self._opened_at
        if self.codec is not None and _needs_reopen(
            self.codec, frame, self._target_bps, open_for
        ):
            self.codec = None
            self._reopening()
        # I forces a complete picture (PLI/FIR); NONE lets the encoder choose again
        frame.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        if self.codec is None:
            self.codec = self._open(frame)
            self._opened_at = now
        return b"".join(bytes(packet) for packet in self.codec.encode(frame))

    def _context(self, name: str, frame: av.VideoFrame) -> VideoCodecContext:
        """A new encoder context for ``frame``'s size at the current target and fps."""
        codec = av.CodecContext.create(name, "w")
        assert isinstance(codec, VideoCodecContext)
        codec.width = frame.width
        codec.height = frame.height
        codec.bit_rate = self._target_bps
        codec.pix_fmt = "yuv420p"
        codec.framerate = fractions.Fraction(self.encoding.fps, 1)
        codec.time_base = fractions.Fraction(1, self.encoding.fps)
        return codec

    @property
    def target_bitrate(self) -> int:
        """Target bitrate in bit/s (aiortc sets it from REMB; clamped to ``rate``)."""
        return self._target_bps

    @target_bitrate.setter
    def target_bitrate(self, bps: int) -> None:
        self._target_bps = self.rate.clamp(bps)


class RealtimeH264Encoder(_RateMixin, H264Encoder):
    """aiortc's H.264 packetizer with libx264 at ``encoding.h264_preset``, tune zerolatency,
    Constrained Baseline, at ``VideoBitrate`` for the frame size. ``codec`` is the open
    libx264 context (None before the first frame); ``options`` what it was opened with."""

    def __init__(self, encoding: VideoEncoding) -> None:
        super().__init__()
        self._init_rate(encoding)
        self.options: dict[str, str] = {}

    def codec_options(self, bitrate_bps: int) -> dict[str, str]:
        return {
            "preset": self.encoding.h264_preset,
            "tune": "zerolatency",
            "level": H264_LEVEL,
            # a VBV of one second at the target rate keeps bursts near it
            "maxrate": str(bitrate_bps),
            "bufsize": str(bitrate_bps),
        }

    def _open(self, frame: av.VideoFrame) -> VideoCodecContext:
        codec = self._context("libx264", frame)
        self.options = self.codec_options(self._target_bps)
        codec.options = dict(self.options)
        codec.profile = "Baseline"
        return codec

    def _reopening(self) -> None:
        self.buffer_data = b""
        self.buffer_pts = None

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        data = self._encode_bytes(frame, force_keyframe)
        if data:
            yield from self._split_bitstream(data)


class RealtimeVp8Encoder(_RateMixin, Vp8Encoder):
    """aiortc's VP8 packetizer and real-time libvpx settings at ``VideoBitrate`` for the
    frame size. (aiortc's ``encode`` reads the bitrate from a private attribute for its
    buffer size, so this class opens the codec itself.)"""

    def __init__(self, encoding: VideoEncoding) -> None:
        super().__init__()
        self._init_rate(encoding)
        self.options: dict[str, str] = {}

    def codec_options(self, bitrate_bps: int) -> dict[str, str]:
        rate = str(bitrate_bps)
        return {
            "bufsize": rate,  # FFmpeg: rc_buf_sz = bufsize * 1000 / bit_rate = 1000 ms
            "minrate": rate,  # minrate = maxrate = bit_rate: CBR
            "maxrate": rate,
            "deadline": "realtime",
            "cpu-used": str(-self.encoding.vp8_speed),
            "lag-in-frames": "0",
            "noise-sensitivity": "0",
            "overshoot-pct": "15",
            "undershoot-pct": "100",
            "partitions": "0",
            "static-thresh": str(self.encoding.vp8_static_thresh),
        }

    def _open(self, frame: av.VideoFrame) -> VideoCodecContext:
        codec = self._context("libvpx", frame)
        codec.gop_size = 3000
        codec.qmin = 2
        codec.qmax = 56
        self.options = self.codec_options(self._target_bps)
        codec.options = dict(self.options)
        codec.thread_count = number_of_threads(
            frame.width * frame.height, multiprocessing.cpu_count()
        )
        return codec

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        data = self._encode_bytes(frame, force_keyframe)
        payloads = self._packetize(data, self.picture_id)
        assert frame.pts is not None and frame.time_base is not None
        timestamp = convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)
        self.picture_id = (self.picture_id + 1) % (1 << 15)
        return payloads, timestamp


def make_video_encoder(codec_name: str, encoding: VideoEncoding) -> Encoder | None:
    """Our encoder for ``codec_name`` ("VP8", "H264"; any case), or None for another."""
    name = codec_name.upper()
    if name == "H264":
        return RealtimeH264Encoder(encoding)
    if name == "VP8":
        return RealtimeVp8Encoder(encoding)
    return None


def video_codec_preferences(names: Sequence[str]) -> list[RTCRtpCodecCapability]:
    """aiortc's video codecs in the order of ``names`` (VP8, H264: every H.264 profile aiortc
    has), then retransmission (rtx) for them; a codec not named is left out, so not offered."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    preferred: list[RTCRtpCodecCapability] = []
    for name in names:
        preferred += [c for c in capabilities if c.name.upper() == name.upper()]
    return preferred + [c for c in capabilities if is_rtx(c)]


def describe_encoder(encoder: Encoder | None, codec: str | None) -> str:
    """One line for the log: the codec, and our encoder's rate and preset (or aiortc's)."""
    if not isinstance(encoder, RealtimeH264Encoder | RealtimeVp8Encoder):
        return f"{codec} (aiortc's encoder)"
    rate = encoder.rate
    preset = (
        f", preset {encoder.encoding.h264_preset}" if isinstance(encoder, RealtimeH264Encoder)
        else ""
    )
    return (f"{codec} at {rate.start_bps // 1000} kbit/s "
            f"(REMB {rate.min_bps // 1000}..{rate.max_bps // 1000}){preset}")


def install_video_encoder(
    transceiver: RTCRtpTransceiver, encoding: VideoEncoding
) -> Encoder | None:
    """Give the transceiver's sender our encoder for its negotiated codec; returns it, or None
    (then aiortc makes its own, and a warning says why).

    Call it right after ``setLocalDescription(answer)`` returns. The sender's RTP task starts
    only once ICE and DTLS connect (a task aiortc schedules at the end of
    ``setLocalDescription``, so it has not run yet) and makes an encoder on its first frame
    only if it has none: the one set here is used from the first frame on.

    Why per sender and not by replacing ``aiortc.rtcrtpsender.get_encoder`` with a factory
    reading settings from a context variable: the encoder belongs to this peer connection
    only, so nothing is global; two apps with different settings in one process (tests), and
    the bot's or a test's own peer connections on the same event loop, keep theirs. It does
    not depend on which task aiortc creates the sender's task from (a context variable would
    silently fall back to aiortc's encoder if that chain changed). What it relies on, one
    private attribute of ``RTCRtpSender`` and the negotiated codec list of the transceiver,
    is checked here: if aiortc changes them the call goes on with aiortc's encoder.
    """
    codec_name = negotiated_codec_name(transceiver)
    if codec_name is None:
        logger.warning("no negotiated video codec on the transceiver; aiortc's encoder is used")
        return None
    encoder = make_video_encoder(codec_name, encoding)
    if encoder is None:
        return None
    return encoder if give_sender_encoder(transceiver.sender, encoder) else None


_X264_SEI = re.compile(rb"x264 - core \d+.*? - options: ([ -~]*)")


def x264_options(bitstream: bytes) -> dict[str, str]:
    """The settings libx264 reports in the SEI message it writes before its first picture
    (``{"subme": "2", "me": "hex", "rc_lookahead": "0", "bitrate": "655", ...}``); empty
    when ``bitstream`` holds none."""
    match = _X264_SEI.search(bitstream)
    if match is None:
        return {}
    out: dict[str, str] = {}
    for item in match.group(1).decode("ascii").split():
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def unmatched_video_codecs(sdp: str, names: Sequence[str]) -> list[str] | None:
    """When a video m-line of the offer ``sdp`` has no codec in common with ``names`` (as
    aiortc matches them: H.264 only in a profile and packetization mode it has), the video
    codecs that m-line offers (``["H264", "VP9"]``; rtx left out); else None (also for an
    SDP that does not parse: that is another fault)."""
    from aiortc import sdp as aiortc_sdp
    from aiortc.codecs import CODECS
    from aiortc.rtcpeerconnection import filter_preferred_codecs, find_common_codecs

    try:
        description = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception:  # aiortc raises ValueError, KeyError, ... on bad SDP
        return None
    preferences = video_codec_preferences(names)
    for media in description.media:
        if media.kind != "video":
            continue
        common = filter_preferred_codecs(
            find_common_codecs(CODECS["video"], media.rtp.codecs), preferences
        )
        if not [c for c in common if not is_rtx(c)]:
            offered = [c.name for c in media.rtp.codecs if not is_rtx(c)]
            return list(dict.fromkeys(offered))
    return None
