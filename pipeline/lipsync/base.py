"""The lip-sync seam: what every engine provides.

An engine turns a speech segment's audio into a ``LipTrack`` (one feature per video frame of
the segment: viseme weights for the viseme engine, a 16-step mel window for Wav2Lip), and
renders the frames a session's compositor plans (``FramePlan.lips`` is the track's feature for
that frame, ``FramePlan.blend`` the cross-fade weight between idle (0) and speech (1)).

Audio goes in with its pts (the compositor schedules the segment on a frame boundary: local
frame ``j`` of the segment is global frame ``first_frame + j``), frames come out with theirs
(frame ``k`` has 90 kHz pts ``k * 90000 // fps``); ``Compositor.clear()`` drops queued speech at
the next frame boundary and the renderers see the cut through the plans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from face.yuv import Yuv

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from face import IdleTimeline
    from face.library import LoadedAvatar
    from media_tracks.compositor import FramePlan
    from pipeline.tts import SpeechAudio


# The mouth shapes both engines talk about (render timelines use the same names).
VISEMES: tuple[str, ...] = ("REST", "AA", "EE", "OH", "OO", "FF", "TH")


@runtime_checkable
class LipTrack(Protocol):
    """Mouth motion of one speech segment: one engine-specific feature per video frame."""

    @property
    def n_frames(self) -> int: ...

    def at(self, j: int) -> object:
        """The feature for local frame ``j`` (clamped to ``0..n_frames-1``)."""
        ...

    def openness(self) -> npt.NDArray[np.float32]:
        """(n_frames,) how open the mouth is, 0..1 (metrics, tests and the energy fallback)."""
        ...


class FrameRenderer(Protocol):
    """Renders one session's frames. ``render`` never runs heavy work on the event loop."""

    async def render(self, plan: FramePlan) -> Yuv: ...


class LipSyncEngine(Protocol):
    """One per server (per device): shared by every session."""

    @property
    def name(self) -> str:
        """The engine's name ("viseme", "wav2lip")."""
        ...

    @property
    def frame_group(self) -> int:
        """How many consecutive frames a call hands the engine at once (1: one by one; a
        batching model runs a call's group in one batch)."""
        ...

    @property
    def render_lead_ms(self) -> int | None:
        """How far ahead of the media clock a call renders for this engine (None: the
        server's ``media.render_lead_ms``). A model whose latency under load is a good part
        of that lead needs more frames in flight than a cheap renderer."""
        ...

    @property
    def schedule_lead_ms(self) -> int | None:
        """How long after a speech segment is ready its first sample plays, for this engine
        (None: the server's ``media.schedule_lead_ms``). The frames of that time are drawn
        again with the speech: a model call needs more of it than a cheap renderer."""
        ...

    def info(self) -> dict[str, object]:
        """What runs: engine, provider actually in use, precision, batching limits."""
        ...

    def analyse(self, audio: SpeechAudio, *, fps: int) -> LipTrack:
        """The segment's per-frame features (blocking, CPU: call it from an executor)."""
        ...

    def renderer(
        self,
        avatar: LoadedAvatar,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
    ) -> FrameRenderer:
        """A renderer for one session showing ``avatar`` with its own idle ``timeline``."""
        ...

    async def aclose(self) -> None: ...
