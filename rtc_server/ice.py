"""ICE configuration: STUN/TURN servers for aiortc and the page, TURN REST credentials.

Which host candidates the process gathers (``use_host_candidates``: all, or loopback only) is
an explicit call into :mod:`media_tracks.aiortc_compat`, made by the entry point from the
``webrtc.host_candidates`` setting."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence

from aiortc import RTCConfiguration, RTCIceServer

from config import IceServer, WebRTCSettings
from media_tracks.aiortc_compat import use_host_candidates

__all__ = [
    "browser_ice_servers",
    "resolve_ice_servers",
    "rtc_configuration",
    "turn_rest_credentials",
    "use_host_candidates",
]

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
