"""Graceful shutdown: SIGTERM stops new sessions, tells every client and closes every call.

The requirement is "peer connections closed and the process gone within
server.shutdown_grace_s (5 s) of SIGTERM". The subprocess test measures that time and prints
it, but allows 10 s: start-up and teardown noise on this shared two-core machine is not the
server's doing (speed is measured in bench/, not asserted)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from config import load_settings
from rtc_server.app import create_app, drain
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.conftest import free_port, start_server
from tests.fakes.peer import offer_sdp, wait_until
from tests.fakes.tts import ToneTTS

pytestmark = [pytest.mark.e2e]

EXIT_ALLOWANCE_S = 10.0  # the requirement is 5 s (server.shutdown_grace_s); see above


@pytest.mark.timeout(120)
async def test_sigterm_tells_clients_closes_calls_and_exits_zero(loopback_only, artifacts_dir):
    port = free_port()
    proc = start_server(port, {
        "AVATAR_CONVERSATION__LISTEN": "false",
        "AVATAR_MEDIA__VIDEO_WIDTH": "256",
        "AVATAR_MEDIA__VIDEO_HEIGHT": "256",
        "AVATAR_SERVER__SHUTDOWN_GRACE_S": "5",
    })
    use_host_candidates("loopback")
    bots = [Bot(f"http://127.0.0.1:{port}") for _ in range(2)]
    try:
        for bot in bots:
            await bot.connect()
            await bot.wait_first_video(15)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for bot in bots:
            event = await bot.wait_event(lambda e: e.get("type") == "closing", 10)
            assert event["reason"] == "shutdown" and event["detail"]
        for bot in bots:
            await wait_until(
                lambda b=bot: b.pc.connectionState in ("closed", "failed")
                or b.channel.readyState == "closed",
                15,
            )
        rc = await asyncio.to_thread(proc.wait, 30)
        exit_s = time.monotonic() - t0
        print(f"SIGTERM to exit: {exit_s:.2f} s")
        assert rc == 0
        assert exit_s < EXIT_ALLOWANCE_S
    finally:
        for bot in bots:
            await bot.aclose()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def make_app(**overrides: Any):
    base = {"webrtc.host_candidates": "loopback", "conversation.listen": False,
            "media.video_width": 256, "media.video_height": 256}
    base.update(overrides)
    return create_app(load_settings(env={}, overrides=base), tts=ToneTTS())


@pytest.mark.timeout(60)
async def test_an_offer_while_draining_is_503_shutting_down(loopback_only, aiohttp_client):
    use_host_candidates("loopback")
    app = make_app()
    client = await aiohttp_client(app)
    app[SERVICES].draining.set()
    pc, sdp = await offer_sdp()
    try:
        resp = await client.post("/offer", json={"sdp": sdp, "type": "offer"})
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0
        body = await resp.json()
        assert body["error"] == "shutting_down" and body["detail"]
        assert app[SERVICES].sessions == {}
    finally:
        await pc.close()


@pytest.mark.timeout(60)
async def test_a_session_whose_close_hangs_does_not_hold_the_shutdown(loopback_only,
                                                                      aiohttp_client):
    use_host_candidates("loopback")
    app = make_app(**{"server.shutdown_grace_s": 2})
    client = await aiohttp_client(app)
    base = str(client.make_url("")).rstrip("/")
    bots = [Bot(base), Bot(base)]
    for bot in bots:
        await bot.connect()
        await bot.wait_first_video(15)
    hung, fine = (app[SERVICES].sessions[b.session_id] for b in bots)
    real_aclose = hung.aclose

    async def hang(reason: str = "closed") -> None:
        await asyncio.Event().wait()

    hung.aclose = hang  # type: ignore[method-assign]
    try:
        await drain(app)  # returns: the hung session is left behind after the grace
        assert app[SERVICES].draining.is_set()
        assert fine.state == "closed"
        assert app[SERVICES].sessions == {}
        for bot in bots:
            event = await bot.wait_event(lambda e: e.get("type") == "closing", 5)
            assert event["reason"] == "shutdown"
    finally:
        await real_aclose("test over")
        for bot in bots:
            await bot.aclose()
