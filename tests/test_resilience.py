"""Failures inside one call never end it nor touch other calls.

- A lip-sync engine that raises (in ``render`` or in ``analyse``): one error event
  (stage lipsync, not fatal) and that session goes on with the viseme engine; every frame is
  still produced (the failed one by the fallback, for the same plan); a second session on the
  same server keeps its engine and its frame rate.
- A failed reply (an error, a timeout): the error event, then the apology is spoken through
  the normal voice and lip-sync path. A sentence that fails to synthesise: an error event and
  the next sentence. A failed transcription: an error event and listening goes on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config import load_settings
from face.library import AvatarLibrary
from media_tracks.compositor import FramePlan
from pipeline.lipsync import SessionLipSync
from pipeline.lipsync.viseme_engine import VisemeEngine
from pipeline.lipsync.visemes import VisemeTrack
from pipeline.lipsync.wav2lip_io import MelTrack, mel_track
from pipeline.replier import OpenAIReplier, ReplyError
from pipeline.speaking import Speaker
from pipeline.stt import Transcript
from pipeline.tts import SpeechAudio
from pipeline.vad import SpeechEnd, SpeechStart
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.conversation import Conversation
from rtc_server.ice import use_host_candidates
from rtc_server.protocol import Event
from rtc_server.services import SERVICES
from rtc_server.session import Session
from tests.fakes.openai_server import start_fake_openai
from tests.fakes.peer import offer_sdp, wait_until
from tests.fakes.tts import ToneTTS

APOLOGY = "Sorry, I could not answer that just now."


# ------------------------------------------------------------------ a lip-sync engine that breaks


class BrokenModel(RuntimeError):
    pass


class _FailingRenderer:
    def __init__(self, inner: Any, engine: FlakyEngine) -> None:
        self._inner = inner
        self._engine = engine

    async def render(self, plan: FramePlan) -> Any:
        if plan.lips is not None and plan.blend > 0:
            self._engine.render_failures += 1
            raise BrokenModel("CUDA error: an illegal memory access was encountered")
        return await self._inner.render(plan)


class FlakyEngine:
    """A Wav2Lip stand-in: Wav2Lip's own per-frame mel features (no model needed), frames
    drawn by the viseme renderer. The renderers numbered in ``fail_renderers`` (0 = the first
    one made, i.e. the first session) raise on every speaking frame, as a model that breaks
    inside one call; ``fail_analyse`` makes analysis raise."""

    name = "flaky-wav2lip"
    frame_group = 1
    render_lead_ms = None
    schedule_lead_ms = None

    def __init__(self, *, fail_renderers: frozenset[int] = frozenset(),
                 fail_analyse: bool = False) -> None:
        self._viseme = VisemeEngine()
        self._fail_renderers = fail_renderers
        self.fail_analyse = fail_analyse
        self.renderers_made = 0
        self.render_failures = 0
        self.analyse_failures = 0

    def info(self) -> dict[str, object]:
        return {"engine": self.name, "device": "cpu"}

    def analyse(self, audio: SpeechAudio, *, fps: int) -> MelTrack:
        if self.fail_analyse:
            self.analyse_failures += 1
            raise BrokenModel("mel extraction failed")
        return mel_track(audio.pcm, audio.sample_rate, fps)

    def renderer(self, avatar: Any, timeline: Any, *, width: int, height: int,
                 executor: Any) -> Any:
        inner = self._viseme.renderer(avatar, timeline, width=width, height=height,
                                      executor=executor)
        n, self.renderers_made = self.renderers_made, self.renderers_made + 1
        return _FailingRenderer(inner, self) if n in self._fail_renderers else inner

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def avatar():
    return AvatarLibrary(data_dir=Path("data"), width=256, height=256).get("default")


def speech(seconds: float = 0.6) -> SpeechAudio:
    t = np.arange(int(48000 * seconds)) / 48000
    pcm = (np.sin(2 * np.pi * 220 * t) * 12000).astype(np.int16)
    return SpeechAudio(text="hello", pcm=pcm, sample_rate=48000)


def test_analyse_failure_switches_to_the_fallback_once():
    failures: list[tuple[str, BaseException]] = []
    guard = SessionLipSync(FlakyEngine(fail_analyse=True), VisemeEngine(),
                           on_failure=lambda where, exc: failures.append((where, exc)))
    track = guard.analyse(speech(), fps=25)
    assert isinstance(track, VisemeTrack) and track.n_frames == 15
    assert guard.name == "viseme"
    guard.analyse(speech(), fps=25)
    assert [w for w, _ in failures] == ["analyse"]
    assert isinstance(failures[0][1], BrokenModel)


def test_without_a_fallback_the_error_propagates():
    guard = SessionLipSync(FlakyEngine(fail_analyse=True), None,
                           on_failure=lambda *_: pytest.fail("no fallback to switch to"))
    with pytest.raises(BrokenModel):
        guard.analyse(speech(), fps=25)
    assert guard.name == "flaky-wav2lip"


async def test_a_failed_frame_is_the_fallbacks_frame_for_the_same_plan(avatar):
    engine = FlakyEngine(fail_renderers=frozenset({0}))
    failures: list[str] = []
    guard = SessionLipSync(engine, VisemeEngine(),
                           on_failure=lambda where, exc: failures.append(where))
    timeline = avatar.new_timeline()
    renderer = guard.renderer(avatar, timeline, width=256, height=256, executor=None)
    reference = VisemeEngine().renderer(avatar, timeline, width=256, height=256, executor=None)
    lips = mel_track(speech().pcm, 48000, 25)
    idle = FramePlan(index=3, t_ns=120_000_000)
    speaking = FramePlan(index=4, t_ns=160_000_000, mouth=0.7, blend=1.0, segment_id=1,
                         lips=lips.at(0))
    assert np.array_equal(await renderer.render(idle), await reference.render(idle))
    assert failures == []
    frame = await renderer.render(speaking)  # the primary raises: the fallback draws it
    assert failures == ["render"] and engine.render_failures == 1
    assert np.array_equal(frame, await reference.render(speaking))
    # the mouth is open on that frame (the fallback reads the level of another engine's
    # feature), not an idle face
    assert not np.array_equal(frame, await reference.render(
        FramePlan(index=4, t_ns=160_000_000)))
    await renderer.render(speaking)
    assert engine.render_failures == 1, "after the switch the primary is not asked again"
    assert failures == ["render"]


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_broken_engine_in_one_call_falls_back_and_the_other_call_is_untouched(
    loopback_only, aiohttp_client, caplog
):
    use_host_candidates("loopback")
    engine = FlakyEngine(fail_renderers=frozenset({0}))
    settings = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "conversation.listen": False,
        "media.video_width": 256, "media.video_height": 256,
    })
    app = create_app(settings, tts=ToneTTS(), lipsync=engine)
    client = await aiohttp_client(app)
    url = str(client.make_url("")).rstrip("/")
    broken, other = Bot(url), Bot(url)
    try:
        for bot in (broken, other):  # the first session gets the failing renderer
            await bot.connect()
            await bot.wait_first_video(15)
        a = app[SERVICES].sessions[broken.session_id]
        b = app[SERVICES].sessions[other.session_id]
        watched = b.video_track.stats
        await asyncio.sleep(1.0)
        caplog.set_level(logging.ERROR, logger="media_tracks.frames")
        t0, sent0, skipped0 = time.monotonic(), watched.frames_sent, watched.frames_skipped
        rendered0 = a.frames.stats.rendered
        broken.send({"type": "say", "text": "Hello there. This call goes on."})
        other.send({"type": "say", "text": "Hello there. This call goes on."})
        error = await broken.wait_event(lambda e: e.get("type") == "error", 20)
        assert error["stage"] == "lipsync" and error["fatal"] is False
        assert "viseme" in error["message"]
        await broken.wait_event(lambda e: e.get("state") == "speaking", 20)
        await broken.wait_event(lambda e: e.get("state") == "listening", 30)
        await other.wait_event(lambda e: e.get("state") == "listening", 30)
        await asyncio.sleep(0.5)
        t1, sent1 = time.monotonic(), watched.frames_sent
        assert engine.render_failures >= 1
        # the broken call: one error, viseme from now on, every frame produced (none failed
        # to render: a failed frame was drawn by the fallback)
        assert [e for e in broken.events if e.get("type") == "error"] == [error]
        assert a.lipsync.name == "viseme"
        assert (await broken.server_session())["lipsync"] == "viseme"
        assert a.frames.stats.rendered > rendered0
        assert not [r for r in caplog.records if "rendering frame" in r.getMessage()]
        # and it goes on speaking
        sent_at = time.monotonic() - broken.t0
        broken.send({"type": "say", "text": "Still here."})
        await broken.wait_event(
            lambda e: e.get("state") == "speaking" and e["_t"] >= sent_at, 20
        )
        # the other call: its own engine, no error, its frame rate on the server held
        assert b.lipsync.name == "flaky-wav2lip"
        assert not [e for e in other.events if e.get("type") == "error"]
        fps = (sent1 - sent0) / (t1 - t0)
        assert t1 - t0 > 1.0 and fps >= 24, (fps, t1 - t0)
        assert watched.frames_skipped == skipped0
        assert len(app[SERVICES].sessions) == 2
    finally:
        await broken.aclose()
        await other.aclose()


# ------------------------------------------------------------------ the conversation's failures


class Host:
    id = "resilience-test"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.scheduled: list[Any] = []

    def send_event(self, event: Event) -> None:
        self.events.append(event.to_wire())

    def schedule(self, segment: Any) -> None:
        self.scheduled.append(segment)

    def interrupt(self) -> None:
        pass

    @property
    def playing(self) -> bool:
        return False

    def duck(self, on: bool) -> None:
        pass

    async def wait_for_speech_room(self) -> None:
        return None


class ScriptedReplier:
    """Answers with ``answer`` or raises ``error`` (after a first delta when ``partial``)."""

    name = "scripted"

    def __init__(self, answer: str = "", error: BaseException | None = None) -> None:
        self.answer = answer
        self.error = error

    async def reply(self, history: Sequence[Any], text: str, *,
                    language: str = "en") -> AsyncIterator[str]:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        for word in self.answer.split(" "):
            yield word + " "

    async def aclose(self) -> None:
        """Nothing to release."""


class FailingTTS(ToneTTS):
    """The tone voice, failing on any sentence that contains ``bad``."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    async def sentences(self, text: str) -> AsyncIterator[SpeechAudio]:
        if self.bad in text:
            raise RuntimeError("voice model crashed")
        async for audio in super().sentences(text):
            yield audio


