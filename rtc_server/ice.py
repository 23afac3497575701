"""Which host candidates ICE gathers.

aioice leaves 127.0.0.1 out of its host candidates, which is right on a real network and makes
a loopback-only network namespace (where tests run) unreachable. ``loopback`` mode makes the
process gather exactly 127.0.0.1, so no packet is ever addressed anywhere else."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from config import IceServer

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
