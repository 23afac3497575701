"""A media node (``cluster.role: node``): today's server, plus a heartbeat into the registry
and a drain that drops no call.

The heartbeat writes the node's record every ``cluster.heartbeat_s``, and at once when a
call is taken or ends or the state changes: id, URL, state (``ready`` or ``draining``), live
calls and their ids, and ``room``, the calls it takes now, from the same measure its own
admission uses (``rtc_server.headroom``) and ``sessions.max_concurrent``.

Drain (SIGTERM, or ``POST /cluster/drain``): the node says ``draining`` (fronts stop routing
to it; an offer that reaches it anyway gets 503 ``shutting_down``), lets its live calls go
on until they end or ``cluster.drain_timeout_s`` passes, then tells the pages still there
(``closing``, reason ``drain``), closes them and exits. A second SIGTERM exits at once (the
calls are still told and closed, within ``server.shutdown_grace_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from config import Settings
from pipeline.render.redis_schema import redact_url
from rtc_server.cluster.registry import Registry
from rtc_server.services import SERVICES, Services

__all__ = ["NODE", "NodeAgent", "install_node", "node_room"]

logger = logging.getLogger(__name__)


def node_room(services: Services) -> int:
    """How many more calls this node takes now: 0 while draining or while its admission
    would refuse one; else the free session slots, capped by the measured headroom."""
    if services.draining.is_set():
        return 0
    slots, headroom = services.slots, services.headroom
    live, pending = slots.taken - slots.pending, slots.pending
    if headroom.refusal(live=live, pending=pending) is not None:
        return 0
    room = slots.max_live - slots.taken
    more = headroom.reading(pending).get("calls_more") if headroom.enabled else None
    if more is not None:
        room = min(room, int(more))
    return max(0, room)


def default_node_id(settings: Settings) -> str:
    return settings.cluster.node_id or f"{socket.gethostname()}-{settings.server.port}"


def default_node_url(settings: Settings) -> str:
    if settings.cluster.node_url:
        return settings.cluster.node_url.rstrip("/")
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}"


class NodeAgent:
    """The node's registry entry and its drain. ``close_all(reason, detail, timeout_s)``
    tells and closes every live call; ``on_drained`` runs once the drain is over (under
    ``python -m rtc_server``: the process exits)."""

    def __init__(
        self,
        services: Services,
        registry: Registry,
        *,
        close_all: Callable[[str, str, float], Awaitable[object]],
        on_drained: Callable[[], None] | None = None,
        node_id: str | None = None,
        url: str | None = None,
    ) -> None:
        settings = services.settings
        self.services, self.registry = services, registry
        self.id = node_id or default_node_id(settings)
        self.url = url or default_node_url(settings)
        self.heartbeat_s = settings.cluster.heartbeat_s
        self.drain_timeout_s = settings.cluster.drain_timeout_s
        self.state = "ready"
        self.seq = 0
        self.started_at = time.time()
        self._close_all = close_all
        self.on_drained = on_drained
        self._wake = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None
        self.failures = 0  # heartbeats that could not be written (the log is throttled by it)

    def record(self) -> dict[str, Any]:
        services = self.services
        sessions = [s for s in list(services.sessions.values()) if s.state != "closed"]
        slots = services.slots
        return {
            "id": self.id, "url": self.url, "state": self.state, "seq": self.seq,
            "sessions": len(sessions), "session_ids": [s.id for s in sessions],
            "room": node_room(services), "max_concurrent": slots.max_live,
            "headroom": {"enabled": services.headroom.enabled,
                         **services.headroom.reading(pending=slots.pending)},
            "started_at": self.started_at, "heartbeat_s": self.heartbeat_s,
        }

    def kick(self) -> None:
        """Publish now rather than at the next beat (a state change)."""
        self._wake.set()

    async def beat(self) -> None:
        self.seq += 1
        try:
            await self.registry.publish(self.record())
        except Exception as exc:  # noqa: BLE001 - Redis away: calls go on, fronts skip us
            self.failures += 1
            level = logging.WARNING if self.failures in (1, 10) or self.failures % 60 == 0 \
                else logging.DEBUG
            logger.log(level, "registry heartbeat failed (%d so far): %s", self.failures, exc)

    async def run(self) -> None:
        """Heartbeat until cancelled."""
        while True:
            await self.beat()
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives
            # as a kick wakes it, and the heartbeat then never stopped
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()

    async def withdraw(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.registry.withdraw(self.record())

    # --- drain ----------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining is not None

    def drain(self) -> asyncio.Task[None]:
        """Start the drain (idempotent); the task ends when every call has ended."""
        if self._draining is None:
            self.services.draining.set()
            self.state = "draining"
            self.kick()
            logger.info("draining: %d calls left, at most %.0f s", len(self.services.sessions),
                        self.drain_timeout_s)
            self._draining = asyncio.get_running_loop().create_task(self._drain(), name="drain")
        return self._draining

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        sessions = self.services.sessions
        # polled: a call ends through many paths (peer gone, DELETE, timeouts), none signals
        while sessions and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        if sessions:
            logger.info("drain time is up: closing %d calls", len(sessions))
            await self._close_all(
                "drain", "this server is being restarted; please reconnect",
                max(0.5, self.services.settings.server.shutdown_grace_s - 1.0))
        logger.info("drained")
        await self.withdraw()
        if self.on_drained is not None:
            self.on_drained()


NODE = web.AppKey("node", NodeAgent)


async def handle_drain(request: web.Request) -> web.Response:
    """``POST /cluster/drain`` (admin): start draining; 202 with the calls still live."""
    agent = request.app[NODE]
    agent.drain()
    return web.json_response({"id": agent.id, "state": agent.state,
                              "sessions": len(agent.services.sessions),
                              "drain_timeout_s": agent.drain_timeout_s}, status=202)


def install_node(
    app: web.Application,
    settings: Settings,
    *,
    close_all: Callable[[str, str, float], Awaitable[object]],
    registry: Registry | None = None,
) -> NodeAgent:
    """Make the application a node: the agent at ``app[NODE]`` (heartbeat from the end of
    start-up to shutdown, withdrawn on exit) and ``POST /cluster/drain``. Call after the
    start-up context that loads the engines is added (the node registers once loaded)."""
    cluster = settings.cluster
    registry = registry or Registry(cluster.redis_url, timeout_s=cluster.node_timeout_s)
    services = app[SERVICES]
    agent = NodeAgent(services, registry, close_all=close_all)
    app[NODE] = agent
    # a call taken or ended is published at once: fronts route by fresh figures
    services.slots.on_change = agent.kick

    async def heartbeat(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(agent.run(), name="heartbeat")
        logger.info("node %s at %s registering in %s", agent.id, agent.url,
                    redact_url(cluster.redis_url))
        yield
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)  # bounded: nothing here may hold the exit
        if agent._draining is not None and not agent._draining.done():
            agent._draining.cancel()
        await agent.withdraw()
        await registry.aclose()

    app.cleanup_ctx.append(heartbeat)
    app.router.add_post("/cluster/drain", handle_drain)
    return agent