class FlakySTT:
    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.calls = 0

    async def transcribe(self, audio16k: np.ndarray) -> Transcript:
        self.calls += 1
        await asyncio.sleep(0)
        if self.calls <= self.fail_first:
            raise RuntimeError("whisper crashed")
        return Transcript("what time is it", "en", 1.0, len(audio16k) / 16000, 0.0)


class Mic:
    time_ms = 0


def conversation(replier: Any, *, tts: Any = None, stt: Any = None,
                 apology: str | None = APOLOGY,
                 lipsync: Any = None) -> tuple[Conversation, Host]:
    settings = load_settings(env={}, overrides={"conversation.apology": apology,
                                                "conversation.preemptive": False})
    host = Host()
    speaker = Speaker(tts or ToneTTS(), lipsync or VisemeEngine(), fps=settings.media.fps,
                      owner=host.id, executor=None)
    conv = Conversation(host, settings=settings, speaker=speaker, replier=replier, stt=stt,
                        listener=Mic() if stt else None, resampler=None)
    return conv, host


async def settle() -> None:
    for _ in range(100):
        await asyncio.sleep(0)
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if tasks:
        await asyncio.wait(tasks, timeout=10)


def spoken(host: Host) -> list[str]:
    return [s.text for s in host.scheduled if s.text]


