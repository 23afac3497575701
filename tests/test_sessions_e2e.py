"""Session lifecycle with real peer connections (in-process server, loopback only)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from config import load_settings
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.peer import offer_sdp, wait_until
from tests.fakes.tts import ToneTTS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def make_app(**overrides):
    base = {"webrtc.host_candidates": "loopback", "sessions.max_concurrent": 2}
    base.update(overrides)
    return create_app(load_settings(env={}, overrides=base), tts=ToneTTS())


@pytest.fixture
async def app_client(loopback_only, aiohttp_client):
    use_host_candidates("loopback")
    app = make_app(**{"sessions.connect_timeout_s": 2.0})
    client = await aiohttp_client(app)
    return app, client


async def test_peer_close_tears_session_down_completely(app_client):
    app, client = app_client
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(10)
    sessions = app[SERVICES].sessions
    assert len(sessions) == 1
    session = next(iter(sessions.values()))
    tasks = list(session._tasks)
    assert tasks, "a live session runs tasks"
    ref = weakref.ref(session)
    del session
    await bot.aclose()
    await wait_until(lambda: not sessions)
    assert all(t.done() for t in tasks)
    s = ref()
    if s is not None:
        assert s.state == "closed"
        assert s.audio_track.readyState == "ended" and s.video_track.readyState == "ended"
        assert s.frames._task is None
    del s, tasks
    gc.collect()
    assert ref() is None, "the closed session is still referenced somewhere"


async def test_delete_session_ends_the_call(app_client):
    app, client = app_client
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(10)
    listed = await (await client.get("/sessions")).json()
    (entry,) = listed["sessions"]
    assert entry["id"] == bot.session_id
    assert entry["frames_sent"]["video"] > 0
    resp = await client.delete(f"/sessions/{bot.session_id}")
    assert resp.status == 200
    assert (await resp.json())["state"] == "closed"
    assert app[SERVICES].sessions == {}
    await wait_until(lambda: bot.pc.connectionState in ("closed", "failed"), 15)
    await bot.aclose()


async def test_session_that_never_connects_is_torn_down(app_client):
    app, client = app_client
    pc, sdp = await offer_sdp()
    resp = await client.post("/offer", json={"sdp": sdp, "type": "offer"})
    assert resp.status == 200
    assert len(app[SERVICES].sessions) == 1
    # the answer is never applied: no ICE, no DTLS; connect_timeout_s is 2
    await wait_until(lambda: not app[SERVICES].sessions, 8)
    await pc.close()


async def test_over_the_session_limit_is_503_with_retry_after(app_client):
    app, client = app_client
    pcs = []
    for _ in range(2):
        pc, sdp = await offer_sdp()
        pcs.append(pc)
        assert (await client.post("/offer", json={"sdp": sdp, "type": "offer"})).status == 200
    pc, sdp = await offer_sdp()
    pcs.append(pc)
    resp = await client.post("/offer", json={"sdp": sdp, "type": "offer"})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    body = await resp.json()
    assert body["error"] == "server_full" and "2" in body["detail"]
    assert len(app[SERVICES].sessions) == 2
    for pc in pcs:
        await pc.close()


async def test_offer_without_video_is_400(app_client):
    app, client = app_client
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    resp = await client.post("/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
    assert resp.status == 400
    assert "video" in (await resp.json())["detail"]
    assert app[SERVICES].sessions == {}
    await pc.close()


async def test_bad_control_messages_get_error_events_and_call_goes_on(app_client):
    app, client = app_client
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    bot.channel.send("not json")
    bot.send({"type": "say"})
    bot.send({"type": "dance"})
    bot.send({"type": "say", "text": "Still here."})
    errors = []
    for _ in range(3):
        e = await bot.wait_event(lambda e: e.get("type") == "error" and e not in errors, 5)
        errors.append(e)
    assert all(e["fatal"] is False for e in errors)
    await bot.wait_event(lambda e: e.get("state") == "speaking", 5)
    await bot.aclose()


async def test_bot_sends_its_wav_as_microphone_and_records_the_call(app_client, tmp_path):
    import wave

    import av
    import numpy as np

    app, client = app_client
    mic = tmp_path / "mic.wav"
    tone = (np.sin(2 * np.pi * 300 * np.arange(48000) / 48000) * 16000).astype(np.int16)
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(tone.tobytes())
    out = tmp_path / "call.mp4"
    bot = Bot(str(client.make_url("")).rstrip("/"), mic=str(mic), record=str(out))
    await bot.connect()
    await bot.wait_first_video(10)
    await asyncio.sleep(2.0)
    server = await bot.server_session()
    await bot.aclose()
    assert server is not None and server["mic"]["frames_received"] > 50
    assert server["mic"]["rms_dbfs"] > -20  # a -6 dBFS tone, not silence
    with av.open(str(out)) as container:
        kinds = {s.type for s in container.streams}
        assert kinds == {"audio", "video"}
        video = container.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (512, 512)
        frames = sum(1 for _ in container.decode(video=0))
    assert frames >= 40  # ~2 s at 25 fps: the recorder saw every frame, not a share of them


async def test_interrupt_stops_speech_at_once_and_the_call_goes_on(app_client):
    app, client = app_client
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(10)
    bot.send({"type": "say", "text": "A long sentence that would play for several seconds " * 2})
    bot.send({"type": "say", "text": "And one queued after it."})
    await bot.wait_event(lambda e: e.get("state") == "speaking", 5)
    session = next(iter(app[SERVICES].sessions.values()))
    bot.send({"type": "interrupt"})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await bot.wait_event(lambda e: e.get("state") == "listening", 2)
    # the cut lands on the next frame boundary: idle well before the ~4 s of speech ended
    assert loop.time() - t0 < 1.0
    assert session.compositor.queued == 0 and session._says.empty()
    await asyncio.sleep(0.5)
    assert not session.compositor.speaking  # the queued say was dropped, not played
    bot.send({"type": "say", "text": "Back again."})  # and the session still speaks
    await bot.wait_event(lambda e: e.get("state") == "speaking" and loop.time() - t0 > 0.5, 5)
    await bot.aclose()


async def test_a_call_uses_the_configured_wav2lip_model(loopback_only, aiohttp_client, wav2lip_onnx,
                                                         tmp_path):
    """A call with lipsync.engine: wav2lip renders its speaking frames through that model (here
    the random-weight network on the CPU)."""
    use_host_candidates("loopback")
    app = make_app(**{
        "lipsync.engine": "wav2lip",
        "lipsync.wav2lip_model": str(wav2lip_onnx),
        "lipsync.model_cache_dir": str(tmp_path),
        "lipsync.device": "cpu",
    })
    client = await aiohttp_client(app)
    health = await (await client.get("/health")).json()
    assert health["lipsync"]["engine"] == "wav2lip"
    assert health["lipsync"]["providers"] == ["CPUExecutionProvider"]
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(10)
    bot.send({"type": "say", "text": "Hello from the model."})
    await bot.wait_event(lambda e: e.get("state") == "speaking", 10)
    await bot.wait_event(lambda e: e.get("state") == "listening", 10)
    server = await bot.server_session()
    health = await (await client.get("/health")).json()
    await bot.aclose()
    assert server is not None and server["lipsync"] == "wav2lip"
    # speaking frames went through the model (how many were on time is bench.wav2lip's business:
    # the CPU runs this network at about 25-35 frames/s)
    assert health["lipsync"]["batching"]["items"] >= 1
    assert health["lipsync"]["batching"]["failed_batches"] == 0
