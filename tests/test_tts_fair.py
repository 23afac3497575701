"""Bounded synthesis units and the fair synthesis thread (issue 26, defect 1).

Order is made deterministic with a fake Piper voice whose synthesis blocks until the test
lets it go, and with "plug" jobs that hold the synthesis thread; the tests count and order
synthesis runs, they time nothing.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.speech_units import MAX_UNIT_CHARS, speech_units
from pipeline.tts import PiperTTS, SpeechAudio, _ArenaSession, speech_stream
from pipeline.tts_scheduler import SynthesisScheduler

GUARD_S = 60  # a hang guard only: every wait below ends as soon as its event happens

WORDS = "the quick brown fox jumps over a lazy dog while seven purple monkeys dance".split()


def no_punctuation(chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    text = ""
    while len(text) < chars:
        text += WORDS[int(rng.integers(len(WORDS)))] + " "
    return text[:chars].rstrip()


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


# --- splitting -----------------------------------------------------------------------------


def test_units_are_sentences_when_sentences_are_short():
    text = "Hello there. Dr. Smith paid 3.50 dollars, e.g. on Monday! Did he? Yes… Then (gone)."
    assert speech_units(text) == [
        "Hello there.",
        "Dr. Smith paid 3.50 dollars, e.g. on Monday!",
        "Did he?",
        "Yes…",
        "Then (gone).",
    ]


def test_a_long_sentence_is_cut_after_its_clauses():
    clause = "we walked along the river for a while"  # 37 characters
    text = ", ".join([clause] * 12) + "; and then we went home."
    units = speech_units(text)
    assert len(units) > 1
    assert all(len(u) <= MAX_UNIT_CHARS for u in units)
    assert all(u.endswith(",") for u in units[:-1])  # cut at commas, not inside a clause
    assert squash("".join(units)) == squash(text)


def test_a_text_without_punctuation_is_cut_between_words():
    text = no_punctuation(5000)
    units = speech_units(text)
    assert len(units) >= 5000 // MAX_UNIT_CHARS
    assert all(len(u) <= MAX_UNIT_CHARS for u in units)
    assert all(w in WORDS for u in units for w in u.split())  # no word cut in two
    assert " ".join(units) == text


def test_only_a_word_longer_than_the_bound_is_cut_inside():
    word = "x" * 450
    assert speech_units(f"a {word} b") == ["a", "x" * 200, "x" * 200, "x" * 50 + " b"]


def test_numbers_and_times_are_no_clause_breaks():
    text = "it cost 1,000 dollars at 10:30 " + "and more words " * 20
    units = speech_units(text, max_chars=40)
    assert all(len(u) <= 40 for u in units)
    assert not any(u.endswith(("1,", "10:")) for u in units)
    assert " ".join(units) == text.strip()


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("abc xyzAB.,;:!?…—\n\t\"')1 ")), max_size=1500
    ),
    st.integers(min_value=1, max_value=300),
)
def test_units_are_bounded_and_lose_no_text(text: str, bound: int):
    units = speech_units(text, max_chars=bound)
    assert all(0 < len(u) <= bound for u in units)
    assert all(u == u.strip() for u in units)
    assert squash("".join(units)) == squash(text)


# --- a fake voice whose synthesis the test controls ------------------------------------------


@dataclass
class Chunk:
    sample_rate: int
    audio_int16_array: np.ndarray
    phoneme_alignments: Any = None


class GatedVoice:
    """Stands in for ``PiperVoice``: records each text it is handed, and with a gate,
    blocks each synthesis until the test releases it."""

    def __init__(self, *, gated: bool = False) -> None:
        self.calls: list[str] = []
        self.gate = threading.Semaphore(0) if gated else None
        self.entered = threading.Semaphore(0)

    def synthesize(self, text: str, syn_config: Any = None,
                   include_alignments: bool = False) -> Iterator[Chunk]:
        self.calls.append(text)
        self.entered.release()
        if self.gate is not None:
            assert self.gate.acquire(timeout=GUARD_S), "the test never released the voice"
        yield Chunk(sample_rate=22050, audio_int16_array=np.full(220, 1000, np.int16))


def fake_tts(voice: GatedVoice, max_unit_chars: int = MAX_UNIT_CHARS) -> PiperTTS:
    tts = PiperTTS(sample_rate=22050, max_unit_chars=max_unit_chars)
    tts._voice = voice
    return tts


def plug(scheduler: SynthesisScheduler) -> tuple[threading.Event, Future[Any]]:
    """Hold the synthesis thread with a job of the test's own until the event is set."""
    release = threading.Event()
    running = threading.Event()

    def hold() -> None:
        running.set()
        release.wait(GUARD_S)

    fut = scheduler.submit(hold, owner="plug")
    assert running.wait(GUARD_S)
    return release, fut