def errors(host: Host) -> list[dict[str, Any]]:
    return [e for e in host.events if e["type"] == "error"]


@pytest.mark.parametrize("error", [
    ReplyError("the language model answered 503", retryable=True, status=503),
    ValueError("a bug in the replier"),
    TimeoutError(),
])
async def test_a_failed_reply_is_an_error_and_a_spoken_apology(error):
    conv, host = conversation(ScriptedReplier(error=error))
    conv.chat("hello")
    await settle()
    (err,) = errors(host)
    assert err["stage"] == "llm" and err["fatal"] is False and err["message"]
    assert spoken(host) == [APOLOGY]
    assert conv.history == []  # the apology is not part of the conversation
    await conv.aclose()


async def test_an_empty_apology_says_nothing_but_still_reports():
    conv, host = conversation(ScriptedReplier(error=ValueError("down")), apology=None)
    conv.chat("hello")
    await settle()
    assert len(errors(host)) == 1 and host.scheduled == []
    assert host.events[-1] == {"type": "state", "state": "listening"}
    await conv.aclose()


async def test_a_reply_that_times_out_upstream_is_apologised_for(loopback_only):
    url, state, close = await start_fake_openai([("hang", 30)])
    replier = OpenAIReplier(base_url=url, api_key="sk-test", model="m", system_prompt="s",
                            first_token_timeout_s=0.2, max_retries=0)
    try:
        conv, host = conversation(replier)
        conv.chat("hello")
        await wait_until(lambda: spoken(host), 20)
        (err,) = errors(host)
        assert err["stage"] == "llm" and "first token" in err["message"]
        assert spoken(host) == [APOLOGY]
        await conv.aclose()
    finally:
        await replier.aclose()
        await close()


