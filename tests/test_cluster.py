"""The cluster's parts without peer connections: the routing order, the registry on a real
redis-server (heartbeat expiry, clean exit, gone nodes), a node's room, the settings, and a
front (in process) before fake nodes that refuse, fail or are not there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from config import ConfigError, load_settings
from rtc_server.cluster.front import Router, create_front_app
from rtc_server.cluster.node import node_room
from rtc_server.cluster.registry import NodeView, Registry
from rtc_server.headroom import Headroom
from rtc_server.services import Services
from rtc_server.slots import SessionSlots
from tests.test_headroom import feed

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def view(node_id: str, *, room: int, sessions: int = 0, state: str = "ready") -> NodeView:
    return NodeView(id=node_id, url=f"http://{node_id}", state=state, sessions=sessions,
                    session_ids=(), room=room, headroom={}, seq=1, last_seen_s=0.1)


# --- routing -----------------------------------------------------------------------------------
def test_router_prefers_room_then_fewer_calls_and_skips_full_or_draining_nodes():
    r = Router()
    nodes = [view("a", room=2, sessions=1), view("b", room=5, sessions=3),
             view("c", room=2, sessions=0), view("full", room=0),
             view("d", room=9, state="draining")]
    assert [n.id for n in r.order(nodes)] == ["b", "c", "a"]


def test_router_counts_offers_in_flight_against_their_node():
    r = Router()
    a, b = view("a", room=2), view("b", room=1)
    with r.sending(a):
        assert [n.id for n in r.order([a, b])] == ["b", "a"]  # 1 against 1: b has fewer
        with r.sending(a), r.sending(b):
            assert r.order([a, b]) == []
    assert [n.id for n in r.order([a, b])] == ["a", "b"]


# --- a node's room -----------------------------------------------------------------------------
def services(max_live: int = 3, headroom: Headroom | None = None) -> Services:
    settings = load_settings(env={})
    return Services(settings=settings, access=None,  # type: ignore[arg-type]
                    slots=SessionSlots(max_live=max_live, max_pending=4,
                                       max_pending_per_client=4),
                    observability=None,  # type: ignore[arg-type]
                    headroom=headroom or Headroom(enabled=False))


def test_room_is_the_free_slots_capped_by_measured_headroom_and_zero_when_draining():
    s = services(max_live=3)
    assert node_room(s) == 3
    slot = s.slots.reserve("x")
    slot.connected()
    assert node_room(s) == 2
    # headroom measured: 2 cores, 1.5 busy, a call costs 0.3 -> one more fits (0.3 of 0.3)
    h = Headroom(cores=2, cpu_target=0.9, call_cpu_cores=0.3)
    feed(h, seconds=3, busy_cores=1.5, server_cores=0.3, calls=1)
    s.headroom = h
    assert node_room(s) == 1
    feed(h, seconds=3, busy_cores=1.7, server_cores=0.3, calls=1)  # nothing fits: refused
    h._samples.clear()
    feed(h, seconds=3, busy_cores=1.7, server_cores=0.3, calls=1)
    assert node_room(s) == 0
    s.headroom = Headroom(enabled=False)
    s.draining.set()
    assert node_room(s) == 0


def test_slots_tell_when_a_call_is_taken_connects_and_ends():
    changes: list[int] = []
    slots = SessionSlots(max_live=2, max_pending=2, max_pending_per_client=2)
    slots.on_change = lambda: changes.append(slots.taken)
    slot = slots.reserve("x")
    slot.connected()
    slot.release()
    slot.release()  # idempotent: no second change
    assert changes == [1, 1, 0]


# --- settings ----------------------------------------------------------------------------------
def test_cluster_settings_from_the_environment_and_their_checks():
    s = load_settings(env={"AVATAR_CLUSTER__ROLE": "front",
                           "AVATAR_CLUSTER__REDIS_URL": "redis://r:6379/2"})
    assert (s.cluster.role, s.cluster.redis_url) == ("front", "redis://r:6379/2")
    assert load_settings(env={}).cluster.role == "standalone"
    with pytest.raises(ConfigError, match="cluster.role"):
        load_settings(env={"AVATAR_CLUSTER__ROLE": "leader"})
    with pytest.raises(ConfigError, match="node_timeout_s"):
        load_settings(env={"AVATAR_CLUSTER__HEARTBEAT_S": "2",
                           "AVATAR_CLUSTER__NODE_TIMEOUT_S": "3"})
    with pytest.raises(ConfigError, match="node_url"):
        load_settings(env={"AVATAR_CLUSTER__NODE_URL": "ftp://x"})


# --- the registry on a real redis-server -------------------------------------------------------
@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Registry]:
    reg = Registry(redis_url, timeout_s=0.6)
    await reg.redis.flushdb()
    yield reg
    await reg.aclose()


def record(node_id: str, **kw: Any) -> dict[str, Any]:
    return {"id": node_id, "url": f"http://127.0.0.1:1/{node_id}", "state": "ready", "seq": 1,
            "sessions": 0, "session_ids": [], "room": 3, "headroom": {}, **kw}


async def test_a_node_that_stops_heartbeating_is_gone_and_one_that_exits_is_not(registry):
    await registry.publish(record("a", sessions=1, session_ids=["s1"]))
    await registry.publish(record("b"))
    nodes = await registry.nodes()
    assert [n.id for n in nodes] == ["a", "b"]
    assert all(n.state == "ready" and 0 <= (n.last_seen_s or 0) < 0.3 for n in nodes)
    await registry.withdraw(record("b"))
    await asyncio.sleep(0.8)  # a's entry expires: no heartbeat for node_timeout_s
    assert await registry.nodes() == []
    (gone,) = await registry.nodes(with_gone=True)
    assert (gone.id, gone.state, gone.session_ids) == ("a", "gone", ("s1",))
    # a node coming back is live again
    await registry.publish(record("a", seq=2))
    (back,) = await registry.nodes(with_gone=True)
    assert (back.id, back.state, back.seq) == ("a", "ready", 2)


async def test_the_registry_remembers_where_calls_and_jobs_are(registry):
    await registry.remember("session", "s1", "a")
    await registry.remember("job", "j1", "b")
    assert await registry.node_of("session", "s1") == "a"
    assert await registry.node_of("job", "j1") == "b"
    assert await registry.node_of("session", "nope") is None


async def test_a_malformed_record_is_skipped(registry):
    await registry.publish(record("a"))
    await registry.redis.set("avatar:cluster:node:z", "{not json", px=5000)
    await registry.redis.sadd("avatar:cluster:ids", "z")
    assert [n.id for n in await registry.nodes()] == ["a"]


# --- a front before fake nodes -----------------------------------------------------------------
def fake_node(status: int, body: dict[str, Any], seen: list[dict[str, Any]]) -> web.Application:
    async def offer(request: web.Request) -> web.Response:
        seen.append({"body": await request.json(), "xff": request.headers.get("X-Forwarded-For"),
                     "key": request.headers.get("X-API-Key")})
        return web.json_response(body, status=status, headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/offer", offer)
    return app


@pytest.fixture
async def front(redis_url, registry, aiohttp_client):
    settings = load_settings(env={}, overrides={"cluster.role": "front",
                                                "cluster.redis_url": redis_url,
                                                "cluster.node_timeout_s": 5.0})
    return await aiohttp_client(create_front_app(settings))


async def test_the_front_refuses_bad_offers_itself_and_says_when_no_node_has_room(front):
    resp = await front.post("/offer", data="{", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_json"
    resp = await front.post("/offer", json={"sdp": SDP, "type": "answer"})
    assert resp.status == 400
    resp = await front.post("/offer", json={"sdp": SDP, "type": "offer"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"] == "no_capacity"
    ready = await front.get("/ready")
    assert ready.status == 503 and (await ready.json())["checks"] == {"registry": True,
                                                                       "nodes": False}


async def test_the_front_skips_full_and_unreachable_nodes_and_passes_caller_errors(
        front, registry, aiohttp_server):
    seen_full: list[dict[str, Any]] = []
    seen_ok: list[dict[str, Any]] = []
    full = await aiohttp_server(fake_node(503, {"error": "server_full", "detail": "x"}, seen_full))
    ok = await aiohttp_server(fake_node(200, {"sdp": "answer", "type": "answer",
                                              "session_id": "s-ok"}, seen_ok))
    # the most room first: an unreachable node, then a full one, then one that answers
    await registry.publish(record("dead", url="http://127.0.0.1:9", room=9))
    await registry.publish(record("full", url=str(full.make_url("")).rstrip("/"), room=8))
    await registry.publish(record("ok", url=str(ok.make_url("")).rstrip("/"), room=1))
    resp = await front.post("/offer", json={"sdp": SDP, "type": "offer"},
                            headers={"X-API-Key": "k" * 16})
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["node_id"] == "ok" and answer["session_id"] == "s-ok"
    assert resp.headers["X-Node-Id"] == "ok"
    assert len(seen_full) == 1 and len(seen_ok) == 1
    assert seen_ok[0]["body"]["sdp"] == SDP and seen_ok[0]["key"] == "k" * 16
    assert seen_ok[0]["xff"] == "127.0.0.1"  # the caller, for the node's per-client limits
    assert await registry.node_of("session", "s-ok") == "ok"
    metrics = await (await front.get("/metrics")).text()
    assert 'avatar_front_nodes_skipped_total{reason="unreachable"} 1.0' in metrics
    assert 'avatar_front_nodes_skipped_total{reason="full"} 1.0' in metrics
    assert 'avatar_front_offers_total{outcome="routed"} 1.0' in metrics
    # a caller's mistake reported by a node comes back as it is, not tried elsewhere
    seen_bad: list[dict[str, Any]] = []
    bad = await aiohttp_server(fake_node(404, {"error": "not_found", "detail": "no avatar"},
                                         seen_bad))
    await registry.publish(record("bad", url=str(bad.make_url("")).rstrip("/"), room=20))
    resp = await front.post("/offer", json={"sdp": SDP, "type": "offer", "avatar_id": "zz"})
    assert resp.status == 404 and json.loads(await resp.text())["detail"] == "no avatar"
    assert len(seen_ok) == 1


async def test_the_front_lists_nodes_with_state_and_last_heartbeat(front, registry):
    await registry.publish(record("a", sessions=2, room=1))
    body = await (await front.get("/cluster/nodes")).json()
    (node,) = body["nodes"]
    assert {k: node[k] for k in ("id", "state", "sessions", "room")} == {
        "id": "a", "state": "ready", "sessions": 2, "room": 1}
    assert 0 <= node["last_seen_s"] < 1
    resp = await front.post("/cluster/nodes/nope/drain")
    assert resp.status == 404


# --- the node agent ------------------------------------------------------------------------------
class FakeRegistry:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.withdrawn: list[dict[str, Any]] = []

    async def publish(self, record: dict[str, Any]) -> None:
        self.published.append(record)

    async def withdraw(self, record: dict[str, Any]) -> None:
        self.withdrawn.append(record)


def agent(s: Services, registry: FakeRegistry, closed: list[str]) -> Any:
    from rtc_server.cluster.node import NodeAgent

    async def close_all(reason: str, detail: str, timeout_s: float) -> None:
        closed.append(reason)
        s.sessions.clear()

    return NodeAgent(s, registry, close_all=close_all,  # type: ignore[arg-type]
                     node_id="n1", url="http://127.0.0.1:1")


async def test_the_heartbeat_stops_when_cancelled_even_as_a_kick_wakes_it():
    """A cancel that lands as a kick wakes the heartbeat must still stop it (asyncio.wait_for
    on 3.11 swallowed it, and a node's shutdown hung)."""
    for _ in range(20):
        reg = FakeRegistry()
        a = agent(services(), reg, [])
        task = asyncio.get_running_loop().create_task(a.run())
        await asyncio.sleep(0)  # first beat, then waiting for a kick
        await asyncio.sleep(0)
        a.kick()
        await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert done, "the heartbeat did not stop"


async def test_a_drain_publishes_draining_at_once_and_closes_what_outlives_it():
    s = services()
    s.settings = load_settings(env={}, overrides={"cluster.drain_timeout_s": 0.3})
    reg, closed, drained = FakeRegistry(), [], []
    a = agent(s, reg, closed)
    a.on_drained = lambda: drained.append(True)
    s.sessions["x"] = type("Live", (), {"id": "x", "state": "connected"})()  # type: ignore[assignment]
    task = asyncio.get_running_loop().create_task(a.run())
    await asyncio.sleep(0.05)
    a.drain()
    await asyncio.sleep(0.05)
    assert reg.published[-1]["state"] == "draining" and reg.published[-1]["room"] == 0
    assert reg.published[-1]["session_ids"] == ["x"] and closed == [] and not drained
    await asyncio.wait_for(a.drain(), 2.0)  # the same task: drain is idempotent
    assert closed == ["drain"] and drained == [True] and reg.withdrawn
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
