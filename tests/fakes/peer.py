"""Small pieces the peer-connection tests share: waiting for a condition, and a client offer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCPeerConnection


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
