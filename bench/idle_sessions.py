"""Server CPU per idle session at 25 fps, and how many concurrent sessions 2 cores hold at
>= 24 fps.

The bots run in a separate, niced process (they decode every frame, which costs about as much
as the server's encode), so the server gets the cores first. Per step: N sessions idle for
``--seconds``; measured over the middle of the window: server CPU (from /proc), video fps
actually sent per session (from GET /sessions), frames the server had to repeat or skip,
and fps received by the bots.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.idle_sessions'``"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench.common import ROOT, cpu_seconds, print_table, start_server, write_result

WARMUP_S = 4.0


def sessions(url: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "/sessions", timeout=5) as r:
        return {s["id"]: s for s in json.load(r)["sessions"]}


async def client(url: str, n: int, seconds: float) -> None:
    """Hold n calls open; print each bot's fps received over the measurement window."""
    from rtc_server.bot import Bot
    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    bots = [Bot(url) for _ in range(n)]
    for b in bots:
        await b.connect()
    await asyncio.sleep(seconds)
    out = []
    for b in bots:
        s = b.summary(window=(WARMUP_S, seconds - 1))
        out.append({"fps": s["fps_received"], "jitter_ms": s["frame_interval_ms"]["jitter_std"]})
        await b.aclose()
    print(json.dumps(out), flush=True)


def step(url: str, pid: int, n: int, seconds: float) -> dict[str, Any]:
    bots = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-m", "bench.idle_sessions", "--client", str(n),
         "--url", url, "--seconds", str(seconds)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(WARMUP_S + 1.0)
    s0, c0, t0 = sessions(url), cpu_seconds(pid), time.monotonic()
    time.sleep(max(1.0, seconds - WARMUP_S - 3.0))
    s1, c1, t1 = sessions(url), cpu_seconds(pid), time.monotonic()
    out, _ = bots.communicate(timeout=120)
    received = json.loads(out.strip().splitlines()[-1])
    dt = t1 - t0
    sent_fps = [(s1[i]["frames_sent"]["video"] - s0[i]["frames_sent"]["video"]) / dt
                for i in s1 if i in s0]
    repeated = sum(s1[i]["frames_repeated"] - s0[i]["frames_repeated"] for i in s1 if i in s0)
    skipped = sum(s1[i]["frames_skipped"] - s0[i]["frames_skipped"] for i in s1 if i in s0)
    cpu = (c1 - c0) / dt
    return {
        "sessions": n,
        "server_cpu_cores": round(cpu, 3),
        "cpu_per_session": round(cpu / n, 3),
        "sent_fps_min": round(min(sent_fps), 2) if sent_fps else 0,
        "sent_fps_mean": round(sum(sent_fps) / len(sent_fps), 2) if sent_fps else 0,
        "repeated": repeated,
        "skipped": skipped,
        "recv_fps_min": min(r["fps"] for r in received),
        "recv_fps_mean": round(sum(r["fps"] for r in received) / len(received), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=16.0)
    p.add_argument("--steps", default="1,2,4,6,8,10")
    args = p.parse_args()
    if args.client:
        asyncio.run(client(args.url, args.client, args.seconds))
        return
    proc, url = start_server({"AVATAR_SESSIONS__MAX_CONCURRENT": "64",
                               "AVATAR_SESSIONS__HEADROOM_ADMISSION": "false"})
    rows = []
    try:
        for n in [int(x) for x in args.steps.split(",")]:
            row = step(url, proc.pid, n, args.seconds)
            rows.append(row)
            print_table([row])
            time.sleep(2)
    finally:
        proc.terminate()
        proc.wait()
    print_table(rows)
    held = [r["sessions"] for r in rows if r["sent_fps_min"] >= 24 and r["skipped"] == 0]
    summary = {
        "cpu_per_idle_session_cores": rows[0]["cpu_per_session"],
        "max_sessions_at_24fps_sent": max(held) if held else 0,
        "target_sessions": 6,
        "note": "bots (decoding every frame) share the same 2 cores at nice 19",
    }
    print(summary)
    write_result("idle_sessions", {"summary": summary, "steps": rows})


if __name__ == "__main__":
    main()
