"""The expression layer (``face.expression``) wired to a call's compositor and media clock.

``CallExpression`` makes the call's timeline (the idle one with the layer on top) and turns
what happens in the call into cues on the media clock:

* the person's speech (VAD start, pause, end) and the turn's states (thinking; back to
  listening without speech) are stamped ``lead_ns`` ahead of now: the first frame not yet
  drawn, so no frame already drawn would have looked different;
* reply speech is read from the compositor as it is scheduled (its first frame, its mouth
  envelope), and cut where the compositor cuts it. When speech ends a thinking look, the two
  frames before it are drawn again so that the look fades out, not snaps.
"""

from __future__ import annotations

import logging

import numpy as np

from face.expression import Expression, ExpressiveTimeline
from face.timeline import IdleTimeline
from media_tracks.compositor import Compositor, Scheduled

__all__ = ["CallExpression"]

logger = logging.getLogger(__name__)

MS = 1_000_000
MIN_AHEAD_NS = 40 * MS  # frames closer than this to now are never drawn again


class CallExpression:
    """One call's expression layer. ``lead_ns``: how far ahead its frames are drawn."""

    def __init__(self, compositor: Compositor, *, strength: float, lead_ns: int) -> None:
        self.compositor = compositor
        self.expression = Expression(strength=strength)
        self.lead_ns = int(lead_ns)
        self._frame_ns = compositor.frame_t_ns(1) - compositor.frame_t_ns(0)
        compositor.add_speech_listener(self._scheduled, self._cleared)

    def timeline(self, idle: IdleTimeline) -> ExpressiveTimeline:
        return ExpressiveTimeline(idle, self.expression)

    def cue(self, kind: str) -> None:
        """A cue now (``user_start``, ``user_pause``, ``user_end``, ``think``, ``idle``)."""
        self.expression.cue(kind, self.compositor.clock.now_ns() + self.lead_ns)

    def state(self, state: str, user: str | None = None) -> None:
        """The call's ``state`` events: ``thinking`` starts the thinking look; ``listening``
        (not the person starting to speak) ends one that found nothing to say."""
        if state == "thinking":
            self.cue("think")
        elif state == "listening" and user is None:
            self.cue("idle")

    def _scheduled(self, item: Scheduled) -> None:
        seg = item.segment
        if seg.kind != "speech":
            return
        c = self.compositor
        envelope = np.asarray(seg.mouth, dtype=np.float32)[: item.n_frames]
        redraw_ns = self.expression.speech(c.frame_t_ns(item.first_frame), self._frame_ns,
                                           envelope)
        if redraw_ns is not None:
            earliest = c.clock.now_ns() + MIN_AHEAD_NS
            c.replan_from(c.frame_at_or_after_ns(max(redraw_ns, earliest)))

    def _cleared(self, k: int) -> None:
        self.expression.cut(self.compositor.frame_t_ns(k))
