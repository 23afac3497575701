"""Where one speaking call's server CPU goes: py-spy samples the server process (native frames
included) while one bot keeps its avatar talking (``bench.capacity``'s speaking load), and each
sample is put in one stage by the innermost frame that names one.

Stages: ``encode`` (VP8/H.264), ``render`` (face, compositor, I420), ``speech`` (Piper, viseme
analysis), ``mic`` (decoding, resampling, VAD), ``opus`` (audio encode), ``rtp`` (packetizing,
SRTP, sending), ``handoff`` (executor/futures/``call_soon_threadsafe``), ``loop`` (the rest of
the event loop), ``other``. The share of samples times the server's measured CPU gives CPU-ms
per frame for each stage. The CPU of every thread is read apart by its OS name; with
``--wav2lip openvino:bf16`` the Wav2Lip engine runs on the random-weight network, and the
threads its runtime starts (named ``model``) give the model's CPU, the rest is "outside the
model".

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.profile_call'``"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.capacity import SERVER_ENV, sessions, start_bots, wait_sessions, wav2lip_env
from bench.common import cpu_seconds, print_table, start_server, write_result
from bench.soak import get_json
from pipeline.lipsync.backends import MODEL_THREADS

# innermost match wins: (stage, substrings of a frame "function (file)")
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("encode", ("vpx_codec_encode", "vp8_", "vp8cx", "x264", "libvpx", "encoders.py",
                "codecs/vpx.py", "codecs/h264.py")),
    ("opus", ("opus", "codecs/opus.py")),
    ("mic", ("mic.py", "vad.py", "resampler", "decode (av", "swr_", "codecs/g711",
             "avcodec_send_packet", "jitterbuffer")),
    ("speech", ("piper", "tts.py", "tts_scheduler", "speaking.py", "viseme", "speech_units",
                "onnxruntime", "phonem")),
    ("render", ("face/", "compositor.py", "frames.py", "tracks.py", "clapper.py", "sws_",
                "reformat", "from_ndarray", "to_ndarray", "cv2")),
    ("rtp", ("rtcrtpsender", "rtp.py", "rtcdtlstransport", "rtcicetransport", "aioice",
             "srtp", "sendto", "_sendto", "rtcrtpreceiver", "rtcsctptransport", "crypto")),
    ("handoff", ("call_soon_threadsafe", "futures.py", "thread.py", "_chain_future",
                 "run_in_executor", "queue.py", "threading.py", "_write_to_self", "wrap_future")),
    ("loop", ("base_events", "selector_events", "events.py", "selectors.py", "asyncio")),
]


# leaves where a thread waits (py-spy without --native counts some waits as active)
IDLE_LEAVES = ("EpollSelector.select", "Condition.wait",
               "_worker (concurrent/futures/thread.py:81)", "Queue.get", "Event.wait",
               "Thread.join", "lock.acquire")


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    if any(key in frames[-1] for key in IDLE_LEAVES):
        return "idle"
    for frame in reversed(frames):
        low = frame.lower()
        for stage, keys in STAGES:
            if any(k in low for k in keys):
                return stage
    return "other"


def read_collapsed(path: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[stage_of(stack)] += int(n)
    return counts


def top_leaves(path: Path, k: int = 25) -> list[tuple[str, int]]:
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            leaf = stack.split(";")[-1]
            if not any(key in leaf for key in IDLE_LEAVES):
                leaves[leaf] += int(n)
    return leaves.most_common(k)


def thread_group(name: str) -> str:
    """``render_0`` -> ``render``, ``mic-1a2b3c_0`` -> ``mic``; unnamed threads (the event
    loop, aiortc's decoder threads, native pools) keep the executable's name."""
    head = name.split("_")[0]
    return head.split("-")[0] if head.startswith(("mic-", "piper-", "tts-")) else head


def thread_counters(pid: int) -> tuple[dict[int, tuple[str, float]],
                                        dict[int, tuple[str, int, int]]]:
    """Every thread of ``pid`` so far, by thread id, with its OS name: its CPU seconds (user +
    system), and its voluntary and involuntary context switches. A voluntary one is a sleep
    and a wake-up: a wait for work, a timer, a lock or the GIL."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, tuple[str, float]] = {}
    switches: dict[int, tuple[str, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in
                          (task / "status").read_text().splitlines() if ":" in line)
        except OSError:  # the thread ended meanwhile
            continue
        tid = int(task.name)
        cpu[tid] = (name, (int(fields[11]) + int(fields[12])) / ticks)
        switches[tid] = (name, int(status["voluntary_ctxt_switches"]),
                         int(status["nonvoluntary_ctxt_switches"]))
    return cpu, switches


def udp_datagrams() -> int:
    """UDP datagrams sent in this network namespace so far. Run in a namespace of its own
    (unshare --net), every one goes between the server and its bots: each is a packet the
    server either sent or received (RTP, RTCP, STUN)."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
            if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("OutDatagrams")])


def system_seconds(pid: int, tid: int) -> float:
    """CPU seconds thread ``tid`` of ``pid`` spent in the kernel so far."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def by_thread_group(before: dict[int, tuple[str, float]],
                    after: dict[int, tuple[str, float]]) -> dict[str, float]:
    groups: collections.Counter[str] = collections.Counter()
    for tid, (name, cpu) in after.items():
        groups[thread_group(name)] += cpu - before.get(tid, (name, 0.0))[1]
    return dict(groups)


def batching(url: str) -> dict[str, Any] | None:
    """The Wav2Lip engine's batch worker counters (``/health``), None for other engines."""
    info = get_json(url + "/health").get("lipsync") or {}
    stats = info.get("batching")
    return stats if isinstance(stats, dict) else None


def batching_delta(b0: dict[str, Any] | None, b1: dict[str, Any] | None,
                   fresh: int) -> dict[str, Any] | None:
    """What the batch worker did between two reads: batch sizes, wake-ups a fresh frame."""
    if b0 is None or b1 is None:
        return None
    sizes = {k: n - b0["sizes"].get(k, 0) for k, n in b1["sizes"].items()}
    batches = b1["batches"] - b0["batches"]
    return {"batches": batches,
            "mean_batch": round((b1["items"] - b0["items"]) / max(batches, 1), 2),
            "sizes": {k: n for k, n in sizes.items() if n},
            "cancelled": b1["cancelled"] - b0["cancelled"],
            "wakeups_per_fresh_frame": None if "wakeups" not in b0 else
            round((b1["wakeups"] - b0["wakeups"]) / max(fresh, 1), 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=16.0)
    p.add_argument("--rate", type=int, default=200)
    p.add_argument("--label", default="")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--native", action="store_true", help="py-spy --native (slower sampling)")
    p.add_argument("--threads", action="store_true",
                   help="py-spy --threads: each stack starts with its thread (the saved samples "
                        "can then be split by thread)")
    p.add_argument("--spy", action="append", default=[], metavar="ARG",
                   help="extra py-spy record argument (repeatable), e.g. --spy=--gil")
    p.add_argument("--blocking", action="store_true",
                   help="pause the server at each sample (consistent stacks, some overhead)")
    p.add_argument("--env", action="append", default=[], metavar="AVATAR_X__Y=V",
                   help="extra server setting (repeatable)")
    p.add_argument("--wav2lip", metavar="DEVICE:PRECISION", default="",
                   help="the Wav2Lip engine on the random-weight network (as bench.capacity's "
                        "--engine wav2lip), e.g. openvino:bf16")
    args = p.parse_args()

    env = dict(SERVER_ENV)
    if args.wav2lip:
        device, _, precision = args.wav2lip.partition(":")
        env.update(wav2lip_env(device, precision or "auto"))
    env.update(item.split("=", 1) for item in args.env)
    proc, url = start_server(env)
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    try:
        bots = start_bots(url, args.calls, args.seconds + 12, speak=True)
        wait_sessions(url, args.calls)
        time.sleep(6.0)
        s0, c0, t0 = sessions(url), cpu_seconds(proc.pid), time.monotonic()
        batch0 = batching(url)
        threads0, switches0 = thread_counters(proc.pid)
        loop_sys0 = system_seconds(proc.pid, proc.pid)
        udp0 = udp_datagrams()
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid),
               "-r", str(args.rate), "-d", str(int(args.seconds)), "-f", "raw", "-o", str(out)]
        # --native reads native stacks, which needs the process paused at each sample
        if args.threads:
            cmd.append("--threads")
        cmd += args.spy
        if args.native:
            cmd.append("--native")
        elif not args.blocking:
            cmd.append("--nonblocking")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s1, c1, t1 = sessions(url), cpu_seconds(proc.pid), time.monotonic()
        batch1 = batching(url)
        threads1, switches1 = thread_counters(proc.pid)
        loop_sys = system_seconds(proc.pid, proc.pid) - loop_sys0
        packets = udp_datagrams() - udp0
        bots.wait(timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    fresh = sum(
        (s1[k]["frames_sent"]["video"] - s1[k]["frames_repeated"])
        - (s0[k]["frames_sent"]["video"] - s0[k]["frames_repeated"])
        for k in s1 if k in s0
    )
    cpu_ms = (c1 - c0) * 1000
    ms_per_frame = cpu_ms / max(fresh, 1)
    counts = read_collapsed(out)
    idle = counts.pop("idle", 0)
    total = sum(counts.values())
    rows: list[dict[str, Any]] = []
    for stage, _ in [*STAGES, ("other", ())]:
        share = counts.get(stage, 0) / max(total, 1)
        rows.append({"stage": stage, "share_pct": round(100 * share, 1),
                     "cpu_ms_per_frame": round(share * ms_per_frame, 2)})
    rows.append({"stage": "total", "share_pct": 100.0,
                 "cpu_ms_per_frame": round(ms_per_frame, 2)})
    print(f"py-spy samples: {out}")
    print(f"server CPU {cpu_ms / (t1 - t0) / 10:.1f} % of a core, {fresh} fresh frames over "
          f"{t1 - t0:.1f} s, {ms_per_frame:.2f} CPU-ms per fresh frame; {total} busy samples "
          f"({idle} waiting left out)")
    print_table(rows)
    frames_s = fresh / (t1 - t0)
    thread_rows = [
        {"threads": group, "cpu_ms_per_frame": round(1000 * cpu / max(fresh, 1), 2),
         "cores": round(cpu / (t1 - t0), 3)}
        for group, cpu in sorted(by_thread_group(threads0, threads1).items(),
                                 key=lambda kv: -kv[1]) if cpu > 0
    ]
    unnamed = sorted(
        (1000 * (cpu - threads0.get(tid, (name, 0.0))[1]) / max(fresh, 1), tid)
        for tid, (name, cpu) in threads1.items() if thread_group(name).startswith("python")
    )[::-1]
    print("unnamed threads, CPU-ms per frame each:",
          ", ".join(f"{ms:.2f} ({'loop' if tid == proc.pid else tid})"
                    for ms, tid in unnamed if ms >= 0.01))
    print(f"event loop thread in the kernel: {1000 * loop_sys / max(fresh, 1):.2f} ms a frame")
    loop_cpu = threads1[proc.pid][1] - threads0.get(proc.pid, ("", 0.0))[1]
    rtp_ms = next(r["cpu_ms_per_frame"] for r in rows if r["stage"] == "rtp") * fresh
    per_packet = {
        "packets_per_s": round(packets / (t1 - t0), 1),
        "packets_per_fresh_frame": round(packets / max(fresh, 1), 2),
        "loop_cpu_ms_per_packet": round(1000 * loop_cpu / max(packets, 1), 4),
        "rtp_stage_cpu_ms_per_packet": round(rtp_ms / max(packets, 1), 4),
    }
    print("packets the server sent or received (UDP datagrams in the namespace):", per_packet)
    switch_rows: dict[str, list[float]] = {}  # by the same groups as thread_rows
    for tid, (name, vol, invol) in switches1.items():
        _, vol0, invol0 = switches0.get(tid, (name, 0, 0))
        row = switch_rows.setdefault(thread_group(name), [0.0, 0.0])
        row[0] += (vol - vol0) / max(fresh, 1)
        row[1] += (invol - invol0) / max(fresh, 1)
    for row in thread_rows:
        vol, invol = switch_rows.get(row["threads"], [0.0, 0.0])
        row["voluntary_switches_per_frame"] = round(vol, 2)
        row["involuntary_switches_per_frame"] = round(invol, 2)
    voluntary = round(sum(v for v, _ in switch_rows.values()), 2)
    print(f"\nby thread (OS names; {frames_s:.1f} fresh frames/s; {voluntary} voluntary context "
          "switches a fresh frame in all):")
    print_table(thread_rows)
    # a lip-sync model's runtime threads are named MODEL_THREADS: the rest is outside it
    model_ms = next((r["cpu_ms_per_frame"] for r in thread_rows if r["threads"] == MODEL_THREADS),
                    None)
    outside_ms = None if model_ms is None else round(ms_per_frame - model_ms, 2)
    batch = batching_delta(batch0, batch1, fresh)
    if batch is not None:
        print("the model's batches:", batch)
    if model_ms is not None:
        print(f"the model's threads {model_ms:.2f} CPU-ms a fresh frame; everything outside "
              f"the model {outside_ms:.2f}")
    print("\ntop leaves:")
    for leaf, n in top_leaves(out):
        print(f"  {100 * n / max(total, 1):5.1f}%  {leaf[:150]}")
    name = "profile_call" + (f"-{args.label}" if args.label else "")
    write_result(name, {"calls": args.calls, "seconds": round(t1 - t0, 1),
                        "fresh_frames": fresh, "server_cpu_ms_per_fresh_frame":
                        round(ms_per_frame, 2), "stages": rows, "threads": thread_rows,
                        "packets": per_packet, "model_cpu_ms_per_frame": model_ms,
                        "voluntary_switches_per_frame": voluntary,
                        "outside_model_cpu_ms_per_frame": outside_ms, "batching": batch,
                        "top_leaves": [{"leaf": leaf[:200], "samples": n}
                                       for leaf, n in top_leaves(out, 40)],
                        "native": args.native, "env": args.env, "wav2lip": args.wav2lip,
                        "python": sys.version})


if __name__ == "__main__":
    main()
