"""Time to first video frame with the bot: median of 10 calls on loopback.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.first_frame'``"""

from __future__ import annotations

import asyncio
import statistics

from bench.common import print_table, start_server, write_result
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates

CALLS = 10


async def one_call(url: str) -> tuple[float, float]:
    bot = Bot(url)
    try:
        await bot.connect()
        await bot.wait_first_video(10)
        await asyncio.sleep(0.3)
        s = bot.summary()
        return float(s["first_video_frame_ms"]), float(s["first_audio_frame_ms"])
    finally:
        await bot.aclose()


async def main() -> None:
    use_host_candidates("loopback")
    proc, url = start_server()
    try:
        await one_call(url)  # warm-up (first avatar render, imports)
        rows = []
        for i in range(CALLS):
            video_ms, audio_ms = await one_call(url)
            rows.append({"call": i + 1, "first_video_ms": video_ms, "first_audio_ms": audio_ms})
            await asyncio.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait()
    print_table(rows)
    video = [r["first_video_ms"] for r in rows]
    summary = {"calls": CALLS, "median_first_video_ms": statistics.median(video),
               "max_first_video_ms": max(video),
               "median_first_audio_ms": statistics.median(r["first_audio_ms"] for r in rows),
               "target_ms": 250}
    print(summary)
    write_result("first_frame", {"summary": summary, "calls": rows})


if __name__ == "__main__":
    asyncio.run(main())
