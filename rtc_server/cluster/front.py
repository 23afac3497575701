"""The front (``cluster.role: front``): one public address before many media nodes.

It serves the pages and the public API and keeps no state of its own (the registry in Redis
holds it all, so a restarted front loses nothing):

* ``POST /offer`` checks the offer as a node would, picks the ready node with the most room
  (``Router``), hands it the offer and returns its answer with ``session_id`` and
  ``node_id``; the call's media then flows between the browser and that node only. A node
  that is full, draining or unreachable is skipped for the next; when none has room: 503
  ``no_capacity`` + ``Retry-After``.
* ``GET /sessions`` asks every live node and lists their calls with ``node_id``; calls of a
  node that vanished without a clean exit are listed under ``gone``.
  ``DELETE /sessions/{id}`` goes to the call's node (410 ``session_gone`` when that node is
  gone).
* ``GET /cluster/nodes`` (admin) lists the nodes; ``POST /cluster/nodes/{id}/drain`` (admin)
  drains one.
* Everything else of the API (avatars, render jobs and their sockets, the cache) is passed
  to a ready node, render jobs to the node that took them. The nodes share
  ``avatars.data_dir`` and ``cache.dir`` (docs/scale-out.md).

Access rules (keys, the offer token, CORS, rate limits) apply at the front as on a node;
the caller's ``Authorization`` / ``X-API-Key`` go on to the node, and the caller's address
in ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from common.errors import NoCapacity, NodeUnavailable, NotFound, SessionGone
from config import Settings
from rtc_server.access import install_access
from rtc_server.bodies import offer_model, parse
from rtc_server.cluster.registry import NodeView, Registry
from rtc_server.ice import browser_ice_servers, resolve_ice_servers
from rtc_server.openapi import add_openapi_route
from rtc_server.pages import handle_index, handle_register, handle_web_file
from rtc_server.wire import RETRY_AFTER_S, errors_middleware, json_error, read_json_object

__all__ = ["FRONT", "Front", "Router", "create_front_app"]

logger = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 30.0  # a node answers an offer within this (avatar load + ICE gathering)
ASK_TIMEOUT_S = 3.0  # a node answers a list or a drain within this
# request headers passed on to a node (the rest are the front's own connection's)
PASSED_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "Accept", "X-Request-Id",
                  "Range", "If-None-Match", "If-Modified-Since")
# answer headers passed back from a node
RETURNED_HEADERS = ("Content-Type", "Retry-After", "Cache-Control", "Content-Disposition",
                    "ETag", "Last-Modified", "Content-Range", "Accept-Ranges", "Location",
                    "WWW-Authenticate")


@dataclass
class Router:
    """The order in which to try nodes for a new call: ready nodes with room, most room
    first, then fewest calls. A node publishes its record as soon as it takes a call, so
    only the offers this front has in flight are not in the figures yet: each is taken off
    its node's room until its answer is back."""

    _in_flight: dict[str, int] = field(default_factory=dict)

    def order(self, nodes: list[NodeView]) -> list[NodeView]:
        ranked: list[tuple[int, int, str, NodeView]] = []
        for n in nodes:
            if n.state != "ready":
                continue
            flying = self._in_flight.get(n.id, 0)
            room = n.room - flying
            if room >= 1:
                ranked.append((-room, n.sessions + flying, n.id, n))
        ranked.sort(key=lambda r: r[:3])
        return [r[3] for r in ranked]

    @contextlib.contextmanager
    def sending(self, node: NodeView) -> Iterator[None]:
        """An offer on its way to ``node``."""
        self._in_flight[node.id] = self._in_flight.get(node.id, 0) + 1
        try:
            yield
        finally:
            left = self._in_flight[node.id] - 1
            if left:
                self._in_flight[node.id] = left
            else:
                del self._in_flight[node.id]


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.offers = Counter("avatar_front_offers", "Offers by outcome (routed, no_capacity, "
                              "rejected, node_error)", ["outcome"], registry=self.registry)
        self.offer_seconds = Histogram(
            "avatar_front_offer_seconds", "Time from an offer's arrival to the node's answer "
            "leaving the front", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.added_seconds = Histogram(
            "avatar_front_added_seconds", "What the front adds to an offer: its time less the "
            "node's", registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))
        self.skipped = Counter("avatar_front_nodes_skipped", "Nodes tried for an offer and "
                               "skipped, by reason", ["reason"], registry=self.registry)


