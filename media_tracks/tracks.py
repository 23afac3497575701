"""The aiortc tracks of a session: both pull from the compositor and are paced from the
session's one media clock, ``deadline = epoch + pts * time_base``, so neither drifts and
RTCP sender reports (wall clock at send, last RTP timestamp) line the two streams up."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np
from aiortc import MediaStreamTrack
from av import AudioFrame, Packet, VideoFrame

from media_tracks.clock import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE, MediaClock, pts_to_ns
from media_tracks.compositor import Compositor
from media_tracks.frames import FrameProducer


def i420_frame(yuv: np.ndarray) -> VideoFrame:
    """``VideoFrame.from_ndarray(yuv, format="yuv420p")``: the same frame, filled with one
    numpy copy a plane (PyAV copies it row by row: 85 against 17 us for a 512x512 frame, on
    the event loop for every frame sent). Odd sizes go through PyAV."""
    rows, w = yuv.shape
    h = rows * 2 // 3
    if w % 2 or h % 2 or rows != h * 3 // 2:
        return VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame = VideoFrame(w, h, "yuv420p")
    flat = yuv.reshape(-1)
    start = 0
    for plane, (pw, ph) in zip(frame.planes, ((w, h), (w // 2, h // 2), (w // 2, h // 2)),
                               strict=True):
        stride = plane.line_size
        dst = np.frombuffer(memoryview(plane), np.uint8)[: ph * stride].reshape(ph, stride)
        dst[:, :pw] = flat[start : start + pw * ph].reshape(ph, pw)
        start += pw * ph
    return frame


class PacketEncoder(Protocol):
    """Encodes an audio frame into the one packet aiortc's sender sends for it
    (``media_tracks.audio_encoder.MonoOpusEncoder``)."""

    def packet(self, frame: AudioFrame) -> Packet: ...

FPS_WINDOW_NS = 2_000_000_000  # recent_fps counts the sends of the last 2 s
LATE_SMOOTHING_S = 1.0  # time constant of the smoothed hand-over lateness


@dataclass(slots=True)
class TrackStats:
    frames_sent: int = 0
    frames_repeated: int = 0  # video: the frame was not ready in time, the last one was re-sent
    frames_skipped: int = 0  # video: the track fell behind the clock and jumped ahead
    frames_shed: int = 0  # video: left out on purpose while the machine is overloaded
    max_late_ns: int = 0  # the worst lateness of a send relative to its deadline
    # media time (ns) when each frame of the last FPS_WINDOW_NS was handed to aiortc
    sent_at_ns: deque[int] = field(default_factory=deque)
    # how long after its pts a frame is handed to aiortc, smoothed over ~LATE_SMOOTHING_S
    # (ns; None before the first frame)
    handover_late_ns: float | None = None

    def observe_send(self, now_ns: int, deadline_ns: int, *, frame_s: float) -> None:
        """A frame whose pts is media time ``deadline_ns`` was handed over at ``now_ns``;
        ``frame_s``: the frame's duration in seconds (sets the smoothing per frame)."""
        late = float(now_ns - deadline_ns)
        if self.handover_late_ns is None:
            self.handover_late_ns = late
        else:
            alpha = min(1.0, frame_s / LATE_SMOOTHING_S)
            self.handover_late_ns += (late - self.handover_late_ns) * alpha
        sent = self.sent_at_ns
        sent.append(now_ns)
        while sent and sent[0] <= now_ns - FPS_WINDOW_NS:
            sent.popleft()

    def recent_fps(self, now_ns: int) -> float:
        """Frames handed over in the ``FPS_WINDOW_NS`` before media time ``now_ns``, per
        second (ramps up over the first window of a call; 0 once sending stops)."""
        n = sum(1 for t in self.sent_at_ns if t > now_ns - FPS_WINDOW_NS)
        return n * 1e9 / FPS_WINDOW_NS

    def recent_max_gap_ns(self, now_ns: int) -> int:
        """The longest wait between two hand-overs in the ``FPS_WINDOW_NS`` before ``now_ns``
        (the wait since the last one included): how long a receiver went without a frame."""
        times = [t for t in self.sent_at_ns if t > now_ns - FPS_WINDOW_NS]
        if not times:
            return 0
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return max([*gaps, now_ns - times[-1]])


def av_offset_ms(video: TrackStats, audio: TrackStats) -> float | None:
    """How much later than audio, relative to their shared media clock, video frames leave
    the server (ms, smoothed; > 0: video behind). None until both tracks have sent."""
    if video.handover_late_ns is None or audio.handover_late_ns is None:
        return None
    return (video.handover_late_ns - audio.handover_late_ns) / 1e6


# libopus (as aiortc drives it) delays its output by its lookahead, 312 samples at 48 kHz, and
# WebRTC receivers do not remove it; the audio track sends that much ahead to cancel it.
OPUS_DELAY_48K = 312