async def test_a_sentence_that_fails_to_synthesise_is_skipped_and_the_turn_goes_on():
    conv, host = conversation(
        ScriptedReplier("This is the first sentence of the answer. Now comes a broken "
                        "sentence here. And this is the third sentence."),
        tts=FailingTTS("broken"),
    )
    conv.chat("hello")
    await settle()
    (err,) = errors(host)
    assert err["stage"] == "tts" and err["fatal"] is False
    assert spoken(host) == ["This is the first sentence of the answer.",
                            "And this is the third sentence."]
    await conv.aclose()


async def test_a_failed_transcription_is_reported_and_listening_goes_on():
    stt = FlakySTT(fail_first=1)
    conv, host = conversation(ScriptedReplier("It is noon."), stt=stt)
    audio = np.zeros(16000, np.float32)
    conv._on_vad_event(SpeechStart(0, 250))
    conv._on_vad_event(SpeechEnd(audio, 0, 1000, 1600))
    await settle()
    (err,) = errors(host)
    assert err["stage"] == "stt" and err["fatal"] is False
    assert host.events[-1] == {"type": "state", "state": "listening"}
    assert host.scheduled == []
    conv._on_vad_event(SpeechStart(2000, 2250))
    conv._on_vad_event(SpeechEnd(audio, 2000, 3000, 3600))
    await settle()
    assert stt.calls == 2
    assert [e["text"] for e in host.events if e["type"] == "transcript"] == ["what time is it"]
    assert spoken(host) == ["It is noon."]
    await conv.aclose()


async def test_an_analysis_failure_in_a_turn_falls_back_and_the_turn_is_spoken():
    failures: list[str] = []
    guard = SessionLipSync(FlakyEngine(fail_analyse=True), VisemeEngine(),
                           on_failure=lambda where, exc: failures.append(where))
    conv, host = conversation(ScriptedReplier("One sentence. And another."), lipsync=guard)
    conv.chat("hello")
    await settle()
    assert failures == ["analyse"]
    assert errors(host) == []  # the session reports the switch (its on_failure), not a TTS error
    assert spoken(host) == ["One sentence.", "And another."]
    assert all(isinstance(s.lips, VisemeTrack) for s in host.scheduled)
    await conv.aclose()


# ------------------------------------------------------------------ bad input from a client


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_offers_aiortc_cannot_answer_are_400_and_leave_no_session(loopback_only,
                                                                        aiohttp_client):
    """Found by the fault tests: no DTLS fingerprint (aiortc accepted it and failed later in
    a task nobody awaited) and an a=mid it cannot match (an AttributeError: a 500)."""
    use_host_candidates("loopback")
    app = create_app(load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "conversation.listen": False,
    }), tts=ToneTTS())
    client = await aiohttp_client(app)
    pc, sdp = await offer_sdp()
    no_fingerprint = "".join(ln for ln in sdp.splitlines(True)
                             if not ln.startswith("a=fingerprint"))
    try:
        for bad in (no_fingerprint, sdp.replace("a=mid:0", "a=mid:" + "m" * 300),
                    sdp.replace("a=mid:0", "a=mid:a\x00b")):
            r = await client.post("/offer", json={"sdp": bad, "type": "offer"})
            assert r.status == 400
            body = await r.json()
            assert body["error"] == "bad_request" and body["detail"]
            assert "NoneType" not in body["detail"]
            assert app[SERVICES].sessions == {}
    finally:
        await pc.close()


async def test_json_nested_too_deep_on_the_control_channel_is_an_error_event(avatar):
    session = Session(
        settings=load_settings(env={}, overrides={"conversation.listen": False}),
        avatar=avatar, tts=ToneTTS(), lipsync=VisemeEngine(), render_executor=None,
        on_closed=lambda s: None,
    )
    events: list[dict[str, object]] = []
    session.send_event = lambda e: events.append(e.to_wire())  # type: ignore[method-assign]
    session._on_message("[" * 100_000 + "]" * 100_000)
    assert [e["type"] for e in events] == ["error"]
    await session.aclose("test over")
