"""Overload: N speaking calls on this machine, audio against video.

Every call keeps its avatar talking (as ``bench.capacity`` does) for ``--seconds``; over the
middle of the window the server's ``GET /sessions`` counts give each call's audio and video
frames sent a second, and the bots (a separate process at nice 19) report the audio frames
they received, the gaps in the audio's RTP timestamps, their video fps and whether their peer
connection was still connected at the end. ``GET /health`` is timed every half second.

``--ab`` runs every step twice, with ``media.audio_first`` on and off, alternating.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.overload'``"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import psutil

from bench.capacity import SERVER_ENV, keep_talking, sessions, wait_empty, wait_sessions
from bench.common import ROOT, cpu_seconds, machine, print_table, start_server, write_result
from bench.soak import get_json

WARMUP_S = 5.0


async def client(url: str, n: int, seconds: float) -> None:
    """n talking calls; print, per bot, what it received over the window."""
    from rtc_server.bot import Bot
    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    bots = [Bot(url) for _ in range(n)]
    for b in bots:
        await b.connect()
    await keep_talking(bots, seconds)
    lo, hi = WARMUP_S, seconds - 1
    out = []
    for b in bots:
        s = b.summary(window=(lo, hi))
        audio = [t for t in b.audio.arrival if lo <= t - b.t0 <= hi]
        out.append({"fps": s["fps_received"], "audio_fps": round(len(audio) / (hi - lo), 2),
                    "audio_gaps": s["audio_gaps"]["count"],
                    "audio_gap_ms": s["audio_gaps"]["total_ms"],
                    "state": b.pc.connectionState})
    for b in bots:
        await b.aclose()
    print(json.dumps(out), flush=True)


def step(n: int, seconds: float, audio_first: bool) -> dict[str, Any]:
    env = dict(SERVER_ENV, AVATAR_MEDIA__AUDIO_FIRST="true" if audio_first else "false")
    proc, url = start_server(env)
    try:
        bots = subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "bench.overload", "--client", str(n),
             "--url", url, "--seconds", str(seconds)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        wait_sessions(url, n)
        t_start = time.monotonic()
        time.sleep(WARMUP_S)
        before, cpu0, t0 = sessions(url), cpu_seconds(proc.pid), time.monotonic()
        health_ms: list[float] = []
        while time.monotonic() - t_start < seconds - 2:
            h0 = time.perf_counter()
            get_json(url + "/health")
            health_ms.append((time.perf_counter() - h0) * 1000)
            time.sleep(0.5)
        after, cpu1, t1 = sessions(url), cpu_seconds(proc.pid), time.monotonic()
        out, _ = bots.communicate(timeout=120)
        received = json.loads(out.strip().splitlines()[-1])
        rss = psutil.Process(proc.pid).memory_info().rss
        wait_empty(url)
    finally:
        proc.terminate()
        proc.wait()
    dt = t1 - t0
    audio = [(after[i]["frames_sent"]["audio"] - s["frames_sent"]["audio"]) / dt
             for i, s in before.items() if i in after]
    video = [(after[i]["frames_sent"]["video"] - s["frames_sent"]["video"]) / dt
             for i, s in before.items() if i in after]
    health_ms.sort()
    return {
        "calls": n,
        "audio_first": audio_first,
        "audio_fps_sent_min": round(min(audio), 1),
        "audio_fps_sent_mean": round(sum(audio) / len(audio), 1),
        "video_fps_sent_min": round(min(video), 1),
        "video_fps_sent_mean": round(sum(video) / len(video), 1),
        "audio_fps_recv_min": min(r["audio_fps"] for r in received),
        "audio_gaps": sum(r["audio_gaps"] for r in received),
        "audio_gap_ms": round(sum(r["audio_gap_ms"] for r in received), 1),
        "video_fps_recv_min": min(r["fps"] for r in received),
        "connected_at_end": sum(r["state"] == "connected" for r in received),
        "health_ms_p50": round(health_ms[len(health_ms) // 2], 1),
        "health_ms_max": round(health_ms[-1], 1),
        "server_cores": round((cpu1 - cpu0) / dt, 2),
        "server_rss_mb": round(rss / 1024 / 1024),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--steps", default="3,5,6")
    p.add_argument("--ab", action="store_true", help="each step with audio_first on and off")
    p.add_argument("--name", default="overload")
    args = p.parse_args()
    if args.client:
        asyncio.run(client(args.url, args.client, args.seconds))
        return
    rows = []
    for n in [int(x) for x in args.steps.split(",")]:
        for audio_first in ([True, False] if args.ab else [True]):
            row = step(n, args.seconds, audio_first)
            print_table([row])
            rows.append(row)
    print_table(rows)
    write_result(args.name, {"machine": machine(), "seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
