"""A/V offset and its drift over a long call (default 5 minutes).

One clapper segment flashes the video and beeps the audio once a second for the whole call;
the bot measures each beep-to-flash offset as a browser would line the streams up (RTP
timestamps mapped through each stream's RTCP sender reports) and by arrival time.
Drift: the change of the offset from the first minute to the last (and the fitted slope).

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.av_drift'``"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import numpy as np

from bench.common import print_table, start_server, write_result
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates

# the call is quiet after the clapper request: no idle timeout, no call-length limit (the bot's
# microphone keeps sending silence, so the media timeout never fires)
SERVER_ENV = {"AVATAR_SESSIONS__IDLE_TIMEOUT_S": "0", "AVATAR_SESSIONS__MAX_CALL_S": "0"}


async def main(seconds: int) -> None:
    use_host_candidates("loopback")
    proc, url = start_server(SERVER_ENV)
    bot = Bot(url)
    try:
        await bot.connect()
        await bot.wait_first_video(10)
        bot.send({"type": "clapper", "count": seconds})
        await asyncio.sleep(seconds + 2)
        server = await bot.server_session()
    finally:
        await bot.aclose()
        proc.terminate()
        proc.wait()
    offsets = bot.av_offsets()
    sender = offsets["sender_clock"]
    arrival = offsets["arrival"]
    per_min = max(1, len(sender) // max(1, seconds // 60))
    rows = []
    for i in range(0, len(sender), per_min):
        chunk, achunk = sender[i:i + per_min], arrival[i:i + per_min]
        rows.append({"from_s": i, "flashes": len(chunk),
                     "offset_ms_mean": round(statistics.mean(chunk), 2),
                     "offset_ms_min": min(chunk), "offset_ms_max": max(chunk),
                     "arrival_ms_mean": round(statistics.mean(achunk), 2) if achunk else None})
    print_table(rows)
    slope = float(np.polyfit(np.arange(len(sender)), sender, 1)[0]) if len(sender) > 2 else 0.0
    summary = {
        "seconds": seconds,
        "flashes_matched": len(sender),
        "offset_ms_mean": round(statistics.mean(sender), 2) if sender else None,
        "offset_ms_max_abs": max((abs(x) for x in sender), default=None),
        "drift_ms_first_to_last": round(rows[-1]["offset_ms_mean"] - rows[0]["offset_ms_mean"],
                                        2) if rows else None,
        "drift_ms_fitted_over_call": round(slope * len(sender), 3),
        "arrival_offset_ms_mean": round(statistics.mean(arrival), 2) if arrival else None,
        "server": server,
        "targets": {"offset_ms_max_abs": 20, "drift_ms": 5},
    }
    print(summary)
    write_result("av_drift", {"summary": summary, "per_minute": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=300)
    asyncio.run(main(p.parse_args().seconds))
