"""The compositor: for every media time, which audio samples and which video frame play.

Audio positions are samples at ``sample_rate`` since the session epoch; video frame ``k``
has 90 kHz pts ``k * 90000 // fps`` and covers audio samples ``[k*sr//fps, (k+1)*sr//fps)``.
A segment is scheduled on a video frame boundary, so its sample ``i`` plays at ``start + i``
and its local frame ``j`` is global frame ``first_frame + j``: both tracks read this one
schedule, which is the whole A/V-sync contract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from media_tracks.clock import NS_PER_S, MediaClock

logger = logging.getLogger(__name__)

Event = dict[str, object]


@dataclass(frozen=True, slots=True)
class Segment:
    """Something to play: audio and the mouth motion that goes with it.

    pcm: int16 mono at the compositor's sample rate.
    mouth: opening 0..1 per video frame of the segment (frame j covers samples
    ``[j*sr//fps, (j+1)*sr//fps)``); shorter arrays are padded with 0.
    lips: the lip-sync engine's per-frame features (``pipeline.lipsync.base.LipTrack``),
    handed to the renderer through ``FramePlan.lips``; None for sounds without a mouth.
    flash_frames: local frame indices shown as a uniform bright frame (A/V sync test).
    """

    pcm: np.ndarray
    mouth: np.ndarray
    text: str = ""
    kind: str = "speech"
    flash_frames: frozenset[int] = frozenset()
    lips: Any = None
    tag: Any = None  # the caller's own marker, handed back in the "playout" event


@dataclass(slots=True)
class Scheduled:
    segment: Segment
    start: int  # audio pts of sample 0
    first_frame: int  # global video frame index showing local frame 0
    n_frames: int
    fade_in: bool = True
    fade_out: bool = True
    id: int = 0
    # set by ``Compositor.clear()``: the local frame where the speech was cut and the audio
    # pts where its sound stops (a frame boundary); the face fades to idle from there
    cut_frame: int | None = None
    cut_sample: int | None = None
    announced: bool = False  # its "playout" event was emitted

    @property
    def end(self) -> int:
        """Audio pts just after the last sample played."""
        end = self.start + len(self.segment.pcm)
        return end if self.cut_sample is None else min(end, self.cut_sample)


@dataclass(frozen=True, slots=True)
class FramePlan:
    """What video frame ``index`` shows: the idle face at ``t_ns``, with the speaking mouth
    or a flash.

    ``lips`` is the lip-sync engine's feature for this frame (``LipTrack.at``; None when no
    speech is on), ``blend`` the cross-fade weight between the idle face (0) and the engine's
    mouth (1), and ``mouth`` the mouth opening 0..1 already multiplied by ``blend``."""

    index: int
    t_ns: int
    mouth: float = 0.0
    blend: float = 0.0
    flash: bool = False
    segment_id: int | None = None
    lips: object | None = None


DUCK_MAX_MS = 1000  # a faded voice comes back after this much media time, at most


@dataclass(slots=True)
class CompositorStats:
    segments_played: int = 0
    audio_frames: int = 0
    clears: int = 0
    events: list[Event] = field(default_factory=list)


class Compositor:
    """Owns the schedule of one session. Never blocks; safe to call from the event loop only."""

    def __init__(
        self,
        *,
        clock: MediaClock,
        fps: int,
        sample_rate: int,
        schedule_lead_ms: int,
        crossfade_frames: int,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.clock = clock
        self.fps = fps
        self.sample_rate = sample_rate
        self.schedule_lead_ns = schedule_lead_ms * 1_000_000
        self.crossfade_frames = crossfade_frames
        self._on_event = on_event
        self._segments: list[Scheduled] = []
        self._next_id = 1
        self._speaking = False
        self._audio_pos = 0  # audio pts up to which playout has been asked for
        self._gain = self._gain_to = 1.0  # the voice's level, and where duck() sends it
        self._quiet_until = 0  # a cut made while ducked: the voice stays out up to it
        self._duck_until = 0  # a duck ends by itself at this audio pts
        self._cut_listeners: list[Callable[[int], None]] = []
        self._speech_listeners: list[
            tuple[Callable[[Scheduled], None], Callable[[int], None]]] = []
        self.stats = CompositorStats()

    # --- time helpers -------------------------------------------------------------------
    def frame_start_sample(self, k: int) -> int:
        return k * self.sample_rate // self.fps

    def frame_t_ns(self, k: int) -> int:
        return k * NS_PER_S // self.fps

    def frame_at_or_after_ns(self, t_ns: int) -> int:
        return -((-t_ns * self.fps) // NS_PER_S)

    # --- scheduling ---------------------------------------------------------------------
    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def queued(self) -> int:
        return sum(1 for s in self._segments if s.end > self._audio_pos)

    def pending_of(self, kind: str) -> int:
        """Segments of ``kind`` (e.g. "clapper") queued or playing, not yet over."""
        return sum(1 for s in self._segments if s.segment.kind == kind and s.end > self._audio_pos)

    def scheduled_end_ns(self) -> int:
        """Media time at which the speech scheduled so far ends (now, if none is left)."""
        now = self.clock.now_ns()
        if not self._segments:
            return now
        end = max(s.end for s in self._segments)
        return max(now, end * NS_PER_S // self.sample_rate)

    async def wait_until_ahead_at_most(self, ahead_ns: int) -> None:
        """Return once the scheduled speech ends at most ``ahead_ns`` after now: a speaker
        that waits here before making its next sentence keeps only that much synthesised
        ahead of playback, instead of synthesising a whole long text in one CPU burst."""
        while True:
            now = self.clock.now_ns()
            start = self.scheduled_end_ns() - ahead_ns
            if start <= now:
                return
            # look again at least every 250 ms: an interruption shortens what is ahead
            await self.clock.sleep_until_ns(min(start, now + 250_000_000))

    def schedule(self, segment: Segment) -> Scheduled:
        """Queue ``segment`` after everything already scheduled, no sooner than the schedule
        lead from now, starting on a video frame boundary."""
        earliest = self.frame_at_or_after_ns(self.clock.now_ns() + self.schedule_lead_ns)
        prev = self._segments[-1] if self._segments else None
        first = earliest
        if prev is not None and prev.cut_frame is not None:
            first = max(first, prev.first_frame + prev.n_frames)  # after its fade to idle
        elif prev is not None and prev.end > self._audio_pos:
            after_prev = -(-prev.end * self.fps // self.sample_rate)  # frame at/after its end
            first = max(first, after_prev)
        n_frames = -(-len(segment.pcm) * self.fps // self.sample_rate)
        item = Scheduled(
            segment=segment,
            start=self.frame_start_sample(first),
            first_frame=first,
            n_frames=max(n_frames, 1),
            id=self._next_id,
        )
        self._next_id += 1
        if (
            prev is not None
            and prev.cut_frame is None
            and prev.first_frame + prev.n_frames >= first
        ):
            # back to back: no fade between them
            prev.fade_out = False
            item.fade_in = False
        self._segments.append(item)
        for scheduled, _ in list(self._speech_listeners):
            try:
                scheduled(item)
            except Exception:
                logger.exception("speech listener failed")
        self._replanned(first)
        return item

    def add_speech_listener(self, scheduled: Callable[[Scheduled], None],
                            cleared: Callable[[int], None]) -> None:
        """``scheduled(item)`` when a segment is queued (before its frames are re-planned),
        ``cleared(k)`` when speech is interrupted at frame ``k``."""
        self._speech_listeners.append((scheduled, cleared))

    def replan_from(self, k: int) -> None:
        """Frames from ``k`` on must be drawn again (what they show changed elsewhere)."""
        self._replanned(k)

    def add_cut_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(k)`` is called when the plans of frames ``>= k`` changed: after
        ``clear()``, and when a segment is scheduled to start at frame ``k`` (frames rendered
        ahead for that time showed the idle face)."""
        self._cut_listeners.append(listener)

    def _replanned(self, k: int) -> None:
        for listener in list(self._cut_listeners):
            try:
                listener(k)
            except Exception:
                logger.exception("re-plan listener failed")

    def clear(self) -> int:
        """Interrupt: stop speech at the next video frame boundary that audio playout has not
        reached, drop every segment queued after it, and cross-fade the face to idle from
        there (the mouth holds its last shape while it fades). Returns that frame's index.

        Audio already handed to the audio track plays out (at most one frame); frames from the
        returned index on are re-planned, and cut listeners are told so they re-render."""
        cut = -(-self._audio_pos * self.fps // self.sample_rate)  # frame at/after playout
        cut_sample = self.frame_start_sample(cut)
        kept: list[Scheduled] = []
        for s in self._segments:
            if s.first_frame >= cut:
                continue  # not started: dropped
            j = cut - s.first_frame
            if j < s.n_frames and (s.cut_frame is None or j < s.cut_frame):
                s.cut_frame = j
                s.cut_sample = cut_sample
                s.n_frames = j + (self.crossfade_frames if s.segment.kind == "speech" else 0)
                s.fade_out = True
            kept.append(s)
        self._segments = kept
        if self.ducked:  # what plays up to the cut stays faded, whatever duck() says next
            self._quiet_until = max(self._quiet_until, cut_sample)
        self.stats.clears += 1
        for _, cleared in list(self._speech_listeners):
            try:
                cleared(cut)
            except Exception:
                logger.exception("speech listener failed")
        self._replanned(cut)
        return cut

    # --- audio --------------------------------------------------------------------------
    def audio_at(self, pts: int, n: int) -> np.ndarray:
        """int16 samples ``[pts, pts+n)``: the scheduled speech, silence elsewhere. Emits a
        ``playout`` event (segment id, kind, text, tag) when a segment's first sample is handed
        out, and ``state`` events (speaking / listening) when playout crosses into or out of
        speech."""
        out = np.zeros(n, dtype=np.int16)
        active = False
        for s in self._segments:
            lo, hi = max(pts, s.start), min(pts + n, s.end)
            if lo < hi:
                out[lo - pts : hi - pts] = s.segment.pcm[lo - s.start : hi - s.start]
                active = True
            elif s.start <= pts < s.end + self.sample_rate // self.fps:
                active = True  # the gap up to the next frame boundary between back-to-back
        self._audio_pos = max(self._audio_pos, pts + n)
        self.stats.audio_frames += 1
        for s in self._segments:
            if not s.announced and s.start < pts + n and s.end > s.start:
                s.announced = True  # its first sample is in this audio frame
                self._emit(
                    {"type": "playout", "segment_id": s.id, "kind": s.segment.kind,
                     "text": s.segment.text, "tag": s.segment.tag}
                )
        if active != self._speaking:
            self._speaking = active
            self._emit({"type": "state", "state": "speaking" if active else "listening"})
        self._forget_played()
        return self._apply_gain(out, pts)

    def duck(self, on: bool, *, max_ms: int = DUCK_MAX_MS) -> None:
        """Fade the avatar's voice out (``on``) or back in over the next audio frame. The
        speech plan, its clock and the face go on as they were: while the person may be
        starting to talk over it (``SpeechOnset``) the voice is out of their way at once, and
        a sound that was not speech costs a few hundred ms of voice, not a replan. A duck
        ends by itself ``max_ms`` of media time after playout reached it, whatever else
        happens (the microphone stops before the VAD settles)."""
        self._gain_to = 0.0 if on else 1.0
        if on:
            self._duck_until = self._audio_pos + max_ms * self.sample_rate // 1000

    @property
    def ducked(self) -> bool:
        return self._gain_to < 1.0

    def _apply_gain(self, out: np.ndarray, pts: int) -> np.ndarray:
        if self._gain_to == 0.0 and pts >= self._duck_until:
            self._gain_to = 1.0  # the duck's time is up
        target = self._gain_to if pts >= self._quiet_until else 0.0
        if self._gain == 1.0 and target == 1.0:
            return out
        start, end = self._gain, target
        self._gain = end
        if start == end == 0.0:
            return np.zeros_like(out)
        ramp = np.linspace(start, end, out.size, dtype=np.float32)
        return (out * ramp).astype(np.int16)

    def _forget_played(self) -> None:
        horizon = self._audio_pos - self.sample_rate  # keep a second for late video plans
        while self._segments and self._segments[0].end < horizon:
            self._segments.pop(0)
            self.stats.segments_played += 1

    def _emit(self, event: Event) -> None:
        self.stats.events.append(event)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("event handler failed")

    # --- video --------------------------------------------------------------------------
    def frame_plan(self, k: int) -> FramePlan:
        """What video frame ``k`` shows."""
        t_ns = self.frame_t_ns(k)
        for s in self._segments:
            j = k - s.first_frame
            if 0 <= j < s.n_frames:
                blend = 1.0
                fade = self.crossfade_frames
                if fade > 0:
                    if s.fade_in:
                        blend = min(blend, (j + 1) / (fade + 1))
                    if s.fade_out:
                        blend = min(blend, (s.n_frames - j) / (fade + 1))
                # after a cut the mouth holds the shape of the last frame played
                src = j if s.cut_frame is None else min(j, s.cut_frame - 1)
                seg = s.segment
                mouth = float(seg.mouth[src]) if src < len(seg.mouth) else 0.0
                lips = seg.lips.at(src) if seg.lips is not None else None
                return FramePlan(
                    index=k,
                    t_ns=t_ns,
                    mouth=mouth * blend,
                    blend=blend,
                    flash=s.cut_frame is None and j in seg.flash_frames,
                    segment_id=s.id,
                    lips=lips,
                )
        return FramePlan(index=k, t_ns=t_ns)