async def until(predicate: Any) -> None:
    """Let the loop run until ``predicate()`` holds (other threads may be needed for it)."""
    for _ in range(100_000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def drain(tts: PiperTTS) -> None:
    """Wait until the synthesis thread has finished everything queued before now."""
    await asyncio.wrap_future(tts.scheduler.submit(lambda: None, owner="drain"))


async def consume(stream: Any, into: list[SpeechAudio]) -> None:
    async for audio in stream:
        into.append(audio)


# --- the scheduler --------------------------------------------------------------------------


def test_a_single_job_waits_behind_at_most_one_of_twenty_queued():
    scheduler = SynthesisScheduler()
    order: list[str] = []
    gate, started = threading.Semaphore(0), threading.Semaphore(0)

    def unit(name: str) -> None:  # one unit of synthesis, held until the test lets it end
        order.append(name)
        started.release()
        assert gate.acquire(timeout=GUARD_S)

    a_jobs = [scheduler.submit(unit, f"A{i}", owner="A") for i in range(20)]
    assert started.acquire(timeout=GUARD_S)  # A0 runs; A1..A19 wait
    b_job = scheduler.submit(unit, "B", owner="B")
    for _ in range(21):
        gate.release()
    b_job.result(GUARD_S)
    for f in a_jobs:
        f.result(GUARD_S)
    scheduler.close()
    assert order.index("B") <= 1  # at most the one of A's that was running when B came
    assert [x for x in order if x != "B"] == [f"A{i}" for i in range(20)]  # A's in order


def test_owners_take_turns_whatever_they_queued():
    scheduler = SynthesisScheduler()
    order: list[str] = []
    release, held = plug(scheduler)
    futs = [scheduler.submit(order.append, f"{o}{i}", owner=o) for o in "ABC" for i in range(3)]
    release.set()
    for f in futs:
        f.result(GUARD_S)
    scheduler.close()
    assert order == ["A0", "B0", "C0", "A1", "B1", "C1", "A2", "B2", "C2"]


def test_live_jobs_go_before_render_jobs():
    scheduler = SynthesisScheduler()
    order: list[str] = []
    release, held = plug(scheduler)
    renders = [scheduler.submit(order.append, f"R{i}", owner="job", live=False) for i in range(3)]
    lives = [scheduler.submit(order.append, f"L{i}", owner=o) for i, o in enumerate("xy")]
    release.set()
    for f in renders + lives:
        f.result(GUARD_S)
    scheduler.close()
    assert order == ["L0", "L1", "R0", "R1", "R2"]


def test_dropped_and_cancelled_jobs_never_run():
    scheduler = SynthesisScheduler()
    order: list[str] = []
    release, held = plug(scheduler)
    a = [scheduler.submit(order.append, f"A{i}", owner="A") for i in range(5)]
    b = [scheduler.submit(order.append, f"B{i}", owner="B") for i in range(2)]
    assert scheduler.drop("A") == 5
    assert b[0].cancel()
    release.set()
    b[1].result(GUARD_S)
    scheduler.close()
    assert order == ["B1"]
    assert all(f.cancelled() for f in a)


def test_the_idle_hook_runs_once_after_each_burst_of_work():
    order: list[str] = []
    idle = threading.Semaphore(0)

    def on_idle() -> None:
        order.append("idle")
        idle.release()

    scheduler = SynthesisScheduler(on_idle=on_idle, idle_s=0.001)
    for burst in ("first", "second"):
        futs = [scheduler.submit(order.append, f"{burst}{i}", owner="A") for i in range(2)]
        for f in futs:
            f.result(GUARD_S)
        assert idle.acquire(timeout=GUARD_S)
    scheduler.close()
    assert order == ["first0", "first1", "idle", "second0", "second1", "idle"]


# --- PiperTTS through the scheduler ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_short_say_waits_for_at_most_one_unit_of_a_long_one():
    voice = GatedVoice(gated=True)
    tts = fake_tts(voice)
    long_text = no_punctuation(4000)
    a_units = tts.units(long_text)
    assert len(a_units) >= 20
    a_out: list[SpeechAudio] = []
    b_out: list[SpeechAudio] = []
    a = asyncio.create_task(consume(tts.sentences(long_text, owner="A"), a_out))
    await asyncio.to_thread(voice.entered.acquire, timeout=GUARD_S)  # A's first unit runs
    b = asyncio.create_task(consume(tts.sentences("Short.", owner="B"), b_out))
    await until(lambda: tts.scheduler.pending("B") == 1)
    while not b.done():
        voice.gate.release()  # type: ignore[union-attr]
        await asyncio.to_thread(voice.entered.acquire, timeout=GUARD_S)
    for _ in a_units:
        voice.gate.release()  # type: ignore[union-attr]
    await a
    assert voice.calls[:2] == [a_units[0], "Short."]
    assert [x.text for x in b_out] == ["Short."]
    assert [x.text for x in a_out] == a_units  # A's text whole, in order, in bounded units


@pytest.mark.asyncio
async def test_a_call_goes_before_a_render_that_came_first():
    voice = GatedVoice()
    tts = fake_tts(voice)
    release, held = plug(tts.scheduler)
    render_text = "One. Two. Three."
    render: list[SpeechAudio] = []
    live: list[SpeechAudio] = []
    r = asyncio.create_task(consume(tts.sentences(render_text, owner="job", live=False), render))
    await until(lambda: tts.scheduler.pending("job") == 1)
    c = asyncio.create_task(consume(tts.sentences("Hello.", owner="call"), live))
    await until(lambda: tts.scheduler.pending("call") == 1)
    release.set()
    await asyncio.gather(r, c)
    assert voice.calls == ["Hello.", "One.", "Two.", "Three."]


def test_a_render_on_its_own_event_loop_waits_for_the_call():
    """Renders run ``asyncio.run`` in their own threads; the calls run on the server's."""
    voice = GatedVoice()
    tts = fake_tts(voice)
    release, held = plug(tts.scheduler)
    render: list[SpeechAudio] = []
    queued = threading.Event()

    def render_thread() -> None:
        async def main() -> None:
            stream = tts.sentences("Render one. Render two.", owner="job", live=False)
            task = asyncio.create_task(consume(stream, render))
            await until(lambda: tts.scheduler.pending("job") == 1)
            queued.set()
            await task

        asyncio.run(main())

    thread = threading.Thread(target=render_thread)
    thread.start()
    assert queued.wait(GUARD_S)

    async def call() -> list[SpeechAudio]:
        out: list[SpeechAudio] = []
        task = asyncio.create_task(consume(tts.sentences("Live.", owner="call"), out))
        await until(lambda: tts.scheduler.pending("call") == 1)
        release.set()
        await task
        return out

    live = asyncio.run(call())
    thread.join(GUARD_S)
    assert [x.text for x in live] == ["Live."]
    assert [x.text for x in render] == ["Render one.", "Render two."]
    assert voice.calls == ["Live.", "Render one.", "Render two."]


@pytest.mark.asyncio
async def test_cancelling_the_consumer_drops_its_pending_units():
    voice = GatedVoice(gated=True)
    tts = fake_tts(voice)
    text = no_punctuation(4000)
    units = tts.units(text)
    out: list[SpeechAudio] = []
    task = asyncio.create_task(consume(tts.sentences(text, owner="A"), out))
    voice.gate.release()  # type: ignore[union-attr]  # the first unit
    await until(lambda: len(out) == 1)
    await asyncio.to_thread(voice.entered.acquire, timeout=GUARD_S)  # its own first unit
    await asyncio.to_thread(voice.entered.acquire, timeout=GUARD_S)  # the second, running
    task.cancel()  # an interrupt while the second unit is being made
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(len(units)):
        voice.gate.release()  # type: ignore[union-attr]  # would let every unit through
    await drain(tts)
    assert voice.calls == units[:2]  # the running unit ends; none of the 18 others is made
    assert tts.scheduler.pending() == 0


@pytest.mark.asyncio
async def test_a_consumer_cancelled_while_queued_costs_no_synthesis():
    voice = GatedVoice()
    tts = fake_tts(voice)
    release, held = plug(tts.scheduler)
    task = asyncio.create_task(consume(tts.sentences(no_punctuation(2000), owner="A"), []))
    await until(lambda: tts.scheduler.pending("A") == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tts.scheduler.pending("A") == 0
    release.set()
    await drain(tts)
    assert voice.calls == []


@pytest.mark.asyncio
async def test_closing_the_stream_stops_synthesis():
    voice = GatedVoice()
    tts = fake_tts(voice)
    text = no_punctuation(2000)
    stream = tts.sentences(text, owner="A")
    first = await stream.__anext__()
    await stream.aclose()
    await drain(tts)
    assert first.text == tts.units(text)[0]
    assert voice.calls == [first.text]


@pytest.mark.asyncio
async def test_speech_stream_passes_only_the_keywords_a_voice_takes():
    from tests.fakes.tts import ToneTTS

    class TextOnly(ToneTTS):
        async def sentences(self, text: str):  # type: ignore[override]
            async for audio in super().sentences(text):
                yield audio

    tone, plain = ToneTTS(), TextOnly()
    assert len([a async for a in speech_stream(tone, "Hi there.", owner="s1", live=False)]) == 1
    assert len([a async for a in speech_stream(plain, "Hi there.", owner="s1")]) == 1
    assert tone.owners == [("s1", False)]
    assert plain.owners == [(None, True)]  # called with the text alone


# --- the real voice ---------------------------------------------------------------------------


class CountingVoice:
    def __init__(self, voice: Any) -> None:
        self.voice = voice
        self.calls: list[str] = []

    def synthesize(self, text: str, **kw: Any) -> Iterator[Any]:
        self.calls.append(text)
        return self.voice.synthesize(text, **kw)


@pytest.mark.asyncio
async def test_the_bundled_voice_speaks_a_long_unpunctuated_text_in_bounded_units():
    tts = PiperTTS()
    await tts.aload()
    session = tts._voice.session
    assert isinstance(session, _ArenaSession)
    await asyncio.wrap_future(tts.scheduler.submit(tts.release_memory, owner="t"))
    assert not session.shrink  # one shrinking run, then back to plain runs
    voice = CountingVoice(tts._voice)
    tts._voice = voice
    text = no_punctuation(2000)
    units = tts.units(text)
    assert len(units) >= 10
    stream = tts.sentences(text, owner="A")
    got = [await stream.__anext__() for _ in range(3)]  # a few units keep the test short
    await stream.aclose()
    await drain(tts)
    tts.close()
    assert [a.text for a in got] == units[:3]
    assert all(len(a.text) <= MAX_UNIT_CHARS for a in got)
    assert all(len(a.pcm) > tts.sample_rate and a.phonemes for a in got)  # >1 s of speech
    assert voice.calls == units[:3]  # the rest of the text was never handed to Piper


# --- the callers say whose synthesis it is ------------------------------------------------


@pytest.mark.asyncio
async def test_a_session_say_is_live_synthesis_of_that_session(tmp_path):
    from pathlib import Path

    from config import load_settings
    from face.library import AvatarLibrary
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from rtc_server.session import Session
    from tests.fakes.tts import ToneTTS

    settings_ = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "conversation.listen": False,
        "media.video_width": 256, "media.video_height": 256,
        "avatars.data_dir": str(tmp_path / "data"),
    })
    avatar = AvatarLibrary(data_dir=Path("data"), width=256, height=256).get("default")
    tone = ToneTTS()
    session = Session(settings=settings_, avatar=avatar, tts=tone, lipsync=VisemeEngine(),
                      render_executor=None, on_closed=lambda s: None)
    try:
        await session._speak("Hello there.")
    finally:
        await session.aclose("test over")
    assert tone.owners == [(session.id, True)]


