"""The spoken conversation end to end, over real peer connections on loopback: the bot speaks
a question synthesised with Piper into its microphone and hears the answer; the LLM path runs
against a local OpenAI-compatible server with failures to retry (and one not to); barge-in;
bad inputs on the data channel."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest

from config import load_settings
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.openai_server import start_fake_openai
from tests.fakes.speech import piper_speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


async def start(aiohttp_client, **overrides):
    use_host_candidates("loopback")
    base = {"webrtc.host_candidates": "loopback", "sessions.max_concurrent": 4}
    base.update(overrides)
    app = create_app(load_settings(env={}, overrides=base))
    client = await aiohttp_client(app)
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(15)
    return app, client, bot


def kinds(bot: Bot) -> list[str]:
    out = []
    for e in bot.events:
        if e.get("type") == "state":
            out.append(e["state"])
        elif e.get("type") in ("transcript", "metrics"):
            out.append(f"{e['type']}:{e.get('role', '')}")
    return out


async def test_spoken_question_gets_a_spoken_answer(loopback_only, aiohttp_client):
    app, _, bot = await start(aiohttp_client)
    question = piper_speech("Hello! What is your name?", sample_rate=48000)
    await asyncio.sleep(0.5)
    bot.mic.play(question, 48000)
    user = await bot.wait_event(
        lambda e: e.get("type") == "transcript" and e.get("role") == "user", 30
    )
    heard = words(user["text"])
    assert {"what", "your", "name"} <= set(heard), user
    reply = await bot.wait_event(
        lambda e: e.get("type") == "transcript" and e.get("role") == "assistant", 20
    )
    metrics = await bot.wait_event(lambda e: e.get("type") == "metrics", 20)
    await bot.wait_event(lambda e: e.get("state") == "listening" and e["_t"] > reply["_t"], 20)
    # the embedded persona says who it is
    assert "avatar" in reply["text"].lower()
    # states in order: thinking (transcribing, replying), speaking, back to listening
    seq = kinds(bot)
    t = seq.index("thinking")
    assert seq.index("transcript:user") > t
    assert seq.index("speaking", t) > seq.index("transcript:user")
    assert "listening" in seq[seq.index("speaking", t):]
    for key in ("vad_end_ms", "stt_ms", "llm_first_token_ms", "tts_first_audio_ms",
                "lipsync_first_frame_ms", "voice_to_voice_ms"):
        assert isinstance(metrics[key], float | int) and metrics[key] >= 0, key
    # and the reply's audio reached the bot
    assert bot.first_voice_after(bot.mic.sent_until) is not None
    session = next(iter(app[SERVICES].sessions.values()))
    assert session.conversation.history[-2]["content"] == user["text"]
    # the question was heard through the mic thread's own decoding (rtc_server.mic)
    assert session.mic.tapped and session.mic.frames_received > 100
    assert session.mic.rms_dbfs < 0
    # the bot's microphone, silent while the avatar answered, went without the VAD model
    server = await bot.server_session()
    assert server is not None and server["mic"]["vad_chunks_skipped"] > 0, server["mic"]
    await bot.aclose()


async def test_llm_retries_429_and_500_then_speaks_the_streamed_reply(
    loopback_only, aiohttp_client
):
    url, state, close = await start_fake_openai([
        ("error", 429, {"Retry-After": "0"}),
        ("error", 500),
        ("stream", ["Sure thing. ", "The sky ", "is blue today."], 0.02),
        ("error", 400, "the model does not exist"),
    ])
    try:
        _, _, bot = await start(
            aiohttp_client,
            **{"llm.base_url": url, "llm.model": "fake-model", "llm.api_key": "sk-test"},
        )
        bot.send({"type": "chat", "text": "What colour is the sky?"})
        first = await bot.wait_event(lambda e: e.get("role") == "assistant", 30)
        await bot.wait_event(lambda e: e.get("state") == "listening" and e["_t"] > first["_t"],
                             20)
        said = [e for e in bot.events if e.get("role") == "assistant"]
        assert " ".join(e["text"] for e in said) == "Sure thing. The sky is blue today."
        assert state.calls == 3  # two retried failures, then the stream
        assert state.requests[2].messages[-1]["content"] == "What colour is the sky?"
        assert state.requests[2].authorization == "Bearer sk-test"
        # a 400 is not retried: one call, an error event, and the session carries on
        bot.send({"type": "chat", "text": "And now?"})
        err = await bot.wait_event(lambda e: e.get("type") == "error", 20)
        assert "does not exist" in err["message"] and err["fatal"] is False
        await asyncio.sleep(0.3)
        assert state.calls == 4
        bot.send({"type": "say", "text": "Still here."})
        await bot.wait_event(lambda e: e.get("type") == "transcript" and e["text"] == "Still here.",
                             20)
        await bot.aclose()
    finally:
        await close()


async def test_repeated_llm_failures_become_a_fatal_error(loopback_only, aiohttp_client):
    url, state, close = await start_fake_openai([], default=("error", 400, "nope"))
    try:
        _, _, bot = await start(
            aiohttp_client,
            **{"llm.base_url": url, "llm.max_consecutive_failures": 2, "llm.max_retries": 0},
        )
        errors = []
        for i in range(2):
            bot.send({"type": "chat", "text": f"try {i}"})
            errors.append(await bot.wait_event(
                lambda e: e.get("type") == "error" and e not in errors, 20))
        assert [e["fatal"] for e in errors] == [False, True]
        await bot.aclose()
    finally:
        await close()


async def test_barge_in_stops_the_avatar_at_once(loopback_only, aiohttp_client):
    app, _, bot = await start(aiohttp_client)
    session = next(iter(app[SERVICES].sessions.values()))
    bot.send({"type": "say", "text": "Let me tell you a long story about the sea. " * 4})
    await bot.wait_event(lambda e: e.get("state") == "speaking", 20)
    await asyncio.sleep(1.0)
    assert session.compositor.speaking
    interruption = piper_speech("Wait, stop please!", sample_rate=48000)
    loop = asyncio.get_running_loop()
    t_talk = loop.time()
    bot.mic.play(interruption, 48000)
    await bot.wait_event(lambda e: e.get("state") == "listening" and e.get("user") == "speaking",
                         10)
    await bot.wait_event(
        lambda e: e.get("state") == "listening" and "user" not in e and e["_t"] > 0, 5
    )
    stopped = loop.time() - t_talk
    assert session.conversation.barge_ins == 1
    assert not session.compositor.speaking and session.compositor.queued == 0
    assert stopped < 2.0  # far less than the ~10 s story
    await bot.aclose()


async def test_short_sounds_do_not_interrupt(loopback_only, aiohttp_client):
    app, _, bot = await start(aiohttp_client)
    session = next(iter(app[SERVICES].sessions.values()))
    bot.send({"type": "say", "text": "A sentence that goes on for a good few seconds, at least."})
    await bot.wait_event(lambda e: e.get("state") == "speaking", 20)
    blip = piper_speech("Hm.", sample_rate=48000)
    voiced = np.nonzero(np.abs(blip) > 0.02)[0]
    bot.mic.play(blip[voiced[0]: voiced[0] + 48000 * 120 // 1000], 48000)  # 120 ms of voice
    await asyncio.sleep(1.0)
    assert session.conversation.barge_ins == 0
    assert session.compositor.speaking
    await bot.aclose()


async def test_bad_chat_inputs_get_error_events_and_the_session_carries_on(
    loopback_only, aiohttp_client
):
    _, _, bot = await start(aiohttp_client)
    bot.send({"type": "chat", "text": "   "})
    bot.send({"type": "chat", "text": 42})
    bot.send({"type": "chat", "text": "x" * 5000})
    bot.channel.send("{not json")
    bot.send({"type": "sing"})
    errors = []
    for _ in range(5):
        errors.append(await bot.wait_event(
            lambda e: e.get("type") == "error" and e not in errors, 10))
    assert all(e["fatal"] is False for e in errors)
    bot.send({"type": "chat", "text": "hello"})
    await bot.wait_event(lambda e: e.get("role") == "assistant", 20)
    await bot.aclose()


async def test_another_session_keeps_its_frame_rate_while_one_transcribes(
    loopback_only, aiohttp_client
):
    """Model work runs off the event loop: while session A's question is transcribed and
    answered, session B's video keeps coming at >= 24 fps. At 256x256: the server, both bots
    and the models share this machine's two cores, and what is checked here is the event loop,
    not how many 512x512 encodes the cores hold (bench.idle_sessions measures that)."""
    app, client, talker = await start(
        aiohttp_client, **{"media.video_width": 256, "media.video_height": 256}
    )
    watcher = Bot(str(client.make_url("")).rstrip("/"))
    await watcher.connect()
    await watcher.wait_first_video(15)
    watched = app[SERVICES].sessions[watcher.session_id].video_track.stats
    await asyncio.sleep(1.0)
    talker.mic.play(piper_speech("What is twelve times seven?", sample_rate=48000), 48000)
    await talker.mic.speech_ended.wait()
    t0, sent0, skipped0 = time.monotonic(), watched.frames_sent, watched.frames_skipped
    await talker.wait_event(lambda e: e.get("role") == "user", 30)  # transcribed
    await talker.wait_event(lambda e: e.get("type") == "metrics", 30)  # answered, speaking
    await asyncio.sleep(2.5)
    t1, sent1 = time.monotonic(), watched.frames_sent
    # the watcher's video kept its pace on the server over the whole turn (transcription,
    # reply, synthesis and the start of speech): frames sent on their 40 ms grid, none skipped
    # because the event loop was held up (two bots and the server share this machine's cores,
    # so a frame may leave a little late; over the turn the rate must hold). A count over a
    # wall-clock window is one frame off either way: 23.5 allows that and a little CI noise
    # (one clean-clone run measured 23.66 over 2.75 s, one frame short of 24), while an event
    # loop held for half a second by a model would show as skipped frames or ~22 fps.
    fps = (sent1 - sent0) / (t1 - t0)
    assert t1 - t0 > 2.0 and fps >= 23.5, (fps, t1 - t0)
    assert watched.frames_skipped == skipped0
    await watcher.aclose()
    await talker.aclose()


async def test_persian_chat_gets_a_persian_answer(loopback_only, aiohttp_client):
    """Text chat in Persian with the embedded replier: the answer comes back in Persian (the
    bundled voice is English; a Persian Piper voice is configured with engines.piper_voice)."""
    _, _, bot = await start(aiohttp_client, **{"conversation.language": "fa"})
    bot.send({"type": "chat", "text": "سلام، اسم تو چیست؟"})
    user = await bot.wait_event(lambda e: e.get("role") == "user", 10)
    assert user["text"] == "سلام، اسم تو چیست؟"
    reply = await bot.wait_event(lambda e: e.get("role") == "assistant", 30)
    assert re.search("[\u0600-\u06ff]", reply["text"]), reply
    await bot.aclose()
