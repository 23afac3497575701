"""Session limits: call length, idle (no speech and no control message), media timeout.

The rules are checked first on a session driven by a fake clock (no network, no sleeping),
then once each over real loopback peer connections with tiny limits, and last with a bot in a
child process killed with SIGKILL (a client that vanishes without closing)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from config import load_settings
from face.library import AvatarLibrary
from pipeline.lipsync.viseme_engine import VisemeEngine
from pipeline.vad import SpeechStart
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from rtc_server.session import Session
from tests.fakes.clock import FakeClock
from tests.fakes.peer import QUIET_CALL, StubChannel, wait_until
from tests.fakes.tts import ToneTTS

ROOT = Path(__file__).resolve().parent.parent




class StubPeer:
    def __init__(self) -> None:
        self.connectionState = "new"
        self.closed = False

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def avatar():
    return AvatarLibrary(data_dir=Path("data"), width=256, height=256).get("default")


@pytest.fixture
async def make_session(avatar):
    made: list[tuple[Session, Any]] = []

    def make(**overrides: Any) -> tuple[Session, FakeClock, list[Session]]:
        base = {
            "sessions.max_call_s": 0,
            "sessions.idle_timeout_s": 0,
            "sessions.media_timeout_s": 0,
            "sessions.connect_timeout_s": 30,
            "conversation.listen": False,
        }
        base.update(overrides)
        settings = load_settings(env={}, overrides=base)
        clock, closed = FakeClock(), []
        session = Session(settings=settings, avatar=avatar, tts=ToneTTS(),
                          lipsync=VisemeEngine(), render_executor=None,
                          on_closed=closed.append, now=clock)
        made.append((session, session.pc))
        session.pc = StubPeer()  # type: ignore[assignment]
        return session, clock, closed

    yield make
    for session, real_pc in made:
        await session.aclose("test over")
        await real_pc.close()


def connect(session: Session) -> None:
    session.pc.connectionState = "connected"
    session._on_connection_state()


async def test_call_limit_is_reached_at_max_call_s(make_session):
    session, clock, _ = make_session(**{"sessions.max_call_s": 60})
    connect(session)
    clock.advance(59.9)
    assert session.check_limits() is None
    clock.advance(0.1)
    reason, detail = session.check_limits()
    assert reason == "call_limit" and "60" in detail


async def test_idle_is_reset_by_a_control_message_and_by_speech(make_session):
    session, clock, _ = make_session(**{"sessions.idle_timeout_s": 30})
    connect(session)
    clock.advance(29)
    session._on_message(json.dumps({"type": "interrupt"}))
    clock.advance(29)
    assert session.check_limits() is None  # 29 s after the message
    session.conversation._on_vad_event(SpeechStart(0, 250))  # what the VAD reports
    clock.advance(29)
    assert session.check_limits() is None  # 29 s after the speech
    clock.advance(1)
    assert session.check_limits()[0] == "idle"


async def test_idle_counts_garbage_messages_as_messages_too(make_session):
    """Any message shows someone is there; a bad one also gets an error event."""
    session, clock, _ = make_session(**{"sessions.idle_timeout_s": 10})
    clock.advance(9)
    session._on_message("not json")
    clock.advance(9)
    assert session.check_limits() is None


async def test_media_timeout_runs_from_the_last_media_frame_once_media_flowed(make_session):
    session, clock, _ = make_session(**{"sessions.media_timeout_s": 2})
    connect(session)
    clock.advance(60)
    # nothing ever received (a receive-only client): left to ICE, not this timeout
    assert session.check_limits() is None
    session.last_media = clock()
    clock.advance(1.9)
    assert session.check_limits() is None
    clock.advance(0.1)
    assert session.check_limits()[0] == "media_timeout"


async def test_zero_disables_each_limit(make_session):
    session, clock, _ = make_session()
    connect(session)
    session.last_media = clock()
    clock.advance(10 * 24 * 3600)
    assert session.check_limits() is None


async def test_never_connected_is_still_torn_down(make_session):
    session, clock, _ = make_session(**{"sessions.connect_timeout_s": 5})
    session.state = "connecting"
    clock.advance(5.1)
    assert session.check_limits()[0] == "connect_timeout"


async def test_end_sends_closing_before_the_peer_is_closed(make_session):
    session, clock, closed = make_session()
    channel = StubChannel()
    session._on_datachannel(channel)  # type: ignore[arg-type]
    await session.end("call_limit", "calls last at most 60 s", linger_s=0)
    closing = [e for e in channel.sent if e["type"] == "closing"]
    assert closing == [{"type": "closing", "reason": "call_limit",
                        "detail": "calls last at most 60 s"}]
    assert closed == [session] and session.pc.closed
    assert session.close_reason == "call_limit"


# ------------------------------------------------------------------ real loopback calls


def app_with(**overrides: Any):
    base = {**QUIET_CALL, **overrides}
    return create_app(load_settings(env={}, overrides=base), tts=ToneTTS())


async def start_bot(client) -> Bot:
    use_host_candidates("loopback")
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(15)
    return bot


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_call_is_told_and_closed_at_max_call_s(loopback_only, aiohttp_client):
    app = app_with(**{"sessions.max_call_s": 2})
    client = await aiohttp_client(app)
    bot = await start_bot(client)
    try:
        event = await bot.wait_event(lambda e: e.get("type") == "closing", 20)
        assert event["reason"] == "call_limit" and event["detail"]
        await wait_until(lambda: not app[SERVICES].sessions, 20)
        await wait_until(lambda: bot.pc.connectionState in ("closed", "failed"), 30)
    finally:
        await bot.aclose()


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_silent_call_is_closed_as_idle_and_messages_keep_it(loopback_only,
                                                                      aiohttp_client):
    app = app_with(**{"sessions.idle_timeout_s": 2})
    client = await aiohttp_client(app)
    bot = await start_bot(client)
    try:
        # a message every 0.5 s for 3 s keeps the (silent) call past its idle limit
        for _ in range(6):
            bot.send({"type": "interrupt"})
            await asyncio.sleep(0.5)
        assert len(app[SERVICES].sessions) == 1
        assert not [e for e in bot.events if e.get("type") == "closing"]
        event = await bot.wait_event(lambda e: e.get("type") == "closing", 20)
        assert event["reason"] == "idle"
        await wait_until(lambda: not app[SERVICES].sessions, 20)
    finally:
        await bot.aclose()


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_client_that_stops_sending_media_is_closed(loopback_only, aiohttp_client):
    app = app_with(**{"sessions.media_timeout_s": 1.5})
    client = await aiohttp_client(app)
    bot = await start_bot(client)
    try:
        session = next(iter(app[SERVICES].sessions.values()))
        await wait_until(lambda: session.mic.frames_received > 0, 15)
        tasks = list(session._tasks)
        bot.mic.stop()  # the microphone track ends: no more RTP, the connection stays up
        await wait_until(lambda: not app[SERVICES].sessions, 20)
        assert session.close_reason == "media_timeout"
        assert all(t.done() for t in tasks)
    finally:
        await bot.aclose()


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_killed_client_is_cleaned_up_within_the_media_timeout(loopback_only,
                                                                      aiohttp_server):
    """A bot process killed with SIGKILL sends nothing more, not even a close. The server's
    session goes within media_timeout_s (2 s) plus the watchdog period, and leaves no task
    behind (measured here with a generous margin for this busy machine)."""
    app = app_with(**{"sessions.media_timeout_s": 2})
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rtc_server.bot", "--url", url, "--seconds", "120",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: any(s.state == "connected" and s.mic.frames_received > 0
                                     for s in app[SERVICES].sessions.values()), 60)
        (session,) = app[SERVICES].sessions.values()
        tag = session.id[:8]
        tasks = list(session._tasks)
        loop = asyncio.get_running_loop()
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
        killed_at = loop.time()
        await wait_until(lambda: not app[SERVICES].sessions, 20)
        gone_after_s = loop.time() - killed_at
        assert session.close_reason == "media_timeout"
        assert all(t.done() for t in tasks)
        left = [t for t in asyncio.all_tasks() if (t.get_name() or "").endswith(tag)]
        assert left == [], f"tasks left behind: {left}"
        print(f"killed client's session closed {gone_after_s:.2f} s after SIGKILL")
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