@pytest.mark.asyncio
async def test_a_conversation_reply_is_live_synthesis_of_its_session():
    from tests.test_conversation import make, settle

    conv, host, *_ = make()
    conv.chat("What is your name?")
    await settle(conv)
    await conv.aclose()
    tone = conv.speaker.tts
    assert tone.requests  # type: ignore[attr-defined]
    assert set(tone.owners) == {(host.id, True)}  # type: ignore[attr-defined]


def test_a_render_is_render_class_synthesis_of_its_own():
    import threading as th

    from config import load_settings
    from pipeline.lipsync.viseme_engine import VisemeEngine
    from pipeline.render.core import ClipRenderer, _Reporter
    from pipeline.render.spec import RenderSpec
    from tests.fakes.tts import ToneTTS

    tone = ToneTTS()
    clips = ClipRenderer(load_settings(env={}), library=None,  # type: ignore[arg-type]
                         lipsync=VisemeEngine(), tts=tone)
    spec = RenderSpec(avatar_id="default", text="One two. Three.", audio_path=None,
                      voice="default", speed=1.0, format="mp4", fps=25, cache_key="k")
    reports = [_Reporter(lambda p, s: None, th.Event()) for _ in range(2)]
    try:
        for report in reports:
            assert len(asyncio.run(clips._synthesise(spec, report))) == 2
    finally:
        clips.close()
    (first, live1), (second, live2) = tone.owners
    assert first is not None and second is not None and first != second  # one per render
    assert live1 is live2 is False
