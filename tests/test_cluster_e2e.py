"""Media nodes behind a front, as real processes on 127.0.0.1: a redis-server, two nodes
(``cluster.role: node``) and a front (``cluster.role: front``), with bot calls through the
front (loopback-only network namespace, like every peer-connection test).

The tests run in order on one cluster: calls spread by room and a full node is skipped;
a call is ended through the front; a restarted front loses nothing; a node drained by
SIGTERM keeps its calls until they end or its drain time is up; a node killed with
``kill -9`` leaves the routing within the heartbeat timeout and its calls are reported gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from rtc_server.bot import Bot
from tests.conftest import free_port, start_server, stop_server
from tests.fakes.redis_server import redis_server, redis_server_binary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HEARTBEAT_S = 0.5
NODE_TIMEOUT_S = 2.5
DRAIN_TIMEOUT_S = 6.0


@dataclass
class Cluster:
    redis_url: str
    front_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def front(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def env(self, role: str, **extra: str) -> dict[str, str]:
        return {"AVATAR_CLUSTER__ROLE": role, "AVATAR_CLUSTER__REDIS_URL": self.redis_url,
                "AVATAR_CLUSTER__HEARTBEAT_S": str(HEARTBEAT_S),
                "AVATAR_CLUSTER__NODE_TIMEOUT_S": str(NODE_TIMEOUT_S),
                "AVATAR_SERVER__LOG_FORMAT": "text", **extra}

    def start_node(self, name: str, max_calls: int) -> None:
        port = free_port()
        self.ports[name] = port
        self.procs[name] = start_server(port, self.env(
            "node", AVATAR_CLUSTER__NODE_ID=name,
            AVATAR_SESSIONS__MAX_CONCURRENT=str(max_calls),
            # the test machine's CPU is shared by everything here: count slots, not cores
            AVATAR_SESSIONS__HEADROOM_ADMISSION="false",
            AVATAR_CLUSTER__DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S)))

    def start_front(self) -> None:
        self.procs["front"] = start_server(self.front_port, self.env("front"))

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return http("GET", self.front + path)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in self.get("/cluster/nodes")[1]["nodes"]}

    def wait_nodes(self, pred: Any, limit_s: float = 15.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + limit_s
        while True:
            nodes = self.nodes()
            if pred(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"the nodes never got there: {nodes}")
            time.sleep(0.1)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {**json.loads(e.read()), "_headers": dict(e.headers)}


@pytest.fixture(scope="module")
def cluster(loopback_only: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        c = Cluster(url)
        try:
            c.start_node("node-a", max_calls=2)
            c.start_node("node-b", max_calls=3)
            c.start_front()
            c.wait_nodes(lambda n: {"node-a", "node-b"} <= set(n))
            yield c
        finally:
            for proc in c.procs.values():
                if proc.poll() is None:
                    stop_server(proc)


async def call(url: str) -> Bot:
    bot = Bot(url)
    await bot.connect()
    return bot


async def flowing(bot: Bot, seconds: float = 1.0) -> tuple[int, int]:
    """(video, audio) frames the bot decoded in the next ``seconds``."""
    v0, a0 = len(bot.video.pts), len(bot.audio.pts)
    await asyncio.sleep(seconds)
    return len(bot.video.pts) - v0, len(bot.audio.pts) - a0


async def test_calls_spread_by_room_and_a_full_node_is_skipped(cluster: Cluster) -> None:
    bots: list[Bot] = []
    try:
        # one at a time, so the order is the router's: the most room first, then fewest calls
        for _ in range(4):
            bots.append(await call(cluster.front))
        placed = [b.node_id for b in bots]
        assert placed[0] == "node-b"  # 3 free slots against 2
        assert sorted(placed) == ["node-a", "node-a", "node-b", "node-b"], placed
        for b in bots:
            await b.wait_first_video(10)
            video, audio = await flowing(b, 1.0)
            assert video >= 15 and audio >= 30, (b.node_id, video, audio)
        # node-a is full (2 of 2): the fifth call goes to node-b, the sixth finds no room
        cluster.wait_nodes(lambda n: n["node-a"]["room"] == 0 and n["node-b"]["room"] == 1)
        bots.append(await call(cluster.front))
        assert bots[-1].node_id == "node-b"
        cluster.wait_nodes(lambda n: n["node-b"]["room"] == 0)
        status, body = http("POST", cluster.front + "/offer",
                            {"sdp": bots[0].pc.localDescription.sdp, "type": "offer"})
        assert status == 503 and body["error"] == "no_capacity", body
        assert body["_headers"]["Retry-After"] == "5"
        # the front lists every call with its node
        status, listed = cluster.get("/sessions")
        assert status == 200 and listed["gone"] == [] and listed["nodes_not_answering"] == []
        where = {s["id"]: s["node_id"] for s in listed["sessions"]}
        assert where == {b.session_id: b.node_id for b in bots}
        # a call ended through the front ends on its node
        status, ended = http("DELETE", f"{cluster.front}/sessions/{bots[1].session_id}")
        assert status == 200 and ended["state"] == "closed" and ended["node_id"] == placed[1]
        assert http("DELETE", f"{cluster.front}/sessions/nope")[0] == 404
    finally:
        await asyncio.gather(*(b.aclose() for b in bots))
    cluster.wait_nodes(lambda n: n["node-a"]["sessions"] == 0 and n["node-b"]["sessions"] == 0)


async def test_a_restarted_front_loses_nothing(cluster: Cluster) -> None:
    bot = await call(cluster.front)
    try:
        await bot.wait_first_video(10)
        stop_server(cluster.procs.pop("front"))
        cluster.start_front()  # same port, nothing carried over but Redis
        status, listed = cluster.get("/sessions")
        assert status == 200
        assert [(s["id"], s["node_id"]) for s in listed["sessions"]] == [
            (bot.session_id, bot.node_id)]
        video, _ = await flowing(bot, 0.5)
        assert video > 0  # the media never went through the front
        status, ended = http("DELETE", f"{cluster.front}/sessions/{bot.session_id}")
        assert status == 200 and ended["node_id"] == bot.node_id
    finally:
        await bot.aclose()


async def test_the_rest_of_the_api_is_passed_to_a_node(cluster: Cluster) -> None:
    """Avatars, render jobs (their status, files and progress socket from the node that took
    them) and the cache answer through the front as on a node."""
    import aiohttp

    node = f"http://127.0.0.1:{cluster.ports['node-a']}"
    assert cluster.get("/avatars") == http("GET", node + "/avatars")
    async with aiohttp.ClientSession() as web:
        async with web.get(node + "/avatars/default/thumbnail") as r:
            thumbnail = await r.read()
        async with web.get(cluster.front + "/avatars/default/thumbnail") as r:
            assert r.status == 200 and r.content_type == "image/jpeg"
            assert await r.read() == thumbnail
        async with web.post(cluster.front + "/v1/render", json={
                "text": "Hello from the front.", "async": True}) as r:
            assert r.status == 202, await r.text()
            job = await r.json()
        async with web.ws_connect(cluster.front + job["ws_url"]) as ws:
            states = [json.loads(m.data) async for m in ws]
        assert states[-1]["status"] == "done", states[-1]
        status, done = cluster.get(job["status_url"])
        assert status == 200 and done["status"] == "done"
        async with web.get(cluster.front + done["result"]["files"]["video"]) as r:
            video = await r.read()
            assert r.status == 200 and len(video) > 1000
    assert http("GET", cluster.front + "/v1/render/no-such-job")[0] == 404


async def test_sigterm_drains_a_node_without_dropping_its_calls(cluster: Cluster) -> None:
    # two calls on node-a (four calls: two on each): one ends by itself during the drain,
    # one outlives the drain time
    bots = [await call(cluster.front) for _ in range(4)]
    try:
        short, long = [b for b in bots if b.node_id == "node-a"]
        for b in (short, long):
            await b.wait_first_video(10)
        proc = cluster.procs["node-a"]
        proc.send_signal(signal.SIGTERM)
        drained_at = time.monotonic()
        cluster.wait_nodes(lambda n: n["node-a"]["state"] == "draining", 5)
        # new calls go elsewhere
        other = await call(cluster.front)
        bots.append(other)
        assert other.node_id == "node-b"
        # the drained node's calls go on
        video, audio = await flowing(long, 2.0)
        assert video >= 30 and audio >= 60, (video, audio)
        await short.aclose()  # ends by itself: nothing cut it
        assert not [e for e in short.events if e.get("type") == "closing"]
        # at the drain time, the page is told, then the call is closed and the node exits
        closing = await long.wait_event(lambda e: e.get("type") == "closing", DRAIN_TIMEOUT_S + 5)
        assert closing["reason"] == "drain"
        assert time.monotonic() - drained_at >= DRAIN_TIMEOUT_S - 0.5
        assert proc.wait(timeout=15) == 0
        nodes = cluster.wait_nodes(lambda n: "node-a" not in n, 5)  # withdrawn, not gone
        assert nodes["node-b"]["state"] == "ready"
    finally:
        await asyncio.gather(*(b.aclose() for b in bots))
    cluster.wait_nodes(lambda n: n["node-b"]["sessions"] == 0)  # its calls have ended


async def test_a_killed_node_leaves_the_routing_and_its_calls_are_gone(
        cluster: Cluster) -> None:
    cluster.wait_nodes(lambda n: n["node-b"]["room"] >= 1)
    bot = await call(cluster.front)
    try:
        assert bot.node_id == "node-b"
        await bot.wait_first_video(10)
        os.kill(cluster.procs["node-b"].pid, signal.SIGKILL)
        killed = time.monotonic()
        nodes = cluster.wait_nodes(lambda n: n.get("node-b", {}).get("state") == "gone",
                                   NODE_TIMEOUT_S + 3)
        assert time.monotonic() - killed <= NODE_TIMEOUT_S + 1.5
        assert nodes["node-b"]["last_seen_s"] is None
        status, listed = cluster.get("/sessions")
        assert listed["sessions"] == []
        assert listed["gone"] == [{"id": bot.session_id, "node_id": "node-b", "state": "gone"}]
        status, body = http("DELETE", f"{cluster.front}/sessions/{bot.session_id}")
        assert status == 410 and body["error"] == "session_gone", body
        status, body = http("POST", cluster.front + "/offer",
                            {"sdp": bot.pc.localDescription.sdp, "type": "offer"})
        assert status == 503 and body["error"] == "no_capacity"
        status, ready = cluster.get("/ready")
        assert status == 503 and ready["checks"] == {"registry": True, "nodes": False}
    finally:
        await bot.aclose()