@dataclass
class Front:
    settings: Settings
    registry: Registry
    router: Router = field(default_factory=Router)
    metrics: FrontMetrics = field(default_factory=FrontMetrics)
    http: aiohttp.ClientSession | None = None

    @property
    def client(self) -> aiohttp.ClientSession:
        if self.http is None:
            raise RuntimeError("the front has not started")
        return self.http


FRONT = web.AppKey("front", Front)


def _front(request: web.Request) -> Front:
    return request.app[FRONT]


def passed_headers(request: web.Request) -> CIMultiDict[str]:
    """The caller's headers a node needs, and the caller's address appended to
    ``X-Forwarded-For``."""
    out: CIMultiDict[str] = CIMultiDict()
    for name in PASSED_HEADERS:
        for value in request.headers.getall(name, ()):
            out.add(name, value)
    chain = [v for v in request.headers.getall("X-Forwarded-For", ())]
    if request.remote:
        chain.append(request.remote)
    if chain:
        out["X-Forwarded-For"] = ", ".join(chain)
    out["X-Forwarded-Proto"] = request.scheme
    if request.host:
        out["X-Forwarded-Host"] = request.host
    return out


def _returned(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: resp.headers[k] for k in RETURNED_HEADERS if k in resp.headers}


# --- calls -------------------------------------------------------------------------------------
async def handle_offer(request: web.Request) -> web.StreamResponse:
    front = _front(request)
    started = time.perf_counter()
    data = await read_json_object(request, front.settings.server.max_json_depth)
    parse(offer_model(front.settings), data)  # the same checks (and 400s) as a node's
    nodes = await front.registry.nodes()
    headers = passed_headers(request)
    tried: set[str] = set()
    while True:
        # ranked again after each refusal: offers in flight elsewhere change the order
        order = [n for n in front.router.order(nodes) if n.id not in tried]
        if not order:
            break
        node = order[0]
        tried.add(node.id)
        sent = time.perf_counter()
        try:
            with front.router.sending(node):
                async with front.client.post(
                    f"{node.url}/offer", json=data, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=OFFER_TIMEOUT_S, sock_connect=2.0),
                ) as resp:
                    body = await resp.read()
                    status, returned = resp.status, _returned(resp)
        except (aiohttp.ClientError, OSError) as exc:
            front.metrics.skipped.labels("unreachable").inc()
            logger.warning("node %s did not take an offer: %s", node.id, exc or type(exc).__name__)
            continue
        except TimeoutError:
            front.metrics.offers.labels("node_error").inc()
            # it may have made the session: trying another node could leave two calls
            raise NodeUnavailable(f"node {node.id} did not answer the offer within "
                                  f"{OFFER_TIMEOUT_S:g} s; try again") from None
        node_s = time.perf_counter() - sent
        if status == 503 or status >= 500:
            front.metrics.skipped.labels("full" if status == 503 else "error").inc()
            logger.info("node %s refused an offer (%d); trying the next", node.id, status)
            continue
        if status != 200:  # the caller's mistake (400, 404, 429): the same answer
            front.metrics.offers.labels("rejected").inc()
            return web.Response(body=body, status=status, headers=returned)
        answer = _json_object(body)
        session_id = answer.get("session_id")
        if isinstance(session_id, str):
            await front.registry.remember("session", session_id, node.id)
        answer["node_id"] = node.id
        total = time.perf_counter() - started
        front.metrics.offers.labels("routed").inc()
        front.metrics.offer_seconds.observe(total)
        front.metrics.added_seconds.observe(max(0.0, total - node_s))
        logger.info("offer routed to node %s (session %s)", node.id, str(session_id)[:8])
        return web.json_response(answer, headers={"X-Node-Id": node.id})
    front.metrics.offers.labels("no_capacity").inc()
    ready = sum(1 for n in nodes if n.state == "ready")
    raise NoCapacity(f"no node has room for another call ({len(nodes)} registered, {ready} "
                     "ready); try again shortly", retry_after_s=RETRY_AFTER_S)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise NodeUnavailable("the node's answer was not JSON") from None
    if not isinstance(data, dict):
        raise NodeUnavailable("the node's answer was not a JSON object")
    return data


