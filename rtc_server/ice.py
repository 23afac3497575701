"""Which host candidates ICE gathers.

aioice leaves 127.0.0.1 out of its host candidates, which is right on a real network and makes
a loopback-only network namespace (where tests run) unreachable. ``loopback`` mode makes the
process gather exactly 127.0.0.1, so no packet is ever addressed anywhere else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Literal

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from config import IceServer, WebRTCSettings

_original_get_host_addresses = aioice.ice.get_host_addresses


def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def use_host_candidates(mode: Literal["all", "loopback"] | str) -> None:
    """Process-wide: gather host candidates on every interface or on loopback only."""
    if mode == "loopback":
        aioice.ice.get_host_addresses = _loopback_host_addresses
    else:
        aioice.ice.get_host_addresses = _original_get_host_addresses


def rtc_configuration(ice_servers: Sequence[IceServer]) -> RTCConfiguration:
    """An explicit configuration; an empty list means no STUN/TURN at all (aiortc would
    otherwise fall back to a public STUN server)."""
    servers = [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in ice_servers
    ]
    return RTCConfiguration(iceServers=servers)


def turn_rest_credentials(secret: str, ttl_s: float, now: float) -> tuple[str, str]:
    """Short-lived TURN credentials in the TURN REST form that coturn checks with
    ``use-auth-secret``: username ``<unix expiry>:avatar``, credential
    base64(HMAC-SHA1(secret, username))."""
    username = f"{int(now + ttl_s)}:avatar"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def resolve_ice_servers(
    settings: WebRTCSettings, now: float | None = None
) -> tuple[IceServer, ...]:
    """The configured servers, with TURN REST credentials filled in where an entry has TURN
    urls and no credentials of its own (``webrtc.turn_secret`` set)."""
    out = []
    for s in settings.ice_servers:
        turn = any(u.partition(":")[0].lower() in ("turn", "turns") for u in s.urls)
        if turn and s.credential is None and settings.turn_secret is not None:
            username, credential = turn_rest_credentials(
                settings.turn_secret, settings.turn_ttl_s, time.time() if now is None else now
            )
            s = IceServer(urls=s.urls, username=username, credential=credential)
        out.append(s)
    return tuple(out)


def browser_ice_servers(servers: Sequence[IceServer]) -> list[dict[str, object]]:
    """RTCPeerConnection ``iceServers`` for the call page (credentials included: a browser
    needs them to use the TURN server)."""
    out: list[dict[str, object]] = []
    for s in servers:
        entry: dict[str, object] = {"urls": list(s.urls)}
        if s.username is not None:
            entry["username"] = s.username
        if s.credential is not None:
            entry["credential"] = s.credential
        out.append(entry)
    return out
