"""The conversation's turn logic without a network: VAD events are fed by hand, the host
records what would go to the client. Covers preemptive answers (started at a pause, held until
the end of the turn is confirmed, thrown away when speech resumes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest

from config import load_settings
from media_tracks.aiortc_compat import receiver_jitter_buffer
from pipeline.lipsync.viseme_engine import VisemeEngine
from pipeline.speaking import Speaker
from pipeline.stt import Transcript
from pipeline.vad import (
    SpeechBlip,
    SpeechEnd,
    SpeechOnset,
    SpeechPause,
    SpeechResume,
    SpeechStart,
)
from rtc_server.conversation import Conversation
from rtc_server.protocol import Event
from tests.fakes.clock import FakeClock
from tests.fakes.tts import ToneTTS


class Host:
    id = "unit-test-session"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.scheduled: list[Any] = []
        self.cuts = 0
        self.room = asyncio.Event()  # playback has room for more speech
        self.room.set()

    def send_event(self, event: Event) -> None:
        self.events.append(event.to_wire())

    def schedule(self, segment: Any) -> None:
        self.scheduled.append(segment)

    def interrupt(self) -> None:
        self.cuts += 1

    playing_now = False
    ducks: list[bool]

    @property
    def playing(self) -> bool:
        return self.playing_now

    def duck(self, on: bool) -> None:
        self.__dict__.setdefault("ducks", []).append(on)

    async def wait_for_speech_room(self) -> None:
        self.room_waits = getattr(self, "room_waits", 0) + 1
        await self.room.wait()


class CountingSTT:
    def __init__(self, text: str = "hello there") -> None:
        self.text = text
        self.calls = 0

    async def transcribe(self, audio16k: np.ndarray) -> Transcript:
        self.calls += 1
        await asyncio.sleep(0)
        return Transcript(self.text, "en", 1.0, len(audio16k) / 16000, 0.0)


class CountingReplier:
    name = "counting"

    def __init__(self, answer: str = "Hello, my friend. Nice to meet you today.") -> None:
        self.answer = answer
        self.calls: list[str] = []
        self.closed = 0
        self.released = False

    async def reply(
        self, history: Sequence[Any], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        self.calls.append(text)
        try:
            for word in self.answer.split(" "):
                await asyncio.sleep(0)
                yield word + " "
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        self.released = True


class Mic:
    """Stands in for the VAD listener: only its clock is read."""

    time_ms = 0




def make(
    preemptive: bool = True, *, now: Any = None, stt: Any = None, replier: Any = None
) -> tuple[Conversation, Host, Any, Any, Mic]:
    settings = load_settings(env={}, overrides={"conversation.preemptive": preemptive})
    host, mic = Host(), Mic()
    stt = stt or CountingSTT()
    replier = replier or CountingReplier()
    conv = Conversation(
        host,
        settings=settings,
        speaker=Speaker(ToneTTS(), VisemeEngine(), fps=settings.media.fps, owner=host.id,
                        executor=None, **({"now": now} if now is not None else {})),
        replier=replier,
        stt=stt,
        listener=mic,
        resampler=None,
        **({"now": now} if now is not None else {}),
    )
    return conv, host, stt, replier, mic


AUDIO = np.zeros(16000, np.float32)


async def settle(conv: Conversation) -> None:
    """Let every task of the conversation run as far as it can."""
    for _ in range(200):
        await asyncio.sleep(0)
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    for _ in range(50):
        await asyncio.sleep(0)


def sent(host: Host) -> list[str]:
    return [e.get("state") or e["type"] for e in host.events]


@pytest.mark.asyncio
async def test_a_preemptive_answer_is_held_until_the_end_of_the_turn():
    clock = FakeClock()
    conv, host, stt, replier, mic = make(now=clock)
    conv._on_vad_event(SpeechStart(0, 250))
    host.events.clear()
    mic.time_ms = 1250
    conv._on_vad_event(SpeechPause(AUDIO, 0, 1000))
    await settle(conv)
    # everything is ready (transcribed, answered, synthesised) but nothing went out
    assert stt.calls == 1 and replier.calls == ["hello there"]
    assert host.events == [] and host.scheduled == []
    assert conv.history == []
    mic.time_ms = 1600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 1000, 1600))
    # the end releases the held turn in order, without transcribing or answering again
    assert sent(host) == ["thinking", "transcript", "thinking"]
    transcript = host.events[1]
    assert transcript["text"] == "hello there" and transcript["turn"] == 1
    assert [s.text for s in host.scheduled] == ["Hello, my friend.", "Nice to meet you today."]
    assert stt.calls == 1 and len(replier.calls) == 1
    assert [m["role"] for m in conv.history] == ["user", "assistant"]
    # the turn's speech is tagged for the playout report; the metrics follow playout
    conv.on_playout(host.scheduled[0].tag)
    metrics = host.events[-1]
    assert metrics["type"] == "metrics" and metrics["turn"] == 1
    assert metrics["preemptive"] == 1.0
    # the speech ended 600 ms of mic time before the end was declared (the injected clock
    # does not move, so the measure is exact)
    assert metrics["vad_end_ms"] == 600.0
    await conv.aclose()


@pytest.mark.asyncio
async def test_speech_resuming_throws_the_held_answer_away():
    conv, host, stt, replier, mic = make()
    conv._on_vad_event(SpeechStart(0, 250))
    host.events.clear()
    mic.time_ms = 1250
    conv._on_vad_event(SpeechPause(AUDIO, 0, 1000))
    for _ in range(3):
        await asyncio.sleep(0)
    conv._on_vad_event(SpeechResume(1300))
    await settle(conv)
    assert host.events == [] and host.scheduled == [] and conv.history == []
    assert replier.closed == len(replier.calls)  # a started reply stream was closed
    # the real end: a fresh turn, numbered 1 (the discarded one took no number)
    stt.text = "hello there, how are you"
    mic.time_ms = 2600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 2000, 2600))
    await settle(conv)
    transcripts = [e for e in host.events if e["type"] == "transcript"]
    assert [(t["text"], t["turn"]) for t in transcripts] == [("hello there, how are you", 1)]
    assert len(host.scheduled) == 2
    assert conv.history[0]["content"] == "hello there, how are you"
    await conv.aclose()


@pytest.mark.asyncio
async def test_an_end_for_other_speech_replaces_the_held_answer():
    conv, host, stt, replier, mic = make()
    mic.time_ms = 1250
    conv._on_vad_event(SpeechPause(AUDIO, 0, 1000))
    await settle(conv)
    mic.time_ms = 2700
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 2100, 2700))  # speech went on past the pause
    await settle(conv)
    assert stt.calls == 2 and len(replier.calls) == 2
    assert [e["turn"] for e in host.events if e["type"] == "transcript"] == [1]
    assert len(host.scheduled) == 2  # only the confirmed turn speaks
    await conv.aclose()


@pytest.mark.asyncio
async def test_without_preemption_only_the_transcription_starts_at_the_pause():
    conv, host, stt, replier, mic = make(preemptive=False)
    mic.time_ms = 1250
    conv._on_vad_event(SpeechPause(AUDIO, 0, 1000))
    await settle(conv)
    assert stt.calls == 1 and replier.calls == [] and host.events == []
    mic.time_ms = 1600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 1000, 1600))
    await settle(conv)
    assert stt.calls == 1 and replier.calls == ["hello there"]
    metrics_free = [e["type"] for e in host.events]
    assert metrics_free[:2] == ["state", "transcript"]
    assert len(host.scheduled) == 2
    await conv.aclose()


@pytest.mark.asyncio
async def test_the_answer_is_synthesised_as_playback_makes_room():
    """A committed answer's next sentence is made only when the session says little enough
    speech is scheduled ahead (a long answer is not synthesised in one CPU burst that would
    starve rendering)."""
    conv, host, stt, replier, mic = make(preemptive=False)
    host.room.clear()  # playback is more than a few seconds ahead
    mic.time_ms = 1600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 1000, 1600))
    for _ in range(500):  # the lip-sync analysis runs on a thread
        if host.scheduled:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # time enough to make the second sentence, were it allowed
    assert [s.text for s in host.scheduled] == ["Hello, my friend."]  # waiting for room
    assert host.room_waits == 1
    host.room.set()
    await settle(conv)
    assert [s.text for s in host.scheduled] == ["Hello, my friend.", "Nice to meet you today."]
    await conv.aclose()


@pytest.mark.asyncio
async def test_a_chat_message_drops_a_held_answer():
    conv, host, stt, replier, mic = make()
    mic.time_ms = 1250
    conv._on_vad_event(SpeechPause(AUDIO, 0, 1000))
    await settle(conv)
    conv.chat("What is your name?")
    await settle(conv)
    mic.time_ms = 1600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 1000, 1600))  # too late: the held turn is gone
    await settle(conv)
    transcripts = [(e["text"], e["turn"]) for e in host.events if e["type"] == "transcript"]
    # the chat is turn 1; the end of speech after it starts a fresh turn 2
    assert transcripts[0] == ("What is your name?", 1)
    assert [t for _, t in transcripts] == [1, 2]
    await conv.aclose()


@pytest.mark.asyncio
async def test_the_microphone_receiver_hands_frames_on_after_one_more_not_four():
    from aiortc import RTCPeerConnection
    from aiortc.rtp import RtpPacket

    from rtc_server.mic import set_audio_prefetch

    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("audio", direction="recvonly")
        receiver = transceiver.receiver

        def frames_out(n_packets: int) -> int:
            buf = receiver_jitter_buffer(receiver)
            assert buf is not None
            out = 0
            for seq in range(n_packets):
                packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960)
                packet._data = bytes(40)  # what the receiver stores after depacketising
                _, frame = buf.add(packet)
                out += frame is not None
            return out

        assert frames_out(5) == 1  # aiortc's default: a frame once four more are queued
        assert set_audio_prefetch(pc, receiver.track, 1)
        assert frames_out(5) == 4  # now every frame but the newest is out
        assert not set_audio_prefetch(pc, object(), 1)  # type: ignore[arg-type]
    finally:
        await pc.close()


@pytest.mark.asyncio
async def test_closing_the_conversation_releases_its_replier():
    """Each call has its own replier (an OpenAI client holds a connection pool): it is closed
    with the call, not left to the garbage collector after the event loop is gone."""
    conv, _, _, replier, _ = make()
    assert not replier.released
    await conv.aclose()
    assert replier.released


class SlowSTT(CountingSTT):
    """Transcribes in 420 ms of the test's clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    async def transcribe(self, audio16k: np.ndarray) -> Transcript:
        self.clock.advance(0.42)
        return await super().transcribe(audio16k)


