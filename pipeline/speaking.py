"""The one speaking path of a call: text -> speech synthesis -> lip-sync -> scheduled segment.

A ``say`` message and every sentence of a conversation reply go through :meth:`Speaker.speak`:
the text is synthesised in bounded units through the fair scheduler (a live call's turn, taken
in turn with the other calls'), each unit's mouth track is analysed off the event loop, and the
segment is handed to ``schedule``; the next unit is made only once ``room`` says the scheduled
speech is close enough to playback (synthesis paced by playback, not one CPU burst).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from media_tracks.compositor import Segment
from pipeline.tts import speech_stream
from pipeline.tts import trim_lead as trim_lead_silence

if TYPE_CHECKING:
    from pipeline.lipsync import LipSyncEngine, SessionLipSync
    from pipeline.tts import TextToSpeech


@dataclass(frozen=True, slots=True)
class FirstAudio:
    """When the first unit of a text was ready: ``tts_ms`` after ``speak`` began, and the
    lip-sync analysis ``lipsync_ms`` after that (seconds of the speaker's clock, as ms)."""

    tts_ms: float
    lipsync_ms: float


class Speaker:
    """Speaks texts for one call (``owner``: the call's id, its place in the fair TTS queue)."""

    def __init__(
        self,
        tts: TextToSpeech,
        lipsync: LipSyncEngine | SessionLipSync,
        *,
        fps: int,
        owner: str,
        executor: Executor | None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tts = tts
        self.lipsync = lipsync
        self.fps = fps
        self.owner = owner
        self.executor = executor
        self.now = now

    async def speak(
        self,
        text: str,
        *,
        schedule: Callable[[Segment], object],
        room: Callable[[], Awaitable[None]],
        tag: Hashable | None = None,
        on_first_audio: Callable[[FirstAudio], None] | None = None,
        trim_lead: bool = False,
    ) -> None:
        """Speak ``text``: its segments go to ``schedule`` in order, the text with the first;
        ``on_first_audio`` is told the first unit's timing; ``trim_lead``: the first unit
        starts at its voice (``pipeline.tts.trim_lead``: the first words of an answer).
        Errors propagate; a cancel stops between or inside units."""
        loop = asyncio.get_running_loop()
        t0 = self.now()
        first = True
        async for audio in speech_stream(self.tts, text, owner=self.owner, live=True):
            t1 = self.now()
            if first and trim_lead:
                audio = trim_lead_silence(audio)
            analyse = functools.partial(self.lipsync.analyse, audio, fps=self.fps)
            track = await loop.run_in_executor(self.executor, analyse)
            if first and on_first_audio is not None:
                on_first_audio(FirstAudio(_ms(t1 - t0), _ms(self.now() - t1)))
            schedule(
                Segment(
                    pcm=audio.pcm,
                    mouth=track.openness(),
                    lips=track,
                    text=text if first else "",
                    tag=tag,
                )
            )
            first = False
            await room()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)
