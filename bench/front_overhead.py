"""What a front adds to an offer/answer: the same offers sent straight to a node and through a
front (``cluster.role: front``) before it, alternately, on loopback.

A redis-server, one node and a front run on 127.0.0.1. One real offer (an aiortc peer's, audio
and video) is made once and sent ``--offers`` times each way; every call made is deleted at
once (it never connects). Printed: the median and p90 of the offer's round trip each way, their
difference, and the front's own figure (``avatar_front_added_seconds``: its time less the
node's, per offer).

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.front_overhead'``"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp

from bench.common import print_table, start_cluster, write_result

ENV = {"AVATAR_ACCESS__OFFER_PER_MIN": "0", "AVATAR_SESSIONS__MAX_CONCURRENT": "64",
       "AVATAR_SESSIONS__HEADROOM_ADMISSION": "false", "AVATAR_SERVER__LOG_LEVEL": "warning"}


async def an_offer() -> str:
    from aiortc import RTCPeerConnection

    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return str(sdp)


async def timed_offer(http: aiohttp.ClientSession, url: str, sdp: str, node_url: str) -> float:
    t0 = time.perf_counter()
    async with http.post(url + "/offer", json={"sdp": sdp, "type": "offer"}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    dt = time.perf_counter() - t0
    async with http.delete(f"{node_url}/sessions/{body['session_id']}") as resp:
        await resp.read()
    return dt


def front_added(metrics: str) -> tuple[float, int]:
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("avatar_front_added_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("avatar_front_added_seconds_count"):
            count = float(line.split()[-1])
    return total, int(count)


async def measure(front: str, node: str, offers: int) -> dict[str, Any]:
    sdp = await an_offer()
    direct: list[float] = []
    routed: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # warm-up: connections, the avatar, first-call paths
            await timed_offer(http, node, sdp, node)
            await timed_offer(http, front, sdp, node)
        async with http.get(front + "/metrics") as r:
            s0, n0 = front_added(await r.text())
        for _ in range(offers):
            direct.append(await timed_offer(http, node, sdp, node))
            routed.append(await timed_offer(http, front, sdp, node))
        async with http.get(front + "/metrics") as r:
            s1, n1 = front_added(await r.text())

    def ms(xs: list[float], q: float) -> float:
        return round(statistics.quantiles(xs, n=100)[int(q) - 1] * 1000, 2) if q < 100 else 0.0

    return {
        "offers": offers,
        "direct_median_ms": round(statistics.median(direct) * 1000, 2),
        "direct_p90_ms": ms(direct, 90),
        "front_median_ms": round(statistics.median(routed) * 1000, 2),
        "front_p90_ms": ms(routed, 90),
        "added_median_ms": round((statistics.median(routed) - statistics.median(direct)) * 1000,
                                 2),
        "front_own_added_mean_ms": round((s1 - s0) / max(1, n1 - n0) * 1000, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--offers", type=int, default=40)
    args = p.parse_args()
    with start_cluster(1, ENV) as (_, front):
        import json
        import urllib.request

        with urllib.request.urlopen(front + "/cluster/nodes") as r:
            node = json.loads(r.read())["nodes"][0]["url"]
        row = asyncio.run(measure(front, node, args.offers))
    print_table([row])
    path = write_result("front_overhead", {"result": row,
                                           "note": "1 node + front + redis-server on loopback"})
    print(path)


if __name__ == "__main__":
    main()
