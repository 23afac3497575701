"""The render API end to end: a real server process (viseme engine, 512x512, 25 fps) renders ~10 s
of speech once (a cache miss: the whole render), then answers the identical request again and
again from the cache. Reports the miss, the hit at the client (HTTP round trip) and the server's
own time for the hit (``served_ms``), medians over the repeats.

    .venv/bin/python -m bench.render_api [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

import aiohttp

from bench.common import print_table, start_server, write_result

TEXT = (
    "Good morning, and welcome to the studio. Today we will look at how the weather changes "
    "over the mountains, why the clouds gather in the afternoon, and what that means for "
    "anyone planning a long walk this weekend."
)


async def run(url: str, repeats: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for fmt in ("mp4", "webm"):
            body = {"text": TEXT, "format": fmt}
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/render", json=body) as r:
                first = await r.json()
                assert r.status == 200, first
            miss_s = time.perf_counter() - t0
            hits, served = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                async with http.post(f"{url}/v1/render", json=body) as r:
                    again = await r.json()
                hits.append(1000 * (time.perf_counter() - t0))
                assert again["cached"] is True
                served.append(again["served_ms"])
            row = {
                "format": fmt,
                "audio_s": round(first["duration_s"], 2),
                "miss_s": round(miss_s, 2),
                "rtf_x_realtime": round(first["duration_s"] / miss_s, 2),
                "hit_client_ms_median": round(statistics.median(hits), 2),
                "hit_server_ms_median": round(statistics.median(served), 3),
            }
            rows.append(row)
            out[fmt] = row
        async with http.get(f"{url}/cache/stats") as r:
            out["cache_stats"] = await r.json()
    print_table(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(
            {"AVATAR_AVATARS__DATA_DIR": tmp, "AVATAR_CONVERSATION__LISTEN": "false"}
        )
        try:
            result = asyncio.run(run(url, args.repeats))
        finally:
            proc.terminate()
            proc.wait(10)
    write_result(
        "render_api",
        {"note": "server process, viseme engine, 512x512 @ 25 fps, one local worker", **result},
    )


if __name__ == "__main__":
    main()