async def _ask(front: Front, node: NodeView, method: str, path: str,
               headers: CIMultiDict[str]) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON body) of a small request to a node; (0, None) when it did not answer."""
    try:
        async with front.client.request(
            method, f"{node.url}{path}", headers=headers,
            timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S),
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return resp.status, body if isinstance(body, dict) else None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        logger.warning("node %s did not answer %s %s: %s", node.id, method, path,
                       exc or type(exc).__name__)
        return 0, None


async def handle_sessions(request: web.Request) -> web.Response:
    front = _front(request)
    nodes = await front.registry.nodes(with_gone=True)
    live = [n for n in nodes if n.state in ("ready", "draining")]
    headers = passed_headers(request)
    answers = await asyncio.gather(*(_ask(front, n, "GET", "/sessions", headers) for n in live))
    sessions: list[dict[str, Any]] = []
    unanswered: list[str] = []
    for node, (status, body) in zip(live, answers, strict=True):
        if status != 200 or body is None:
            if status in (401, 403):  # the node's keys differ from the front's: say so
                return json_error(status, "node_refused", f"node {node.id} refused the "
                                  "session list; give every node the same access.api_keys")
            unanswered.append(node.id)
            continue
        for s in body.get("sessions", []):
            if isinstance(s, dict):
                sessions.append({**s, "node_id": node.id})
    gone = [{"id": sid, "node_id": n.id, "state": "gone"}
            for n in nodes if n.state == "gone" for sid in n.session_ids]
    return web.json_response({"sessions": sessions, "gone": gone,
                              "nodes_not_answering": unanswered})


async def _node_of_session(front: Front, session_id: str) -> tuple[NodeView | None, str | None]:
    """(live node, gone node id) holding a call, from the registry."""
    nodes = await front.registry.nodes(with_gone=True)
    by_id = {n.id: n for n in nodes}
    node_id = await front.registry.node_of("session", session_id)
    if node_id is None:  # a call made on the node directly: its heartbeat lists it
        node_id = next((n.id for n in nodes if session_id in n.session_ids), None)
    if node_id is None:
        return None, None
    node = by_id.get(node_id)
    if node is None or node.state == "gone":
        return None, node_id
    return node, None


async def handle_delete_session(request: web.Request) -> web.Response:
    front = _front(request)
    session_id = request.match_info["session_id"]
    node, gone = await _node_of_session(front, session_id)
    if gone is not None:
        raise SessionGone(f"the session was on node {gone}, which stopped answering; the "
                          "call has ended")
    if node is None:
        raise NotFound("no such session")
    status, body = await _ask(front, node, "DELETE", f"/sessions/{session_id}",
                              passed_headers(request))
    if status == 0 or body is None:
        raise NodeUnavailable(f"node {node.id} did not answer")
    return web.json_response({**body, "node_id": node.id}, status=status)


# --- nodes -------------------------------------------------------------------------------------
async def handle_nodes(request: web.Request) -> web.Response:
    nodes = await _front(request).registry.nodes(with_gone=True)
    return web.json_response({"nodes": [n.public() for n in nodes]})


async def handle_drain_node(request: web.Request) -> web.Response:
    front = _front(request)
    node_id = request.match_info["node_id"]
    node = next((n for n in await front.registry.nodes() if n.id == node_id), None)
    if node is None:
        raise NotFound(f"no live node {node_id!r}")
    status, body = await _ask(front, node, "POST", "/cluster/drain", passed_headers(request))
    if status == 0 or body is None:
        raise NodeUnavailable(f"node {node.id} did not answer")
    return web.json_response(body, status=status)


# --- the rest of the API, passed on ------------------------------------------------------------
async def _target(front: Front, request: web.Request) -> NodeView:
    """The node for a passed-on request: a render job's own node, else the ready node with
    the most room, else any live node."""
    job_id = request.match_info.get("job_id")
    nodes = await front.registry.nodes()
    if job_id:
        owner = await front.registry.node_of("job", job_id)
        node = next((n for n in nodes if n.id == owner), None)
        if node is not None:
            return node
    ready = sorted((n for n in nodes if n.state == "ready"), key=lambda n: (-n.room, n.id))
    if ready:
        return ready[0]
    if nodes:
        return nodes[0]
    raise NodeUnavailable("no node is up to answer this")


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(64 * 1024):
        yield chunk


async def handle_passed(request: web.Request) -> web.StreamResponse:
    front = _front(request)
    node = await _target(front, request)
    headers = passed_headers(request)
    data = _body_chunks(request) if request.body_exists else None
    try:
        async with front.client.request(
            request.method, f"{node.url}{request.rel_url}", headers=headers, data=data,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=600.0),
        ) as resp:
            if (request.method == "POST" and request.path == "/v1/render"
                    and resp.content_type == "application/json"):
                body = await resp.read()
                job = _json_object(body) if body else {}
                if isinstance(job.get("id"), str) and "status_url" in job:
                    await front.registry.remember("job", job["id"], node.id)
                return web.Response(body=body, status=resp.status, headers=_returned(resp))
            out = web.StreamResponse(status=resp.status, headers=_returned(resp))
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(64 * 1024):
                await out.write(chunk)
            await out.write_eof()
            return out
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise NodeUnavailable(f"node {node.id} did not answer: "
                              f"{exc or type(exc).__name__}") from None


async def handle_job_socket(request: web.Request) -> web.StreamResponse:
    """A render job's progress socket, relayed from the job's node."""
    front = _front(request)
    node = await _target(front, request)
    ws_url = node.url.replace("http", "ws", 1) + str(request.rel_url)
    try:
        upstream = await front.client.ws_connect(ws_url, headers=passed_headers(request),
                                                 timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
    except aiohttp.WSServerHandshakeError as exc:
        return json_error(exc.status, "not_found" if exc.status == 404 else "node_refused",
                          exc.message or "the node refused the socket")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise NodeUnavailable(f"node {node.id} did not answer: "
                              f"{exc or type(exc).__name__}") from None
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)

    async def client_to_node() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await upstream.send_str(msg.data)

    pump = asyncio.get_running_loop().create_task(client_to_node())
    try:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        pump.cancel()
        await upstream.close()
        await ws.close()
    return ws


# --- health --------------------------------------------------------------------------------------
async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "role": "front"})


async def handle_ready(request: web.Request) -> web.Response:
    """Ready when the registry answers and at least one node is ready."""
    front = _front(request)
    reachable = await front.registry.ping()
    nodes = await front.registry.nodes() if reachable else []
    ready_nodes = [n for n in nodes if n.state == "ready"]
    checks = {"registry": reachable, "nodes": bool(ready_nodes)}
    ok = all(checks.values())
    return web.json_response(
        {"ready": ok, "checks": checks, "nodes": len(nodes), "ready_nodes": len(ready_nodes),
         "room": sum(n.room for n in ready_nodes)}, status=200 if ok else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    body = generate_latest(_front(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_ice_servers(request: web.Request) -> web.Response:
    webrtc = _front(request).settings.webrtc
    return web.json_response({"iceServers": browser_ice_servers(resolve_ice_servers(webrtc))},
                             headers={"Cache-Control": "no-store"})


def create_front_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """The front's application (``registry`` replaces the configured one in tests)."""
    app = web.Application(client_max_size=settings.server.max_body_bytes,
                          middlewares=[errors_middleware])
    install_access(app, settings)
    cluster = settings.cluster
    front = Front(settings, registry or Registry(cluster.redis_url,
                                                 timeout_s=cluster.node_timeout_s))
    app[FRONT] = front

    async def client(app: web.Application) -> AsyncIterator[None]:
        front.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=64),
            auto_decompress=False)
        yield
        await front.http.close()
        await front.registry.aclose()

    app.cleanup_ctx.append(client)
    r = app.router
    r.add_get("/", handle_index)
    r.add_get("/register", handle_register)
    r.add_get("/web/{name:.+}", handle_web_file)
    r.add_get("/ice-servers", handle_ice_servers)
    add_openapi_route(app, settings)
    r.add_get("/health", handle_health)
    r.add_get("/ready", handle_ready)
    r.add_get("/metrics", handle_metrics)
    r.add_post("/offer", handle_offer)
    r.add_get("/sessions", handle_sessions)
    r.add_delete("/sessions/{session_id}", handle_delete_session)
    r.add_get("/cluster/nodes", handle_nodes)
    r.add_post("/cluster/nodes/{node_id}/drain", handle_drain_node)
    for method, path in PASSED_ROUTES:
        r.add_route(method, path, handle_passed)
    r.add_get("/ws/jobs/{job_id}", handle_job_socket)
    return app


# the nodes' API a front passes on (same paths, so the same access rules apply here)
PASSED_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/avatars"), ("GET", "/avatars"), ("GET", "/avatars/{avatar_id}"),
    ("GET", "/avatars/{avatar_id}/thumbnail"), ("DELETE", "/avatars/{avatar_id}"),
    ("POST", "/v1/render"), ("GET", "/v1/render/{job_id}"), ("DELETE", "/v1/render/{job_id}"),
    ("GET", "/v1/results/{key}/{name}"), ("GET", "/cache/stats"), ("DELETE", "/cache"),
    ("POST", "/cache/cleanup"),
)
