"""Media: the session clock, the compositor, frame rendering ahead of the clock, the aiortc
tracks and encoders, audio-first scheduling under overload (``priority``), and every reach
into aiortc's private parts (``aiortc_compat``)."""

from media_tracks.clock import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE, ManualClock, MediaClock
from media_tracks.compositor import Compositor, FramePlan, Scheduled, Segment
from media_tracks.frames import FrameProducer, SyncRenderer
from media_tracks.tracks import AvatarAudioTrack, AvatarVideoTrack, TrackStats

__all__ = [
    "VIDEO_CLOCK_RATE",
    "VIDEO_TIME_BASE",
    "AvatarAudioTrack",
    "AvatarVideoTrack",
    "Compositor",
    "FramePlan",
    "FrameProducer",
    "ManualClock",
    "MediaClock",
    "Scheduled",
    "Segment",
    "SyncRenderer",
    "TrackStats",
]
