"""Signaling over HTTP: bad input gets a clear JSON error, never a crash."""

from __future__ import annotations

import pytest

from config import load_settings
from rtc_server.app import create_app
from tests.fakes.tts import ToneTTS

MINIMAL_OFFER_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def settings(**overrides):
    base = {"webrtc.host_candidates": "loopback", "server.max_body_bytes": 65536}
    base.update(overrides)
    return load_settings(env={}, overrides=base)


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(settings(), tts=ToneTTS()))


async def error_of(resp, status):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error", "detail"}
    assert body["detail"]
    return body


async def test_health(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


async def test_wrong_content_type_is_400(client):
    resp = await client.post("/offer", data="sdp=v%3D0", headers={"Content-Type": "text/plain"})
    body = await error_of(resp, 400)
    assert "application/json" in body["detail"]


async def test_invalid_json_is_400(client):
    resp = await client.post("/offer", data="{not json",
                             headers={"Content-Type": "application/json"})
    await error_of(resp, 400)


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({}, "sdp"),
        ({"type": "offer"}, "sdp"),
        ({"sdp": MINIMAL_OFFER_HEAD}, "type"),
        ({"sdp": MINIMAL_OFFER_HEAD, "type": "answer"}, "type"),
        ({"sdp": "hello", "type": "offer"}, "SDP"),
        ({"sdp": MINIMAL_OFFER_HEAD, "type": "offer", "avatar_id": 7}, "avatar_id"),
        ([1, 2], "object"),
    ],
)
async def test_missing_or_wrong_fields_are_400(client, payload, needle):
    resp = await client.post("/offer", json=payload)
    body = await error_of(resp, 400)
    assert needle in body["detail"]


async def test_malformed_sdp_is_400_and_leaves_no_session(client):
    junk = MINIMAL_OFFER_HEAD + "m=video notaport RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n"
    resp = await client.post("/offer", json={"sdp": junk, "type": "offer"})
    body = await error_of(resp, 400)
    assert "SDP" in body["detail"]
    sessions = await (await client.get("/sessions")).json()
    assert sessions["sessions"] == []


async def test_oversized_body_is_413(client):
    resp = await client.post("/offer", json={"sdp": "v=0" + "x" * 70000, "type": "offer"})
    await error_of(resp, 413)


async def test_unknown_avatar_is_404(client):
    resp = await client.post(
        "/offer", json={"sdp": MINIMAL_OFFER_HEAD, "type": "offer", "avatar_id": "nobody"}
    )
    await error_of(resp, 404)


async def test_path_like_avatar_id_is_404_without_touching_files(client):
    resp = await client.post(
        "/offer", json={"sdp": MINIMAL_OFFER_HEAD, "type": "offer", "avatar_id": "../../etc"}
    )
    await error_of(resp, 404)


async def test_delete_unknown_session_is_404(client):
    await error_of(await client.delete("/sessions/nope"), 404)


async def test_unknown_route_is_json_404(client):
    await error_of(await client.get("/no/such/thing"), 404)


async def test_call_page_is_served(client):
    resp = await client.get("/")
    assert resp.status == 200
    assert "<video" in await resp.text()
