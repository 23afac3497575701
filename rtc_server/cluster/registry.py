"""The node registry in Redis: which media nodes are up, how much room each has, and which
node holds which call. Fronts keep no state of their own; everything they route by is here.

Keys (``avatar:cluster:`` prefix; the values are JSON):

* ``node:{id}``: the node's current record, written by its heartbeat with an expiry of
  ``cluster.node_timeout_s``. A node that stops heartbeating (crashed, killed, cut off)
  drops out of routing when the key expires; how long ago it last wrote is read from the
  key's remaining time, so the clocks of the machines never need to agree.
* ``seen:{id}``: the last record, kept for ``SEEN_TTL_S``; ``state`` is ``stopped`` after a
  clean exit. A node whose ``node:`` key is gone while this says otherwise is reported
  ``gone``, with the calls it held.
* ``ids``: a set of every node id seen (pruned as ``seen:`` keys expire).
* ``session:{id}``: the node a front routed a call to (for ``DELETE /sessions/{id}``).
* ``job:{id}``: the node a render job was submitted to (with the local job backend).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

__all__ = ["NodeView", "Registry"]

logger = logging.getLogger(__name__)

PREFIX = "avatar:cluster:"
SEEN_TTL_S = 3600  # how long a stopped or vanished node's last record is kept
SESSION_TTL_S = 86400  # the longest a call's node is remembered


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as a front sees it."""

    id: str
    url: str
    state: str  # ready | draining | gone (| stopped, only in seen records)
    sessions: int
    session_ids: tuple[str, ...]
    room: int  # calls it says it takes now
    headroom: dict[str, Any]
    seq: int  # heartbeat counter
    last_seen_s: float | None  # seconds since its last heartbeat (None: unknown)

    @classmethod
    def from_record(cls, record: dict[str, Any], *, state: str | None = None,
                    last_seen_s: float | None = None) -> NodeView:
        return cls(
            id=str(record["id"]), url=str(record["url"]),
            state=state or str(record.get("state", "ready")),
            sessions=int(record.get("sessions", 0)),
            session_ids=tuple(str(x) for x in record.get("session_ids", ())),
            room=int(record.get("room", 0)), headroom=dict(record.get("headroom") or {}),
            seq=int(record.get("seq", 0)), last_seen_s=last_seen_s,
        )

    def public(self) -> dict[str, Any]:
        """What ``GET /cluster/nodes`` shows."""
        return {"id": self.id, "url": self.url, "state": self.state, "sessions": self.sessions,
                "room": self.room, "headroom": self.headroom,
                "last_seen_s": None if self.last_seen_s is None else round(self.last_seen_s, 2)}


class Registry:
    """The registry at ``url`` (``cluster.redis_url``); ``timeout_s`` is
    ``cluster.node_timeout_s``."""

    def __init__(self, url: str, *, timeout_s: float, client: Any = None) -> None:
        self.timeout_s = timeout_s
        # typed Any: redis-py's stubs mix its sync and async answers
        self.redis: Any = client or aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (aioredis.RedisError, OSError):
            return False

    # --- the node side --------------------------------------------------------------------------
    async def publish(self, record: dict[str, Any]) -> None:
        """Write a node's record (its heartbeat)."""
        # the expiry goes with the record: its age is read against the node's own timeout
        node_id, text = record["id"], json.dumps({**record, "timeout_s": self.timeout_s})
        async with self.redis.pipeline(transaction=True) as p:
            p.set(PREFIX + f"node:{node_id}", text, px=int(self.timeout_s * 1000))
            p.set(PREFIX + f"seen:{node_id}", text, ex=SEEN_TTL_S)
            p.sadd(PREFIX + "ids", node_id)
            await p.execute()

    async def withdraw(self, record: dict[str, Any]) -> None:
        """A clean exit: out of routing at once, remembered as ``stopped``."""
        node_id = record["id"]
        text = json.dumps({**record, "state": "stopped", "sessions": 0, "session_ids": []})
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(PREFIX + f"node:{node_id}")
            p.set(PREFIX + f"seen:{node_id}", text, ex=SEEN_TTL_S)
            await p.execute()

    # --- the front side -------------------------------------------------------------------------
    async def nodes(self, *, with_gone: bool = False) -> list[NodeView]:
        """Every live node (and, with ``with_gone``, those that vanished without a clean
        exit, state ``gone``), by id."""
        ids = sorted(await self.redis.smembers(PREFIX + "ids"))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as p:
            for node_id in ids:
                p.get(PREFIX + f"node:{node_id}")
                p.pttl(PREFIX + f"node:{node_id}")
                p.get(PREFIX + f"seen:{node_id}")
            replies = await p.execute()
        out: list[NodeView] = []
        forgotten: list[str] = []
        for i, node_id in enumerate(ids):
            live, pttl, seen = replies[3 * i: 3 * i + 3]
            view: NodeView | None = None
            if live is not None:
                view = self._view(live, pttl_ms=pttl)
            elif seen is None:
                forgotten.append(node_id)
            elif with_gone:
                view = self._view(seen)
                if view is not None:  # a clean exit is "stopped"; any other silence is gone
                    view = None if view.state == "stopped" else replace(view, state="gone")
            if view is not None:
                out.append(view)
        if forgotten:
            await self.redis.srem(PREFIX + "ids", *forgotten)
        return out

    @staticmethod
    def _view(text: str, *, pttl_ms: int | None = None) -> NodeView | None:
        """The record ``text`` as a view; ``pttl_ms``: what is left of its expiry."""
        try:
            record = json.loads(text)
            last = None
            if pttl_ms is not None and pttl_ms >= 0:
                last = max(0.0, float(record.get("timeout_s", 0.0)) - pttl_ms / 1000)
            return NodeView.from_record(record, last_seen_s=last)
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("a malformed node record in the registry was ignored")
            return None

    async def remember(self, kind: str, key: str, node_id: str) -> None:
        """Note that the call or job ``key`` (``kind`` ``session`` or ``job``) is on a node."""
        await self.redis.set(PREFIX + f"{kind}:{key}", node_id, ex=SESSION_TTL_S)

    async def node_of(self, kind: str, key: str) -> str | None:
        return await self.redis.get(PREFIX + f"{kind}:{key}")
