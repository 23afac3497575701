"""One caller must never hurt the others (issue 26): the call limit is reserved before the
first await, offers that never connect cost no rendering and have their own small limits,
and the clapper is bounded and built off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from common.errors import ServerFull
from config import load_settings
from face.library import AvatarLibrary
from pipeline.lipsync.viseme_engine import VisemeEngine
from rtc_server.app import create_app
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from rtc_server.session import Session
from rtc_server.slots import SessionSlots, TooManyPending
from tests.fakes.peer import QUIET_CALL, StubChannel, offer_sdp, wait_until
from tests.fakes.tts import ToneTTS


def app_with(**overrides: Any):
    base = {**QUIET_CALL, "media.video_width": 128, "media.video_height": 128, **overrides}
    return create_app(load_settings(env={}, overrides=base), tts=ToneTTS())


# --- slots --------------------------------------------------------------------------------------
def test_slots_count_pending_per_client_and_overall_then_live():
    slots = SessionSlots(max_live=4, max_pending=3, max_pending_per_client=2)
    a1, a2 = slots.reserve("a"), slots.reserve("a")
    with pytest.raises(TooManyPending) as too_many:
        slots.reserve("a")
    assert too_many.value.status == 429 and too_many.value.retry_after_s > 0
    b1 = slots.reserve("b")
    with pytest.raises(ServerFull, match="connecting"):
        slots.reserve("c")  # three connecting in all
    a1.connected()
    a1.connected()  # idempotent
    assert (slots.taken, slots.pending) == (3, 2)
    c1 = slots.reserve("c")
    with pytest.raises(ServerFull, match="limit of 4"):
        slots.reserve("d")
    for slot in (a1, a2, b1, c1, c1):
        slot.release()
    assert (slots.taken, slots.pending) == (0, 0)


# --- offers -------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_simultaneous_offers_never_pass_the_call_limit(loopback_only, aiohttp_client):
    use_host_candidates("loopback")
    app = app_with(**{"sessions.max_concurrent": 3, "sessions.max_pending": 20,
                      "sessions.max_pending_per_client": 20})
    client = await aiohttp_client(app)
    peers = [await offer_sdp() for _ in range(6)]
    try:
        answers = await asyncio.gather(*(
            client.post("/offer", json={"sdp": sdp, "type": "offer"}) for _, sdp in peers))
        statuses = sorted(r.status for r in answers)
        assert statuses == [200, 200, 200, 503, 503, 503], statuses
        assert len(app[SERVICES].sessions) == 3
        full = [await r.json() for r in answers if r.status == 503]
        assert all(body["error"] == "server_full" for body in full)
    finally:
        for pc, _ in peers:
            await pc.close()


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_offers_that_never_connect_render_nothing_and_have_their_own_limit(
        loopback_only, aiohttp_client):
    use_host_candidates("loopback")
    app = app_with(**{"sessions.connect_timeout_s": 2, "sessions.max_pending": 3,
                      "sessions.max_pending_per_client": 2})
    client = await aiohttp_client(app)
    peers = [await offer_sdp() for _ in range(3)]
    try:
        first = [await client.post("/offer", json={"sdp": sdp, "type": "offer"})
                 for _, sdp in peers[:2]]
        assert [r.status for r in first] == [200, 200]
        third = await client.post("/offer", json={"sdp": peers[2][1], "type": "offer"})
        assert third.status == 429 and third.headers["Retry-After"]
        assert (await third.json())["error"] == "too_many_pending"
        await asyncio.sleep(1.0)  # a connected call would have rendered 25 frames by now
        for session in list(app[SERVICES].sessions.values()):
            assert session.state == "connecting"
            assert session.frames.stats.rendered == 0
        # the connect timeout ends them and gives their slots back
        await wait_until(lambda: not app[SERVICES].sessions, 20)
        assert (app[SERVICES].slots.taken, app[SERVICES].slots.pending) == (0, 0)
        again = await client.post("/offer", json={"sdp": peers[2][1], "type": "offer"})
        assert again.status == 200, await again.text()
    finally:
        for pc, _ in peers:
            await pc.close()


async def test_a_refused_offer_gives_its_slot_back(aiohttp_client):
    app = app_with(**{"sessions.max_concurrent": 1})
    client = await aiohttp_client(app)
    for _ in range(3):
        resp = await client.post("/offer", json={"sdp": "v=0\r\nnot sdp", "type": "offer"})
        assert resp.status == 400
        missing = await client.post("/offer", json={"sdp": "v=0\r\n", "type": "offer",
                                                    "avatar_id": "av_000000000000"})
        assert missing.status == 404
    assert (app[SERVICES].slots.taken, app[SERVICES].slots.pending) == (0, 0)


# --- clapper ------------------------------------------------------------------------------------
@pytest.fixture
async def session():
    from concurrent.futures import ThreadPoolExecutor

    avatar = AvatarLibrary(data_dir=Path("data"), width=128, height=128).get("default")
    pool = ThreadPoolExecutor(1, thread_name_prefix="render")
    s = Session(settings=load_settings(env={}, overrides={"conversation.listen": False}),
                avatar=avatar, tts=ToneTTS(), lipsync=VisemeEngine(), render_executor=pool,
                on_closed=lambda _: None)
    s._channel = StubChannel()  # type: ignore[assignment]
    yield s
    await s.aclose("test over")
    pool.shutdown()


async def test_the_clapper_is_built_off_the_loop_and_one_at_a_time(session, monkeypatch):
    import rtc_server.session as session_module

    threads: list[str] = []
    real = session_module.clapper_pcm

    def recording(**kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(**kw)

    monkeypatch.setattr(session_module, "clapper_pcm", recording)
    session._on_message(json.dumps({"type": "clapper", "count": 600}))
    session._on_message(json.dumps({"type": "clapper", "count": 600}))  # while building
    await wait_until(lambda: session.compositor.pending_of("clapper") == 1, 10)
    session._on_message(json.dumps({"type": "clapper", "count": 3}))  # while queued
    assert threads == ["render_0"]
    refusals = [e for e in session._channel.sent if e.get("type") == "error"]
    assert len(refusals) == 2 and all("already playing" in e["message"] for e in refusals)
    pcm = session.compositor._segments[-1].segment.pcm
    assert pcm.dtype.itemsize == 2 and pcm.nbytes < 60_000_000  # 600 s: 57.7 MB, int16
    session.interrupt()
    await wait_until(lambda: session.compositor.pending_of("clapper") == 0, 10)
    session._on_message(json.dumps({"type": "clapper", "count": 2}))  # free again
    await wait_until(lambda: session.compositor.pending_of("clapper") == 1, 10)
    assert len(threads) == 2


async def test_an_interrupt_cancels_a_clapper_being_built(session, monkeypatch):
    import rtc_server.session as session_module

    started, release = threading.Event(), threading.Event()
    real = session_module.clapper_pcm

    def slow(**kw: Any) -> Any:
        started.set()
        release.wait(10)
        return real(**kw)

    monkeypatch.setattr(session_module, "clapper_pcm", slow)
    session._on_message(json.dumps({"type": "clapper", "count": 5}))
    await asyncio.to_thread(started.wait, 10)
    session.interrupt()
    release.set()
    await asyncio.sleep(0.2)
    assert session.compositor.pending_of("clapper") == 0
    assert session._clapper is None
