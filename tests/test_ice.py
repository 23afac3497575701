"""ICE servers handed to peers: static entries, and TURN REST credentials from a secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from config import ConfigError, load_settings
from rtc_server.ice import browser_ice_servers, resolve_ice_servers, turn_rest_credentials

TURN = {"urls": ["turn:turn.example.org:3478"]}


def settings(**over: object):
    return load_settings(env={}, overrides=over)


def test_turn_rest_credentials_follow_coturn_scheme() -> None:
    username, credential = turn_rest_credentials("s3cret", 3600, now=1_700_000_000.4)
    assert username == "1700003600:avatar"
    # coturn (use-auth-secret) recomputes exactly this from its static-auth-secret
    expected = hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(credential) == expected
    other_user, other = turn_rest_credentials("other", 3600, now=1_700_000_000.4)
    assert other_user == username and other != credential


def test_secret_fills_turn_entries_without_credentials_only() -> None:
    s = settings(**{
        "webrtc.turn_secret": "s3cret",
        "webrtc.turn_ttl_s": 600,
        "webrtc.ice_servers": [
            {"urls": "stun:stun.example.org:3478"},
            TURN,
            {"urls": "turns:t2.example.org:5349", "username": "u", "credential": "fixed"},
        ],
    })
    stun, turn, static = resolve_ice_servers(s.webrtc, now=1000.0)
    assert stun.username is None and stun.credential is None
    assert turn.username == "1600:avatar" and turn.credential
    assert (static.username, static.credential) == ("u", "fixed")
    page = browser_ice_servers((stun, turn, static))
    assert page[0] == {"urls": ["stun:stun.example.org:3478"]}
    assert page[1]["username"] == "1600:avatar"


def test_turn_without_credentials_needs_the_secret() -> None:
    with pytest.raises(ConfigError, match="turn_secret"):
        settings(**{"webrtc.ice_servers": [TURN]})


def test_secret_is_never_shown() -> None:
    s = settings(**{"webrtc.turn_secret": "hunter2-secret", "webrtc.ice_servers": [TURN]})
    assert "hunter2-secret" not in repr(s) + repr(s.to_dict())
    with pytest.raises(ConfigError) as info:
        settings(**{"webrtc.turn_secret": 12345})
    assert "12345" not in str(info.value)


async def test_ice_servers_route_hands_the_page_fresh_credentials(aiohttp_client) -> None:
    from rtc_server.app import create_app
    from tests.fakes.tts import ToneTTS

    s = settings(**{
        "webrtc.host_candidates": "loopback",
        "webrtc.turn_secret": "s3cret",
        "webrtc.ice_servers": [{"urls": "stun:stun.example.org:3478"}, TURN],
        "access.offer_token": "tok-1-long-enough-secret",
    })
    client = await aiohttp_client(create_app(s, tts=ToneTTS()))
    resp = await client.get("/ice-servers")
    assert resp.status == 401  # TURN credentials are for callers with the offer token
    resp = await client.get("/ice-servers",
                            headers={"Authorization": "Bearer tok-1-long-enough-secret"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    stun, turn = body["iceServers"]
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    expiry, _, user = turn["username"].partition(":")
    assert user == "avatar" and int(expiry) > time.time() + 86000
    expected = hmac.new(b"s3cret", turn["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == expected
    assert "s3cret" not in await resp.text()


async def test_ice_servers_default_is_empty(aiohttp_client) -> None:
    from rtc_server.app import create_app
    from tests.fakes.tts import ToneTTS

    s = settings(**{"webrtc.host_candidates": "loopback"})
    client = await aiohttp_client(create_app(s, tts=ToneTTS()))
    resp = await client.get("/ice-servers")
    assert resp.status == 200 and await resp.json() == {"iceServers": []}


async def test_web_files_are_served_and_misses_are_json(aiohttp_client) -> None:
    from rtc_server.app import create_app
    from tests.fakes.tts import ToneTTS

    s = settings(**{"webrtc.host_candidates": "loopback"})
    client = await aiohttp_client(create_app(s, tts=ToneTTS()))
    resp = await client.get("/web/call.js")
    assert resp.status == 200 and "RTCPeerConnection" in await resp.text()
    for path in ("/web/nope.js", "/web/..%2F..%2Fconfig%2Fdefaults.yaml", "/web/"):
        resp = await client.get(path)
        assert resp.status == 404, path
        body = await resp.json()
        assert body["error"] == "not_found" and "/" not in body["detail"]
