"""Access control (rtc_server/access.py): API keys on admin routes, the offer token, CORS,
per-client rate limits with an injected clock, body size limits, secrets kept out of logs,
and the bot passing its token and key on a real loopback call."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from config import load_settings
from rtc_server.access import (
    ADMIN_ROUTES,
    AccessControl,
    RateLimiter,
    redact_query_secrets,
)
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.browser import JsError, chromium, js, js_await, wait_js, write_tone_wav
from tests.conftest import ROOT, free_port, start_server, stop_server
from tests.fakes.clock import FakeClock
from tests.fakes.prepare import FakeAnalyzer, FakePrepare
from tests.fakes.tts import ToneTTS

pytestmark = pytest.mark.timeout(120)

KEY_A = "adm-key-Aq7Zk2Lw9"
KEY_B = "adm-key-Bx4Rt8Pn1"
TOKEN = "offer-tok-Hs6Dm3Vy5"
WRONG = "wrong-secret-Jc2Fq8Ub0"
ORIGIN = "https://app.example.test"
REMOTE = {"X-Forwarded-For": "203.0.113.7"}  # a client elsewhere (trust_forwarded_for)

# (method, path to request, canonical route) for every admin route; the path gives answers
# that are not 401/403 once access is granted (404 for unknown ids, 400 for no body).
ADMIN_REQUESTS = [
    ("GET", "/sessions", "/sessions"),
    ("DELETE", "/sessions/0123456789abcdef0123456789abcdef", "/sessions/{session_id}"),
    ("POST", "/avatars", "/avatars"),
    ("DELETE", "/avatars/av_000000000000", "/avatars/{avatar_id}"),
    ("GET", "/cache/stats", "/cache/stats"),
    ("DELETE", "/cache", "/cache"),
    ("POST", "/cache/cleanup", "/cache/cleanup"),
    ("GET", "/metrics", "/metrics"),
    ("GET", "/health/detailed", "/health/detailed"),
]
PUBLIC_REQUESTS = [
    ("GET", "/"),
    ("GET", "/register"),
    ("GET", "/web/call.js"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/avatars"),
    ("GET", "/avatars/default"),
    ("GET", "/avatars/default/thumbnail"),
    ("GET", "/v1/render/no-such-job"),
    ("GET", "/v1/results/" + "0" * 64 + "/timeline.json"),
]


# the same for the cluster's admin routes: (method, path, route, role of the app that has it)
CLUSTER_ADMIN_REQUESTS = [
    ("POST", "/cluster/drain", "/cluster/drain", "node"),
    ("GET", "/cluster/nodes", "/cluster/nodes", "front"),
    ("POST", "/cluster/nodes/n1/drain", "/cluster/nodes/{node_id}/drain", "front"),
]


def test_the_admin_request_list_covers_every_admin_route():
    listed = {(m, route) for m, _, route in ADMIN_REQUESTS}
    listed |= {(m, route) for m, _, route, _ in CLUSTER_ADMIN_REQUESTS}
    assert listed == set(ADMIN_ROUTES)


@pytest.mark.parametrize("method, path, route, role", CLUSTER_ADMIN_REQUESTS)
async def test_cluster_admin_routes_want_a_key(aiohttp_client, tmp_path, method, path, route,
                                               role):
    from rtc_server.cluster.front import create_front_app

    overrides = {"access.api_keys": [KEY_A], "cluster.role": role,
                 # nothing listens there: these requests never get past access control
                 "cluster.redis_url": "redis://127.0.0.1:9/0"}
    if role == "front":
        app = create_front_app(load_settings(env={}, overrides=overrides))
    else:
        app = make_app(tmp_path, **overrides)
    client = await aiohttp_client(app)
    await refused(await client.request(method, path), 401, "unauthorized")
    await refused(await client.request(method, path, headers={"X-API-Key": WRONG}), 403,
                  "forbidden")
    await granted(await client.request(method, path, headers={"X-API-Key": KEY_A}))


def make_app(tmp_path, **overrides) -> web.Application:
    base = {
        "webrtc.host_candidates": "loopback",
        "avatars.data_dir": str(tmp_path / "data"),
        "conversation.listen": False,
        "server.max_body_bytes": 65536,
    }
    base.update(overrides)
    app = create_app(
        load_settings(env={}, overrides=base),
        tts=ToneTTS(),
        prepare=FakePrepare(),
        analyzer_factory=FakeAnalyzer,
    )
    # /metrics and /health/detailed may not exist yet: a stand-in keeps the rule testable
    present = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    for path in ("/metrics", "/health/detailed"):
        if path not in present:
            app.router.add_get(path, _stand_in)
    return app


async def _stand_in(request: web.Request) -> web.Response:
    return web.json_response({"stand_in": True})


@pytest.fixture
def start(aiohttp_client, tmp_path):
    async def start(**overrides):
        app = make_app(tmp_path, **overrides)
        return app, await aiohttp_client(app)

    return start


async def body_of(resp) -> dict:
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    return await resp.json()


async def refused(resp, status: int, error: str) -> dict:
    assert resp.status == status, (resp.status, await resp.text())
    body = await body_of(resp)
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"]
    return body


async def granted(resp) -> None:
    """Past access control: whatever the route answers, it is not an access refusal."""
    assert resp.status not in (401, 403, 429), (resp.status, await resp.text())


# --------------------------------------------------------------------------- admin routes


@pytest.mark.parametrize("method, path, route", ADMIN_REQUESTS)
async def test_admin_routes_without_keys_answer_loopback_only(start, method, path, route):
    _, client = await start(**{"access.trust_forwarded_for": True})
    await granted(await client.request(method, path))  # the test client is on 127.0.0.1
    resp = await client.request(method, path, headers=REMOTE)
    body = await refused(resp, 403, "forbidden")
    assert "access.api_keys" in body["detail"]
    # a key does not help when the server has none
    resp = await client.request(method, path, headers={**REMOTE, "X-API-Key": KEY_A})
    await refused(resp, 403, "forbidden")


@pytest.mark.parametrize("method, path, route", ADMIN_REQUESTS)
async def test_admin_routes_with_keys(start, method, path, route):
    _, client = await start(**{"access.api_keys": [KEY_A, KEY_B]})
    resp = await client.request(method, path)  # loopback gets no free pass now
    await refused(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for headers in ({"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG},
                    {"Authorization": f"Bearer {KEY_A}x"}, {"X-API-Key": KEY_A[:-1]}):
        await refused(await client.request(method, path, headers=headers), 403, "forbidden")
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"X-API-Key": KEY_B},
                    {"authorization": f"bearer {KEY_B}"}):
        await granted(await client.request(method, path, headers=headers))


async def test_admin_route_answers_with_key(start):
    """The right key reaches the real handler (not only 'not refused')."""
    _, client = await start(**{"access.api_keys": [KEY_A]})
    resp = await client.get("/sessions", headers={"X-API-Key": KEY_A})
    assert resp.status == 200 and (await resp.json()) == {"sessions": []}
    resp = await client.get("/cache/stats", headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status == 200 and "entries" in await resp.json()
    # HEAD is GET without a body: refused the same way
    assert (await client.head("/sessions")).status == 401


async def test_a_non_bearer_authorization_counts_as_missing(start):
    _, client = await start(**{"access.api_keys": [KEY_A]})
    resp = await client.get("/sessions", headers={"Authorization": f"Basic {KEY_A}"})
    await refused(resp, 401, "unauthorized")


@pytest.mark.parametrize("method, path", PUBLIC_REQUESTS)
async def test_public_routes_stay_open(start, method, path):
    _, client = await start(**{"access.api_keys": [KEY_A], "access.offer_token": TOKEN,
                               "access.trust_forwarded_for": True})
    resp = await client.request(method, path, headers=REMOTE)
    await granted(resp)


async def test_forwarded_for_is_ignored_unless_trusted(start):
    _, client = await start()
    # trust_forwarded_for is off: the header cannot make a client remote (or local)
    await granted(await client.get("/sessions", headers=REMOTE))


async def test_the_address_the_proxy_appended_decides(start):
    _, client = await start(**{"access.trust_forwarded_for": True})
    # a client that claims to be local in front of the proxy's own entry is still remote
    resp = await client.get("/sessions", headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.7"})
    await refused(resp, 403, "forbidden")
    await granted(await client.get("/sessions", headers={"X-Forwarded-For": "203.0.113.7, ::1"}))
    await granted(await client.get("/sessions", headers={"X-Forwarded-For": "127.0.0.1:5123"}))
    # an entry that is no address is a client of its own, never the proxy's loopback
    for odd in ("unknown", "_hidden", "127.0.0.1.nip.io", "[::1"):
        resp = await client.get("/sessions", headers={"X-Forwarded-For": odd})
        await refused(resp, 403, "forbidden")


# --------------------------------------------------------------------------- forwarding headers

XFF = "X-Forwarded-For"


async def test_a_spoofed_first_header_line_does_not_make_a_client_local(start):
    """The reported defect: the first X-Forwarded-For line (the client's own) was read."""
    _, client = await start(**{"access.trust_forwarded_for": True})
    for lines in (["127.0.0.1", "203.0.113.7"],
                  ["::1, 127.0.0.1", "203.0.113.7"],
                  ["127.0.0.1", "10.9.8.7, 203.0.113.7"],
                  ["127.0.0.1", "203.0.113.7:4711"]):
        resp = await client.get("/sessions", headers=[(XFF, line) for line in lines])
        await refused(resp, 403, "forbidden")
    # the entry the proxy appended last decides, whichever line holds it
    await granted(await client.get("/sessions", headers=[(XFF, "203.0.113.7"), (XFF, "::1")]))


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded", "x-real-ip"])
async def test_a_spoofed_entry_does_not_change_the_rate_limit_key(start, header):
    """Varying what a client writes in front of the proxy's entry gives it no new bucket."""
    name, value = {"x-forwarded-for": (XFF, "{}"), "forwarded": ("Forwarded", "for={}"),
                   "x-real-ip": ("X-Real-IP", "{}")}[header]
    app, client = await start(**{"access.trust_forwarded_for": True, "access.offer_per_min": 3,
                                 "access.forwarded_header": header})
    app[SERVICES].access.clock = FakeClock()
    statuses = []
    for i in range(8):
        headers = [(name, value.format(f"198.51.100.{i}")), (name, value.format("203.0.113.7"))]
        statuses.append((await client.post("/offer", json={}, headers=headers)).status)
    assert statuses == [400] * 3 + [429] * 5
    # another client behind the same proxy has a bucket of its own
    headers = [(name, value.format("198.51.100.0")), (name, value.format("203.0.113.8"))]
    await refused(await client.post("/offer", json={}, headers=headers), 400, "bad_request")


async def test_only_the_configured_header_is_read(start):
    """A header the proxy passes through untouched is the client's: it never counts."""
    _, client = await start(**{"access.trust_forwarded_for": True,
                               "access.forwarded_header": "forwarded"})
    spoof = {XFF: "127.0.0.1", "X-Real-IP": "127.0.0.1"}
    resp = await client.get("/sessions", headers={**spoof, "Forwarded": "for=203.0.113.7"})
    await refused(resp, 403, "forbidden")
    resp = await client.get("/sessions", headers={
        "Forwarded": 'for=127.0.0.1;proto=http, for="[2001:db8:cafe::17]:4711";proto=https'})
    await refused(resp, 403, "forbidden")
    await granted(await client.get("/sessions", headers={"Forwarded": 'for="[::1]:5000"'}))


async def test_headers_count_only_on_connections_from_a_trusted_proxy(start):
    # the test client connects from 127.0.0.1, which is not one of the proxies
    app, client = await start(**{"access.trust_forwarded_for": True,
                                 "access.trusted_proxies": ["10.0.0.0/8"],
                                 "access.offer_per_min": 2})
    app[SERVICES].access.clock = FakeClock()
    await granted(await client.get("/sessions", headers=REMOTE))  # still the loopback peer
    statuses = [(await client.post("/offer", json={}, headers={XFF: f"198.51.100.{i}"})).status
                for i in range(4)]
    assert statuses == [400, 400, 429, 429]  # one bucket: the peer's


async def test_entries_of_trusted_proxies_are_skipped(start):
    _, client = await start(**{"access.trust_forwarded_for": True,
                               "access.trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    for chain in ("127.0.0.1, 203.0.113.7, 10.1.1.1",  # a client behind two proxies
                  "203.0.113.7, 127.0.0.1",
                  "10.0.0.7, 10.0.0.3",  # every entry a proxy: the leftmost is the client
                  "127.0.0.1, garbage, 10.0.0.3"):
        await refused(await client.get("/sessions", headers={XFF: chain}), 403, "forbidden")
    resp = await client.get("/sessions", headers=[(XFF, "203.0.113.7"),
                                                   (XFF, "127.0.0.1, 10.2.3.4")])
    await refused(resp, 403, "forbidden")
    # a client on this machine, through the local proxy
    await granted(await client.get("/sessions", headers={XFF: "127.0.0.1"}))


def control(**overrides: object) -> AccessControl:
    return AccessControl(load_settings(env={}, overrides={"access.trust_forwarded_for": True,
                                                          **overrides}))


def client_of(ctl: AccessControl, peer: str, headers: list[tuple[str, str]]) -> str:
    request = make_mocked_request("GET", "/", headers=CIMultiDict(headers))
    return ctl.client(request.clone(remote=peer))


PEER = "10.0.0.2"
# group -> (settings, [(peer, header lines, the client)])
FORWARDING_CASES: dict[str, tuple[dict, list[tuple[str, list[tuple[str, str]], str]]]] = {
    "x-forwarded-for": ({}, [
        (PEER, [(XFF, "127.0.0.1, 203.0.113.7")], "203.0.113.7"),  # nginx appending
        (PEER, [(XFF, "127.0.0.1"), (XFF, "203.0.113.7")], "203.0.113.7"),
        (PEER, [(XFF, "127.0.0.1, 8.8.8.8"), (XFF, "203.0.113.7, 198.51.100.9")],
         "198.51.100.9"),
        (PEER, [(XFF, "198.51.100.2:5555")], "198.51.100.2"),
        (PEER, [(XFF, "[2001:db8::1]:4711")], "2001:db8::1"),
        (PEER, [(XFF, "2001:DB8::1")], "2001:db8::1"),
        (PEER, [(XFF, "::ffff:198.51.100.2")], "198.51.100.2"),
        (PEER, [(XFF, "203.0.113.7, , "), (XFF, "")], "203.0.113.7"),
        (PEER, [(XFF, "127.0.0.1, bogus")], "forwarded:bogus"),
        (PEER, [(XFF, "127.0.0.1"), (XFF, "unknown")], "forwarded:unknown"),
        (PEER, [(XFF, "127.0.0.1:x")], "forwarded:127.0.0.1:x"),
        (PEER, [(XFF, "[127.0.0.1]")], "forwarded:[127.0.0.1]"),
        (PEER, [], PEER),
        (PEER, [("Forwarded", "for=198.51.100.1"), ("X-Real-IP", "198.51.100.1")], PEER),
    ]),
    "two proxies counted": ({"access.forwarded_hops": 2}, [
        (PEER, [(XFF, "127.0.0.1, 198.51.100.9, 10.0.0.7")], "198.51.100.9"),
        (PEER, [(XFF, "127.0.0.1, 198.51.100.9"), (XFF, "10.0.0.7")], "198.51.100.9"),
        (PEER, [(XFF, "198.51.100.9")], "198.51.100.9"),  # came in through the second only
    ]),
    "forwarded": ({"access.forwarded_header": "forwarded"}, [
        (PEER, [("Forwarded", "for=127.0.0.1, for=203.0.113.7;proto=https")], "203.0.113.7"),
        (PEER, [("Forwarded", "for=127.0.0.1"),
                ("Forwarded", 'for="[2001:db8:cafe::17]:4711";by=_proxy')], "2001:db8:cafe::17"),
        (PEER, [("Forwarded", 'for=127.0.0.1, proto=https;FOR="198.51.100.3:8080"')],
         "198.51.100.3"),
        (PEER, [("Forwarded", "for=127.0.0.1, for=_gazonk")], "forwarded:_gazonk"),
        (PEER, [("Forwarded", "for=127.0.0.1, for=unknown")], "forwarded:unknown"),
        (PEER, [("Forwarded", "for=127.0.0.1, by=10.0.0.2;proto=https")], "forwarded:unknown"),
        (PEER, [("Forwarded", 'for=8.8.8.8, for="127.0.0.1, 8.8.8.8"')],
         "forwarded:127.0.0.1, 8.8.8.8"),
        # a stray quote the client left open does not swallow the proxy's element
        (PEER, [("Forwarded", 'for="127.0.0.1, for=203.0.113.7')], "203.0.113.7"),
        (PEER, [("Forwarded", 'for="x\\", for="[2001:db8::2]:80"')], "2001:db8::2"),
        (PEER, [("Forwarded", 'for="127.0.0.1;by=", for=203.0.113.7;proto=http')],
         "203.0.113.7"),
        (PEER, [(XFF, "198.51.100.1")], PEER),
    ]),
    "x-real-ip": ({"access.forwarded_header": "x-real-ip"}, [
        (PEER, [("X-Real-IP", "127.0.0.1"), ("X-Real-IP", "203.0.113.7")], "203.0.113.7"),
        (PEER, [("X-Real-IP", "2001:db8::5")], "2001:db8::5"),
        (PEER, [(XFF, "198.51.100.1")], PEER),
    ]),
    "trusted proxies": ({"access.trusted_proxies": ["10.0.0.0/8", "fd00::/8"]}, [
        ("198.51.100.50", [(XFF, "127.0.0.1")], "198.51.100.50"),  # not from a proxy
        ("127.0.0.1", [(XFF, "203.0.113.7")], "127.0.0.1"),
        (PEER, [(XFF, "127.0.0.1, 203.0.113.7, 10.0.0.9")], "203.0.113.7"),
        (PEER, [(XFF, "127.0.0.1"), (XFF, "203.0.113.7"), (XFF, "10.3.0.1, 10.0.0.9")],
         "203.0.113.7"),
        ("::ffff:10.0.0.2", [(XFF, "203.0.113.7")], "203.0.113.7"),
        ("fd00::1", [(XFF, "127.0.0.1, 2001:db8::7, [fd00::2]:80")], "2001:db8::7"),
        (PEER, [(XFF, "10.0.0.7, 10.0.0.9")], "10.0.0.7"),
        (PEER, [(XFF, "203.0.113.7, garbage, 10.0.0.9")], "forwarded:garbage"),
    ]),
}


@pytest.mark.parametrize("group", list(FORWARDING_CASES))
def test_the_client_behind_proxies(group):
    settings, cases = FORWARDING_CASES[group]
    ctl = control(**settings)
    got = [(peer, lines, client_of(ctl, peer, lines)) for peer, lines, _ in cases]
    assert got == [(peer, lines, want) for peer, lines, want in cases]


# --------------------------------------------------------------------------- offer token


@pytest.mark.parametrize("path", ["/offer", "/v1/render"])
async def test_offer_token(start, path):
    _, client = await start(**{"access.offer_token": TOKEN, "access.api_keys": [KEY_A]})
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        resp = await client.post(path, json={}, headers=headers)
        await refused(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # the token, or an admin key, lets the request through to its own checks (400: no fields)
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"X-API-Key": KEY_A},
                    {"Authorization": f"Bearer {KEY_A}"}):
        resp = await client.post(path, json={}, headers=headers)
        await refused(resp, 400, "bad_request")


async def test_without_offer_token_offers_are_open(start):
    _, client = await start(**{"access.api_keys": [KEY_A]})
    await refused(await client.post("/offer", json={}), 400, "bad_request")
    await refused(await client.post("/v1/render", json={}), 400, "bad_request")


# --------------------------------------------------------------------------- CORS


async def test_cors_preflight_for_an_allowed_origin(start):
    _, client = await start(**{"access.cors_origins": [ORIGIN, "https://other.example.test"]})
    for path in ("/offer", "/avatars/av_000000000000", "/no/such/route"):
        resp = await client.options(path, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert resp.status == 204, await resp.text()
        h = resp.headers
        assert h["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in h["Vary"]
        assert {"POST", "GET", "DELETE"} <= {m.strip() for m in
                                              h["Access-Control-Allow-Methods"].split(",")}
        allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "x-api-key", "content-type"} <= allowed
        assert int(h["Access-Control-Max-Age"]) > 0


async def test_cors_preflight_from_another_origin_gets_no_cors_headers(start):
    _, client = await start(**{"access.cors_origins": [ORIGIN]})
    resp = await client.options("/offer", headers={
        "Origin": "https://evil.example.test", "Access-Control-Request-Method": "POST"})
    await refused(resp, 403, "forbidden")
    assert not [k for k in resp.headers if k.lower().startswith("access-control-")]


async def test_cors_headers_on_answers_and_errors(start):
    _, client = await start(**{"access.cors_origins": [ORIGIN], "access.api_keys": [KEY_A],
                               "access.offer_per_min": 1})
    answers = [
        await client.get("/health", headers={"Origin": ORIGIN}),
        await client.get("/avatars/av_000000000000", headers={"Origin": ORIGIN}),  # 404
        await client.get("/sessions", headers={"Origin": ORIGIN}),  # 401
        await client.post("/offer", json={}, headers={"Origin": ORIGIN}),  # 400
        await client.post("/offer", json={}, headers={"Origin": ORIGIN}),  # 429
    ]
    assert [r.status for r in answers] == [200, 404, 401, 400, 429]
    for resp in answers:
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in resp.headers["Vary"]
        assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
    other = await client.get("/health", headers={"Origin": "https://evil.example.test"})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers


async def test_no_cors_origins_means_no_cors_headers(start):
    _, client = await start()
    resp = await client.get("/health", headers={"Origin": ORIGIN})
    assert resp.status == 200
    assert not [k for k in resp.headers if k.lower().startswith("access-control-")]
    resp = await client.options("/offer", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert resp.status == 403
    assert not [k for k in resp.headers if k.lower().startswith("access-control-")]


async def test_cors_star_allows_any_origin(start):
    _, client = await start(**{"access.cors_origins": ["*"]})
    resp = await client.get("/health", headers={"Origin": "https://anyone.example.test"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://anyone.example.test"
    resp = await client.options("/v1/render", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


# --------------------------------------------------------------------------- rate limits


async def test_offer_rate_limit_with_an_injected_clock(start):
    app, client = await start(**{"access.offer_per_min": 3})
    clock = FakeClock()
    app[SERVICES].access.clock = clock
    for _ in range(3):
        await refused(await client.post("/offer", json={}), 400, "bad_request")
    resp = await client.post("/offer", json={})
    body = await refused(resp, 429, "rate_limited")
    assert resp.headers["Retry-After"] == "20"  # 3 a minute: one token every 20 s
    assert "3" in body["detail"]
    clock.advance(19.0)
    resp = await client.post("/offer", json={})
    await refused(resp, 429, "rate_limited")
    assert resp.headers["Retry-After"] == "1"
    clock.advance(1.0)
    await refused(await client.post("/offer", json={}), 400, "bad_request")
    await refused(await client.post("/offer", json={}), 429, "rate_limited")
    clock.advance(60.0)  # full again: three more
    for _ in range(3):
        await refused(await client.post("/offer", json={}), 400, "bad_request")
    await refused(await client.post("/offer", json={}), 429, "rate_limited")


async def test_rate_limits_are_per_client_and_per_group(start):
    app, client = await start(**{"access.offer_per_min": 2, "access.render_per_min": 1,
                                 "access.avatars_per_min": 2, "access.trust_forwarded_for": True})
    app[SERVICES].access.clock = FakeClock()
    a, b = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
    for _ in range(2):
        await refused(await client.post("/offer", json={}, headers=a), 400, "bad_request")
    await refused(await client.post("/offer", json={}, headers=a), 429, "rate_limited")
    # another client has its own bucket, and other groups are separate
    await refused(await client.post("/offer", json={}, headers=b), 400, "bad_request")
    await refused(await client.post("/v1/render", json={}, headers=a), 400, "bad_request")
    await refused(await client.post("/v1/render", json={}, headers=a), 429, "rate_limited")
    # POST and DELETE /avatars share the avatars bucket (the client is local: admin allowed)
    local = {"X-Forwarded-For": "127.0.0.1"}
    await granted(await client.post("/avatars", headers=local))
    await granted(await client.delete("/avatars/av_000000000000", headers=local))
    await refused(await client.delete("/avatars/av_000000000000", headers=local), 429,
                  "rate_limited")
    # routes outside the groups are never limited
    for _ in range(10):
        assert (await client.get("/health", headers=a)).status == 200


async def test_rate_limit_zero_disables(start):
    app, client = await start(**{"access.offer_per_min": 0})
    app[SERVICES].access.clock = FakeClock()
    for _ in range(40):
        await refused(await client.post("/offer", json={}), 400, "bad_request")


def test_limiter_memory_stays_bounded():
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, max_clients=100)
    for i in range(1000):
        assert limiter.take(f"10.0.{i // 256}.{i % 256}") == 0.0
    assert len(limiter) == 100  # capped: the least recently seen went first
    clock.advance(59.0)
    limiter.take("10.9.9.9")
    assert len(limiter) == 100  # nothing idle for a minute yet: the cap holds
    clock.advance(1.0)
    limiter.take("10.9.9.8")
    assert len(limiter) == 2  # the idle (hence full) buckets are gone


def test_limiter_refills_continuously():
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)  # one token every 10 s
    assert [limiter.take("c") for _ in range(6)] == [0.0] * 6
    assert limiter.take("c") == pytest.approx(10.0)
    clock.advance(2.5)
    assert limiter.take("c") == pytest.approx(7.5)
    clock.advance(7.5)
    assert limiter.take("c") == 0.0
    assert limiter.take("c") == pytest.approx(10.0)


# --------------------------------------------------------------------------- body limits


async def test_oversized_json_bodies_are_413(start):
    _, client = await start(**{"access.api_keys": [KEY_A]})
    big = {"sdp": "v=0\r\n" + "a" * 70_000, "type": "offer"}
    for path in ("/offer", "/v1/render"):
        await refused(await client.post(path, json=big), 413, "body_too_large")

    async def chunked():  # no Content-Length: refused while reading, at the limit
        yield b'{"sdp": "'
        for _ in range(20):
            yield b"a" * 8192

    for path in ("/offer", "/v1/render"):
        resp = await client.post(path, data=chunked(),
                                 headers={"Content-Type": "application/json"})
        await refused(resp, 413, "body_too_large")
    # a body where none is expected is refused before the handler too
    resp = await client.delete("/cache", data=b"x" * 70_000, headers={"X-API-Key": KEY_A})
    await refused(resp, 413, "body_too_large")


async def test_oversized_uploads_are_413(start):
    _, client = await start(**{"render.max_audio_bytes": 100_000,
                               "avatars.max_upload_bytes": 100_000})
    blob = b"\0" * 150_000
    form = aiohttp.FormData()
    form.add_field("audio", blob, filename="a.wav", content_type="audio/wav")
    await refused(await client.post("/v1/render", data=form), 413, "too_large")
    form = aiohttp.FormData()
    form.add_field("name", "Big")
    form.add_field("file", blob, filename="a.png", content_type="image/png")
    await refused(await client.post("/avatars", data=form), 413, "too_large")

    pulled = 0

    async def stream_upload(field: str):
        """A multipart body of 20 MB without Content-Length, counting what was pulled."""
        nonlocal pulled
        head = (f'--B\r\nContent-Disposition: form-data; name="{field}"; filename="x"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        yield head
        for _ in range(320):
            pulled += 65536
            yield b"\0" * 65536

    for path, field in (("/v1/render", "audio"), ("/avatars", "file")):
        pulled = 0
        try:
            resp = await client.post(path, data=stream_upload(field),
                                     headers={"Content-Type": "multipart/form-data; boundary=B"})
        except aiohttp.ClientError:
            pass  # the server may close while the client still sends; it read little
        else:
            await refused(resp, 413, "too_large")
        assert pulled < 5_000_000, f"{path}: the server let {pulled} bytes through"


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_reach_logs_or_answers(start, caplog):
    caplog.set_level(logging.DEBUG)
    app, client = await start(**{"access.api_keys": [KEY_A, KEY_B], "access.offer_token": TOKEN,
                                 "access.offer_per_min": 2})
    app[SERVICES].access.clock = FakeClock()
    answers = []
    for headers in ({"X-API-Key": KEY_A}, {"X-API-Key": WRONG},
                    {"Authorization": f"Bearer {KEY_B}"}, {"Authorization": f"Bearer {WRONG}"},
                    {"Authorization": f"Bearer {TOKEN}"}):
        answers.append(await client.get("/sessions", headers=headers))
        answers.append(await client.post("/offer", json={}, headers=headers))
    # the call page carries the token in its address; its requests send it as Referer
    answers.append(await client.get(f"/?token={TOKEN}"))
    answers.append(await client.get("/web/call.js", headers={
        "Referer": f"http://127.0.0.1/?avatar=default&token={TOKEN}"}))
    texts = [await r.text() for r in answers]
    assert {r.status for r in answers} >= {200, 401, 403, 429}
    secrets = (KEY_A, KEY_B, TOKEN, WRONG)
    for text in texts:
        assert not any(s in text for s in secrets), text[:300]
    assert caplog.records, "nothing was logged: the test would prove nothing"
    assert any("rejected API key from 127.0.0.1" in r.getMessage() for r in caplog.records)
    assert any("aiohttp.access" == r.name for r in caplog.records)
    for record in caplog.records:
        dumped = record.getMessage() + " " + repr(vars(record))
        assert not any(s in dumped for s in secrets), dumped[:500]


def test_redact_query_secrets():
    line = 'GET /?avatar=x&token=abc123 HTTP/1.1" 200 "http://h/?token=zz9&a=1"'
    out = redact_query_secrets(line)
    assert "abc123" not in out and "zz9" not in out and "avatar=x" in out and "a=1" in out


# --------------------------------------------------------------------------- the bot


@pytest.mark.e2e
async def test_bot_passes_its_token_and_key(loopback_only, aiohttp_client, tmp_path):
    use_host_candidates("loopback")
    app = make_app(tmp_path, **{"access.offer_token": TOKEN, "access.api_keys": [KEY_A],
                                "sessions.connect_timeout_s": 5.0})
    client = await aiohttp_client(app)
    url = str(client.make_url("")).rstrip("/")

    stranger = Bot(url)
    try:
        with pytest.raises(RuntimeError, match="401"):
            await stranger.connect()
    finally:
        await stranger.aclose()
    assert not app[SERVICES].sessions

    bot = Bot(url, token=TOKEN, api_key=KEY_A)
    no_key = Bot(url, token=TOKEN)
    try:
        await bot.connect()
        await bot.wait_first_video(10)
        assert bot.video.arrival, "no video arrived"
        described = await bot.server_session()
        assert described is not None and described["id"] == bot.session_id
        # the token alone opens the call but not the admin route
        no_key.session_id = bot.session_id
        with pytest.raises(RuntimeError, match="401"):
            await no_key.server_session()
    finally:
        await bot.aclose()
        await no_key.aclose()


@pytest.mark.e2e
@pytest.mark.browser
def test_pages_send_the_token_and_the_api_key(loopback_only, artifacts_dir, tmp_path):
    """The call page sends ?token= / #token= with its offer; the register page sends the API
    key field as X-API-Key and says plainly what a 401 and a 403 mean."""
    from selenium.webdriver.common.by import By

    port = free_port()
    proc = start_server(port, {
        "AVATAR_ACCESS__OFFER_TOKEN": TOKEN, "AVATAR_ACCESS__API_KEYS": json.dumps([KEY_A]),
        "AVATAR_AVATARS__DATA_DIR": str(tmp_path / "data"), "AVATAR_CONVERSATION__LISTEN": "false"})
    url = f"http://127.0.0.1:{port}"
    tone = write_tone_wav(tmp_path / "mic.wav", seconds=2.0)
    try:
        with chromium(tone, tmp_path / "profile") as driver:
            for address, complaint in ((f"{url}/", "only takes calls with an access token"),
                                       (f"{url}/?token={WRONG}", "did not accept the access")):
                driver.get(address)
                wait_js(driver, "window.avatarCall !== undefined", message="call.js to load")
                with pytest.raises(JsError, match=complaint):
                    js_await(driver, "avatarCall.start()", timeout=30)
            for address in (f"{url}/?token={TOKEN}", f"{url}/#token={TOKEN}"):
                driver.get(address)
                wait_js(driver, "window.avatarCall !== undefined", message="call.js to load")
                js_await(driver, "avatarCall.start()", timeout=30)
                wait_js(driver, "avatarCall.state === 'connected'", timeout=20)
                js(driver, "avatarCall.stop()")

            driver.get(f"{url}/register")
            wait_js(driver, "window.avatarRegister && avatarRegister.avatars")
            image = ROOT / "avatars" / "default" / "astronaut.png"
            for key, status, words in ((None, 401, "An API key is needed"),
                                       (WRONG, 403, "The API key was not accepted")):
                if key is not None:
                    driver.find_element(By.ID, "api-key").send_keys(key)
                driver.find_element(By.ID, "file").send_keys(str(image))
                wait_js(driver, "avatarRegister.file !== null && avatarRegister.phase === 'idle'")
                driver.find_element(By.ID, "upload").click()
                wait_js(driver, "avatarRegister.phase === 'failed'", timeout=30)
                assert js(driver, "avatarRegister.lastResult.status") == status
                assert words in driver.find_element(By.ID, "result").text
            driver.refresh()  # the key stays for this tab
            wait_js(driver, "window.avatarRegister !== undefined")
            assert js(driver, "document.getElementById('api-key').value") == WRONG
    finally:
        stop_server(proc)