class AvatarAudioTrack(MediaStreamTrack):
    """Mono s16 audio, ``frame_samples`` per frame, pts in samples (time_base 1/sample_rate).

    The frame with pts ``p`` carries the compositor's samples from ``p + codec_delay`` so that
    after the encoder's lookahead they play at their scheduled media time. With an
    ``encoder`` (the session's Opus encoder, once negotiated) each frame is handed over
    encoded, as its packet (``MonoOpusEncoder.packet``): aiortc's sender then only packs it."""

    kind = "audio"

    def __init__(
        self, *, clock: MediaClock, compositor: Compositor, sample_rate: int, frame_samples: int
    ) -> None:
        super().__init__()
        self._clock = clock
        self._compositor = compositor
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples
        self.time_base = Fraction(1, sample_rate)
        self.codec_delay = OPUS_DELAY_48K * sample_rate // 48_000
        self._pts: int | None = None
        self.encoder: PacketEncoder | None = None
        self.stats = TrackStats()

    def first_pts(self) -> int:
        """The first frame boundary at or after the current media time."""
        now_samples = -(-self._clock.now_ns() * self.sample_rate // 1_000_000_000)
        return -(-now_samples // self.frame_samples) * self.frame_samples

    async def recv(self) -> AudioFrame | Packet:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        pts = self.first_pts() if self._pts is None else self._pts + self.frame_samples
        self._pts = pts
        deadline = pts_to_ns(pts, self.time_base)
        await self._clock.sleep_until_ns(deadline)
        self.stats.max_late_ns = max(self.stats.max_late_ns, self._clock.now_ns() - deadline)
        pcm = self._compositor.audio_at(pts + self.codec_delay, self.frame_samples)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = pts
        frame.time_base = self.time_base
        self.stats.frames_sent += 1
        self.stats.observe_send(
            self._clock.now_ns(), deadline, frame_s=self.frame_samples / self.sample_rate
        )
        return frame if self.encoder is None else self.encoder.packet(frame)

    def recent_fps(self) -> float:
        """Frames a second handed to aiortc over the last two seconds."""
        return self.stats.recent_fps(self._clock.now_ns())

    def recent_max_gap_ms(self) -> float:
        """The longest wait between two frames handed to aiortc in the last two seconds."""
        return self.stats.recent_max_gap_ns(self._clock.now_ns()) / 1e6


class AvatarVideoTrack(MediaStreamTrack):
    """Video at the compositor's fps, pts in 90 kHz ticks (``k * 90000 // fps``)."""

    kind = "video"

    def __init__(self, *, clock: MediaClock, compositor: Compositor, frames: FrameProducer,
                 stride: Callable[[], int] | None = None) -> None:
        """``stride``: send only frames whose index it divides (1: all; see
        ``media_tracks.priority.LoadGovernor``); the producer is given the same."""
        super().__init__()
        self._clock = clock
        self._compositor = compositor
        self._frames = frames
        self._stride = stride
        self._k: int | None = None
        self._last: np.ndarray | None = None
        self.stats = TrackStats()

    def pts_of(self, k: int) -> int:
        return k * VIDEO_CLOCK_RATE // self._compositor.fps

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        comp = self._compositor
        now = self._clock.now_ns()
        if self._k is None:
            k = comp.frame_at_or_after_ns(now)
        else:
            k = self._k + 1
            if comp.frame_t_ns(k + 1) <= now:  # more than a frame behind: jump to the present
                jumped = comp.frame_at_or_after_ns(now)
                self.stats.frames_skipped += jumped - k
                k = jumped
        stride = self._stride() if self._stride is not None else 1
        if stride > 1 and k % stride:
            aligned = k + stride - k % stride
            if self._k is not None:
                self.stats.frames_shed += aligned - k
            k = aligned
        self._k = k
        deadline = comp.frame_t_ns(k)
        await self._clock.sleep_until_ns(deadline)
        self.stats.max_late_ns = max(self.stats.max_late_ns, self._clock.now_ns() - deadline)
        yuv = self._frames.take(k)
        if yuv is None:
            if self._last is None:
                yuv = await self._frames.render_now(k)
            else:
                yuv = self._last
                self.stats.frames_repeated += 1
        self._last = yuv
        frame = i420_frame(yuv)
        frame.pts = self.pts_of(k)
        frame.time_base = VIDEO_TIME_BASE
        self.stats.frames_sent += 1
        self.stats.observe_send(self._clock.now_ns(), deadline, frame_s=1 / comp.fps)
        return frame

    def recent_fps(self) -> float:
        """Frames a second handed to aiortc over the last two seconds."""
        return self.stats.recent_fps(self._clock.now_ns())

    def recent_max_gap_ms(self) -> float:
        """The longest wait between two frames handed to aiortc in the last two seconds."""
        return self.stats.recent_max_gap_ns(self._clock.now_ns()) / 1e6
