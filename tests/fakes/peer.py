"""Small pieces the peer-connection tests share: waiting for a condition, a client offer, and
a stand-in for the control data channel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

# A call on loopback with no limits that could end it mid-test, no microphone listening, and a
# small picture: what most tests that open a real call start from.
QUIET_CALL: dict[str, Any] = {
    "webrtc.host_candidates": "loopback",
    "conversation.listen": False,
    "media.video_width": 256,
    "media.video_height": 256,
    "sessions.max_call_s": 0,
    "sessions.idle_timeout_s": 0,
    "sessions.media_timeout_s": 0,
}


async def wait_until(pred: Callable[[], object], limit_s: float = 20.0) -> None:
    """Poll ``pred`` every 50 ms until it is true; AssertionError after ``limit_s``."""
    for _ in range(int(limit_s / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def offer_sdp(*, audio: bool = True, video: bool = True) -> tuple[RTCPeerConnection, str]:
    """A browser-like offer (audio sendrecv, video recvonly, the control channel; ``audio``
    or ``video`` False leaves that m-line out), ICE gathering complete; the caller closes the
    returned peer connection."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTransceiver("audio", direction="sendrecv")
    if video:
        pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


class StubChannel:
    """Stands in for the control data channel: records the events sent (decoded); with
    ``max_chars``, an event longer than that fails the test (nothing may echo a huge input)."""

    readyState = "open"
    label = "control"

    def __init__(self, max_chars: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.max_chars = max_chars

    def send(self, raw: str) -> None:
        assert self.max_chars is None or len(raw) < self.max_chars, "an event echoed too much"
        self.sent.append(json.loads(raw))

    def on(self, *_: Any) -> None:
        pass
