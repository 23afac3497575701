"""Session teardown rules, driven without a network: disconnect grace, idle timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from config import load_settings
from face.library import AvatarLibrary
from pipeline.lipsync.viseme_engine import VisemeEngine
from rtc_server.session import Session
from tests.fakes.tts import ToneTTS


class StubPeer:
    """Stands in for RTCPeerConnection: a settable state and a close() that is recorded."""

    def __init__(self) -> None:
        self.connectionState = "connecting"
        self.closed = False

    async def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def avatar():
    return AvatarLibrary(data_dir=Path("data"), width=512, height=512).get("default")


def make_session(avatar, **overrides):
    settings = load_settings(env={}, overrides=overrides)
    closed: list[Session] = []
    session = Session(settings=settings, avatar=avatar, tts=ToneTTS(), lipsync=VisemeEngine(),
                      render_executor=None,
                      on_closed=closed.append)
    real_pc = session.pc
    session.pc = StubPeer()  # type: ignore[assignment]
    return session, closed, real_pc


async def test_disconnected_past_grace_is_torn_down(avatar):
    session, closed, real_pc = make_session(avatar, **{"sessions.disconnect_grace_s": 0.05})
    session.pc.connectionState = "disconnected"
    session._on_connection_state()
    assert session.state == "disconnected"
    await asyncio.wait_for(session.wait_closed(), 2)
    assert closed == [session]
    assert session.pc.closed
    assert session.audio_track.readyState == "ended"
    assert session.video_track.readyState == "ended"
    await real_pc.close()


async def test_reconnecting_within_grace_keeps_the_session(avatar):
    session, closed, real_pc = make_session(avatar, **{"sessions.disconnect_grace_s": 0.2})
    session.pc.connectionState = "disconnected"
    session._on_connection_state()
    session.pc.connectionState = "connected"
    session._on_connection_state()
    await asyncio.sleep(0.3)
    assert closed == [] and session.state == "connected"
    await session.aclose("test over")
    assert closed == [session]
    await real_pc.close()


async def test_failed_peer_closes_at_once_and_close_is_idempotent(avatar):
    session, closed, real_pc = make_session(avatar)
    session.pc.connectionState = "failed"
    session._on_connection_state()
    await asyncio.wait_for(session.wait_closed(), 2)
    await session.aclose("again")
    assert closed == [session]  # reported once
    assert session.state == "closed"
    await real_pc.close()


class BatchingEngine(VisemeEngine):
    """An engine that asks for a frame pipeline of its own: groups of 4, a 600 ms lead (as
    Wav2Lip's), speech that starts 120 ms after it is ready."""

    name = "batching"
    frame_group = 4
    render_lead_ms = 600
    schedule_lead_ms = 120


async def test_the_frame_pipeline_follows_the_engine(avatar):
    """The viseme engine renders 200 ms ahead in pairs (media.render_lead_ms); an engine
    with a lead and a frame group of its own (Wav2Lip: lipsync.render_lead_ms,
    lipsync.frame_group) gets them; so does the schedule lead (media.schedule_lead_ms for
    visemes, lipsync.schedule_lead_ms for Wav2Lip)."""
    settings = load_settings(env={}, overrides={"media.render_lead_ms": 200,
                                                "media.schedule_lead_ms": 60})
    for engine, lead_ms, group, schedule_ms in ((VisemeEngine(), 200, 2, 60),
                                                (BatchingEngine(), 600, 4, 120)):
        session = Session(settings=settings, avatar=avatar, tts=ToneTTS(), lipsync=engine,
                          render_executor=None, on_closed=lambda s: None)
        assert session.frames._lead_ns == lead_ms * 1_000_000
        assert session.frames._group == group
        assert session.compositor.schedule_lead_ns == schedule_ms * 1_000_000
        await session.pc.close()
