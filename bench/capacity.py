"""Capacity: server memory per session, and how many SPEAKING sessions 2 cores hold at >= 24 fps
with the viseme engine, or with Wav2Lip (``--engine wav2lip --device openvino --precision
bf16``: the random-weight network of the real architecture; ``--memory-steps ""`` skips the
memory part).

Memory: the server's RSS (psutil) with N idle calls held open against the same server with
none (after one warm-up call, so lazily loaded pieces are counted once, not per session);
per session = the difference / N.

Speaking: N bots each keep their avatar talking (a long ``say`` at the start, another each
time the avatar is back to listening, so the Piper voice, the viseme engine, the compositor and
the encoder all work all the time). Measured over the middle of the window: video fps sent per
session (GET /sessions ``frames_sent``), frames repeated, skipped and late, the share of
samples in which the session was speaking, server CPU, and fps received by the bots. N steps
up until a session falls under 24 fps. The bots run in a separate process at nice 19 (they
decode every frame), so the server gets the cores first.

The machine is shared: each step also records the bots' CPU, CPU used by anything else
(``/proc/stat`` less server and bots), steal time, and (Wav2Lip) the model's wall ms per frame,
so a run slowed by neighbours shows as such. ``--repeat R`` measures every step R times; a
step holds in a run when every call got >= 24 fresh fps with no skipped frame, and the
capacity is the most calls held in more than half of the runs.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.capacity'``"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil

from bench.common import (
    ROOT,
    cpu_seconds,
    print_table,
    start_cluster,
    start_server,
    write_result,
)
from bench.soak import get_json

WARMUP_S = 5.0
MB = 1024 * 1024
SERVER_ENV = {
    "AVATAR_SESSIONS__MAX_CONCURRENT": "64",
    # these measure past capacity on purpose: no admission from measured headroom
    "AVATAR_SESSIONS__HEADROOM_ADMISSION": "false",
    "AVATAR_ACCESS__OFFER_PER_MIN": "0",
    "AVATAR_LIPSYNC__ENGINE": "viseme",
    # bench.soak's and this one's calls are quiet on purpose: no idle or call-length limits
    "AVATAR_SESSIONS__IDLE_TIMEOUT_S": "0",
    "AVATAR_SESSIONS__MAX_CALL_S": "0",
}
SPEECH = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp. "
    "Ships passed in the night, and the sea was calm or rough as the weather chose. "
    "She wrote the names of the boats in a book, and the book grew thick over the years. "
) * 6


def wav2lip_env(device: str, precision: str) -> dict[str, str]:
    """Server settings for Wav2Lip on the random-weight network (written once, cached)."""
    import tempfile
    from pathlib import Path

    from pipeline.lipsync.wav2lip_model import write_random_wav2lip_onnx

    work = Path(tempfile.gettempdir()) / "avatar-bench-wav2lip"
    work.mkdir(exist_ok=True)
    model = work / "wav2lip-random.onnx"
    if not model.exists():
        write_random_wav2lip_onnx(model, seed=0)
    return {
        "AVATAR_LIPSYNC__ENGINE": "wav2lip",
        "AVATAR_LIPSYNC__WAV2LIP_MODEL": str(model),
        "AVATAR_LIPSYNC__MODEL_CACHE_DIR": str(work / "cache"),
        "AVATAR_LIPSYNC__DEVICE": device,
        "AVATAR_LIPSYNC__PRECISION": precision,
    }


def sessions(url: str) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in get_json(url + "/sessions")["sessions"]}


async def keep_talking(bots: list[Any], seconds: float) -> None:
    """Keep every bot's avatar talking for ``seconds``: a long ``say`` at the start, another
    each time its avatar is back to listening."""
    for b in bots:
        b.send({"type": "say", "text": SPEECH})
    seen = [0] * len(bots)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        for i, b in enumerate(bots):
            new = b.events[seen[i] :]
            seen[i] = len(b.events)
            if any(e.get("type") == "state" and e.get("state") == "listening" for e in new):
                b.send({"type": "say", "text": SPEECH})


async def client(url: str, n: int, seconds: float, speak: bool) -> None:
    """Hold n calls open (talking if ``speak``); print each bot's fps over the window."""
    from rtc_server.bot import Bot
    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    bots = [Bot(url) for _ in range(n)]
    for b in bots:
        await b.connect()
    if speak:
        await keep_talking(bots, seconds)
    else:
        await asyncio.sleep(seconds)
    out = []
    for b in bots:
        s = b.summary(window=(WARMUP_S, seconds - 1))
        out.append({"fps": s["fps_received"], "jitter_ms": s["frame_interval_ms"]["jitter_std"]})
    for b in bots:
        await b.aclose()
    print(json.dumps(out), flush=True)