class SlowReplier(CountingReplier):
    """Its first token comes 250 ms of the test's clock after the request."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    async def reply(
        self, history: Sequence[Any], text: str, *, language: str = "en"
    ) -> AsyncIterator[str]:
        self.clock.advance(0.25)
        async for delta in super().reply(history, text, language=language):
            yield delta


@pytest.mark.asyncio
async def test_a_turn_is_timed_by_the_injected_clock_without_sleeping():
    clock = FakeClock()
    conv, host, stt, replier, mic = make(
        preemptive=False, now=clock, stt=SlowSTT(clock), replier=SlowReplier(clock)
    )
    conv._on_vad_event(SpeechStart(0, 250))
    mic.time_ms = 1600
    conv._on_vad_event(SpeechEnd(AUDIO, 0, 1000, 1600))
    await settle(conv)
    assert [s.text for s in host.scheduled] == ["Hello, my friend.", "Nice to meet you today."]
    clock.advance(0.1)  # the first segment starts playing 100 ms after it was scheduled
    conv.on_playout(host.scheduled[0].tag)
    metrics = host.events[-1]
    assert metrics["type"] == "metrics" and metrics["source"] == "voice"
    assert metrics["vad_end_ms"] == 600.0
    assert metrics["stt_ms"] == 420.0
    assert metrics["llm_first_token_ms"] == 250.0
    assert metrics["tts_first_audio_ms"] == 0.0 and metrics["lipsync_first_frame_ms"] == 0.0
    # from the end of the voice: 600 ms of end silence + 420 + 250 + 100
    assert metrics["voice_to_voice_ms"] == 1370.0
    await conv.aclose()


# --- the voice fades at a likely barge-in -------------------------------------------------
@pytest.mark.asyncio
async def test_a_sound_over_the_avatar_fades_its_voice_and_a_blip_brings_it_back():
    conv, host, *_ = make()
    host.playing_now = True
    conv._on_vad_event(SpeechOnset(0, 96))
    assert host.ducks == [True] and conv.ducks == 1 and host.cuts == 0
    conv._on_vad_event(SpeechBlip(0, 128))  # not speech: the voice comes back, nothing cut
    assert host.ducks == [True, False] and conv.ducks_released == 1
    assert host.cuts == 0 and conv.barge_ins == 0
    conv._on_vad_event(SpeechBlip(0, 160))  # a second blip changes nothing
    assert host.ducks == [True, False]
    await conv.aclose()


@pytest.mark.asyncio
async def test_speech_after_the_fade_is_a_barge_in_and_the_fade_ends():
    conv, host, *_ = make()
    host.playing_now = True
    conv._on_vad_event(SpeechOnset(0, 96))
    conv._on_vad_event(SpeechStart(0, 256))
    assert conv.barge_ins == 1 and host.cuts == 1
    assert host.ducks == [True, False] and conv.ducks_released == 0
    await conv.aclose()


@pytest.mark.asyncio
async def test_nothing_fades_when_the_avatar_is_silent_or_barge_in_is_off():
    conv, host, *_ = make()
    conv._on_vad_event(SpeechOnset(0, 96))
    conv._on_vad_event(SpeechBlip(0, 128))
    assert getattr(host, "ducks", []) == [] and conv.ducks == 0
    await conv.aclose()
    settings = load_settings(env={}, overrides={"conversation.barge_in": False})
    conv2, host2, *_ = make()
    conv2._settings = settings
    host2.playing_now = True
    conv2._on_vad_event(SpeechOnset(0, 96))
    assert getattr(host2, "ducks", []) == []
    await conv2.aclose()


@pytest.mark.asyncio
async def test_a_second_likely_start_while_faded_changes_nothing():
    conv, host, *_ = make()
    host.playing_now = True
    conv._on_vad_event(SpeechOnset(0, 96))
    conv._on_vad_event(SpeechOnset(200, 296))  # the VAD told a new run before settling
    assert host.ducks == [True] and conv.ducks == 1
    await conv.aclose()
