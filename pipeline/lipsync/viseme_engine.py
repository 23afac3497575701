"""The embedded lip-sync engine: visemes from Piper's phoneme timings (or the audio), drawn by
warping the avatar's own mouth. No weights, no GPU; a speaking frame costs about as much as
an idle one."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from face.yuv import flash_i420
from media_tracks.frames import SameTurnJobs
from pipeline.lipsync.base import VISEMES, Yuv
from pipeline.lipsync.visemes import VisemeTrack, shape_for, track_for

if TYPE_CHECKING:
    from face import FaceRenderer, IdleTimeline
    from face.library import LoadedAvatar
    from media_tracks.compositor import FramePlan
    from pipeline.tts import SpeechAudio


_AA = VISEMES.index("AA")


def open_jaw(openness: float) -> np.ndarray:
    """Viseme weights for a plain open mouth, ``openness`` 0..1 (an "AA" of that weight)."""
    w = np.zeros(len(VISEMES), np.float32)
    w[_AA] = min(max(float(openness), 0.0), 1.0)
    return w


class VisemeRenderer:
    """Renders one session's frames: the idle face, with the viseme mouth while speech plays.

    ``render_sync`` is pure (the same plan gives the same frame) and thread-safe."""

    def __init__(
        self,
        face: FaceRenderer,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
    ) -> None:
        self._face = face
        self._timeline = timeline
        self._width = width
        self._height = height
        self._jobs: SameTurnJobs[FramePlan, Yuv] = SameTurnJobs(self.render_sync, executor)
        self._flash = flash_i420(width, height)

    def render_sync(self, plan: FramePlan) -> Yuv:
        """The I420 frame for ``plan`` (blocking: run it in an executor)."""
        if plan.flash:
            return self._flash
        mouth = None
        if plan.lips is not None and plan.blend > 0:
            lips = np.asarray(plan.lips, dtype=np.float32)
            if lips.size != len(VISEMES):
                # another engine's feature (speech analysed before a session fell back to
                # this engine, or by a primary engine relieved for missed deadlines): open
                # the jaw by the segment's voice level
                lips = open_jaw(plan.mouth / plan.blend)
            mouth = shape_for(lips, blend=plan.blend)
        return self._face.frame_i420(self._timeline, plan.t_ns, mouth)

    async def render(self, plan: FramePlan) -> Yuv:
        """``render_sync`` in the executor; a group's frames (``frame_group``) as one job."""
        return await self._jobs(plan)


class VisemeEngine:
    """``LipSyncEngine`` for visemes: one per server, shared by every session."""

    name = "viseme"
    # a call hands its frames over in pairs, each pair rendered as one job on one thread
    # (``SameTurnJobs``): half the thread wake-ups, and the second frame draws from a warm
    # cache. The render lead (``media.render_lead_ms``, 200 ms) leaves room for it.
    frame_group = 2
    render_lead_ms: int | None = None
    schedule_lead_ms: int | None = None

    def info(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "device": "cpu",
            "precision": "float32",
            "visemes": list(VISEMES),
            "features": "phoneme alignments (Piper), else spectral shape of the audio",
        }

    def analyse(self, audio: SpeechAudio, *, fps: int) -> VisemeTrack:
        """Viseme weights for every video frame of ``audio`` (blocking, a few ms)."""
        return track_for(audio, fps)

    def renderer(
        self,
        avatar: LoadedAvatar,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
    ) -> VisemeRenderer:
        return VisemeRenderer(avatar.face, timeline, width=width, height=height, executor=executor)

    async def aclose(self) -> None:
        return None