def start_bots(url: str, n: int, seconds: float, speak: bool) -> subprocess.Popen[str]:
    cmd = [
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "bench.capacity",
        "--client",
        str(n),
        "--url",
        url,
        "--seconds",
        str(seconds),
    ]
    if speak:
        cmd.append("--speak")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def wait_sessions(url: str, n: int, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        live = [s for s in sessions(url).values() if s["state"] == "connected"]
        if len(live) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{n} sessions did not connect in {limit_s:g} s")


def wait_empty(url: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while sessions(url) and time.monotonic() < deadline:
        time.sleep(0.2)


def warm_up(url: str) -> None:
    """One talking call: lazily started pools and codecs are not a session's cost."""
    warm = start_bots(url, 1, 8.0, speak=True)
    warm.communicate(timeout=120)
    wait_empty(url)
    time.sleep(2.0)


def memory_step(n: int, seconds: float = 14.0) -> dict[str, Any]:
    """A fresh server (the allocator keeps what earlier calls freed): RSS after a warm-up
    call with no session, then with n idle calls."""
    proc, url = start_server(SERVER_ENV)
    try:
        warm_up(url)
        process = psutil.Process(proc.pid)
        base = process.memory_info().rss
        bots = start_bots(url, n, seconds, speak=False)
        wait_sessions(url, n)
        time.sleep(WARMUP_S)  # frames ahead, encoder buffers, jitter buffers filled
        rss = process.memory_info().rss
        bots.communicate(timeout=180)
    finally:
        proc.terminate()
        proc.wait()
    row = {
        "sessions": n,
        "rss_mb_none": round(base / MB, 1),
        "rss_mb": round(rss / MB, 1),
        "per_session_mb": round((rss - base) / n / MB, 2),
    }
    print_table([row])
    return row


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return busy / ticks, v[7] / ticks


def model_stats(url: str) -> tuple[float, int]:
    """(busy seconds, frames) of the Wav2Lip batch worker so far; (0, 0) for other engines."""
    batching = get_json(url + "/health").get("lipsync", {}).get("batching") or {}
    return float(batching.get("busy_s", 0.0)), int(batching.get("items", 0))


def servers_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def speaking_step(url: str, pids: list[int], n: int, seconds: float) -> dict[str, Any]:
    """``pids``: the server's processes (a front and its nodes with ``--nodes``)."""
    bots = start_bots(url, n, seconds, speak=True)
    wait_sessions(url, n)
    time.sleep(WARMUP_S)
    m0, b0 = model_stats(url), cpu_seconds(bots.pid)
    s0, c0, t0, k0 = sessions(url), servers_cpu(pids), time.monotonic(), machine_cpu()
    speaking: dict[str, list[bool]] = {}
    end = t0 + max(2.0, seconds - WARMUP_S - 4.0)
    while time.monotonic() < end:
        for sid, s in sessions(url).items():
            speaking.setdefault(sid, []).append(bool(s.get("speaking")))
        time.sleep(0.5)
    s1, c1, t1, k1 = sessions(url), servers_cpu(pids), time.monotonic(), machine_cpu()
    m1, b1 = model_stats(url), cpu_seconds(bots.pid)
    out, _ = bots.communicate(timeout=300)
    received = json.loads(out.strip().splitlines()[-1])
    wait_empty(url)
    dt = t1 - t0
    ids = [i for i in s1 if i in s0]

    def delta(key: str) -> int:
        return sum(s1[i][key] - s0[i][key] for i in ids)

    sent = [(s1[i]["frames_sent"]["video"] - s0[i]["frames_sent"]["video"]) / dt for i in ids]
    # frames rendered in time (a repeated frame is the previous picture sent again)
    fresh = [
        sent[j] - (s1[i]["frames_repeated"] - s0[i]["frames_repeated"]) / dt
        for j, i in enumerate(ids)
    ]
    talk = [sum(v) / len(v) for v in speaking.values() if v]
    cpu = (c1 - c0) / dt
    bots_cpu = (b1 - b0) / dt
    busy, steal = (k1[0] - k0[0]) / dt, (k1[1] - k0[1]) / dt
    frames = m1[1] - m0[1]
    return {
        "sessions": n,
        "server_cpu_cores": round(cpu, 3),
        "cpu_per_session": round(cpu / n, 3),
        "speaking_share_min": round(min(talk), 2) if talk else 0.0,
        "sent_fps_min": round(min(sent), 2) if sent else 0.0,
        "sent_fps_mean": round(sum(sent) / len(sent), 2) if sent else 0.0,
        "fresh_fps_min": round(min(fresh), 2) if fresh else 0.0,
        "repeated": delta("frames_repeated"),
        "skipped": delta("frames_skipped"),
        "late": delta("frames_late"),
        "recv_fps_min": min(r["fps"] for r in received),
        "recv_fps_mean": round(sum(r["fps"] for r in received) / len(received), 2),
        # server CPU per frame sent in time: the same work costs more when the CPU is slower
        "server_cpu_ms_per_fresh_frame": round(cpu * 1000 / sum(fresh), 1) if any(fresh) else None,
        # what else ran: the bots, anything outside both, and time the hypervisor took
        "bots_cpu_cores": round(bots_cpu, 3),
        "other_cpu_cores": round(max(0.0, busy - steal - cpu - bots_cpu), 3),
        "steal_cores": round(steal, 3),
        # wall time of the model per frame on its worker threads (rises when CPU is short)
        "model_ms_per_frame": round((m1[0] - m0[0]) * 1000 / frames, 1) if frames else None,
        # frames the model drew among those sent fresh (Wav2Lip; the rest: idle frames, and
        # calls degraded to visemes for missed deadlines)
        "model_share": round(frames / (sum(fresh) * dt), 2) if frames and any(fresh) else None,
    }


def speaking_runs(url: str, pids: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    speaking: list[dict[str, Any]] = []
    warm_up(url)
    for run in range(1, args.repeat + 1):
        for n in [int(x) for x in args.steps.split(",")]:
            row = {"run": run, **speaking_step(url, pids, n, args.seconds)}
            speaking.append(row)
            print_table([row])
            if not held(row) and not args.all_steps and args.repeat == 1:
                break
            time.sleep(2)
    return speaking


def held(row: dict[str, Any]) -> bool:
    return row["fresh_fps_min"] >= 24 and row["skipped"] == 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--speak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=18.0)
    p.add_argument("--memory-steps", default="1,4,8")
    p.add_argument("--steps", default="1,2,3,4,5,6,8")
    p.add_argument(
        "--engine",
        choices=("viseme", "wav2lip"),
        default="viseme",
        help="wav2lip: the random-weight Wav2Lip network (real architecture)",
    )
    p.add_argument("--device", default="openvino", help="lipsync.device for --engine wav2lip")
    p.add_argument("--precision", default="auto", help="lipsync.precision for --engine wav2lip")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="lipsync.max_wait_ms for --engine wav2lip (default: the config's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure the steps this many times (every step, every run)")
    p.add_argument("--all-steps", action="store_true",
                   help="measure every step, also after one falls under 24 fps")
    p.add_argument("--threads", type=int, default=0,
                   help="lipsync.intra_op_threads for --engine wav2lip (0 = every core)")
    p.add_argument("--nodes", type=int, default=0,
                   help="run N media nodes behind a front (and a redis-server) instead of "
                   "one server; the server CPU is theirs together")
    args = p.parse_args()
    if args.client:
        asyncio.run(client(args.url, args.client, args.seconds, args.speak))
        return
    if args.engine == "wav2lip":
        SERVER_ENV.update(wav2lip_env(args.device, args.precision))
        SERVER_ENV["AVATAR_LIPSYNC__INTRA_OP_THREADS"] = str(args.threads)
        if args.max_wait_ms is not None:
            SERVER_ENV["AVATAR_LIPSYNC__MAX_WAIT_MS"] = str(args.max_wait_ms)
    steps = [int(x) for x in args.memory_steps.split(",") if x]
    memory = [memory_step(n) for n in steps]
    with contextlib.ExitStack() as stack:
        if args.nodes:
            procs, url = stack.enter_context(start_cluster(args.nodes, SERVER_ENV))
        else:
            proc, url = start_server(SERVER_ENV)
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
            procs = [proc]
        lipsync = get_json(url + "/health").get("lipsync", {})
        print("lip-sync:", lipsync)
        speaking = speaking_runs(url, [p.pid for p in procs], args)
    print_table(memory)
    print_table(speaking)
    # a step holds in a run when every call got >= 24 fresh fps and no frame was skipped; the
    # capacity is the most calls held in more than half of the runs (neighbours on a shared
    # machine make single runs noisy: see other_cpu_cores, steal_cores, model_ms_per_frame)
    held_runs = {
        n: sum(held(r) for r in speaking if r["sessions"] == n)
        for n in dict.fromkeys(r["sessions"] for r in speaking)
    }
    per = [r["per_session_mb"] for r in memory]
    summary = {
        "memory_per_idle_session_mb": per[-1] if per else None,
        "memory_per_idle_session_mb_by_n": {r["sessions"]: r["per_session_mb"] for r in memory},
        "server_rss_mb_no_sessions": memory[0]["rss_mb_none"] if memory else None,
        "max_speaking_sessions_at_24fps_fresh": max(
            (n for n, k in held_runs.items() if 2 * k > args.repeat), default=0
        ),
        "runs": args.repeat,
        "runs_held_by_sessions": {str(n): k for n, k in held_runs.items()},
        "cpu_per_speaking_session_cores": speaking[0]["cpu_per_session"] if speaking else None,
        "engine": args.engine,
        "nodes": args.nodes,
        "lipsync": {
            k: lipsync.get(k)
            for k in (
                "engine", "backend", "precision", "rows", "threads", "streams",
                "frame_group", "render_lead_ms",
            )
        },
        "size": "512x512 at 25 fps (defaults)",
        "note": "bots (decoding every frame) share the same 2 cores at nice 19; other work on "
        "the machine at the time shows in the numbers",
    }
    print(json.dumps(summary, indent=1))
    name = "capacity"
    if args.engine == "wav2lip":
        name = f"capacity-wav2lip-{args.device}-{args.precision}-t{args.threads}"
    if args.nodes:
        name += f"-nodes{args.nodes}"
    write_result(name, {"summary": summary, "memory": memory, "speaking": speaking})


if __name__ == "__main__":
    main()
