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
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from media_tracks.compositor import Segment
from pipeline.speech_units import first_clause
from pipeline.tts import SpeechAudio, join_speech, speech_stream, split_speech
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
        answer_start: bool = False,
    ) -> None:
        """Speak ``text``: its segments go to ``schedule`` in order, the text with the first;
        ``on_first_audio`` is told the first unit's timing. ``answer_start`` (the first
        sentence of an answer): a long sentence is synthesised clause first
        (``first_clause``), and the first unit starts at its voice (``trim_lead``), so the
        answer is heard sooner. Errors propagate; a cancel stops between or inside units."""
        loop = asyncio.get_running_loop()
        t0 = self.now()
        first = True
        async for audio in self._pieces(text, answer_start):
            t1 = self.now()
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

    async def _pieces(self, text: str, answer_start: bool) -> AsyncIterator[SpeechAudio]:
        """The voice's pieces as segments: an answer's first starts at its voice, and a
        piece the next one continues ends on a video frame (every segment starts on one),
        its rest carried into the next."""
        first = True
        carry: SpeechAudio | None = None
        async for piece in self._units(text, answer_start):
            audio = piece if carry is None else join_speech(carry, piece)
            carry = None
            if first and answer_start:
                audio = trim_lead_silence(audio)
            if audio.continued:
                step = audio.sample_rate // self.fps
                keep = len(audio.pcm) // step * step
                if keep == 0:
                    carry = audio
                    continue
                audio, carry = split_speech(audio, keep)
            first = False
            yield audio
        if carry is not None:  # said to go on, and did not: what there is still plays
            yield carry

    async def _units(self, text: str, answer_start: bool) -> AsyncIterator[SpeechAudio]:
        head, rest = first_clause(text) if answer_start else (text, "")
        for part, stream in ((head, answer_start), (rest, False)):
            if part:
                async for audio in speech_stream(self.tts, part, owner=self.owner, live=True,
                                                 stream_first=stream):
                    yield audio


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)
