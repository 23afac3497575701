"""Soak: many connect/disconnect cycles with the bot against one server process; does memory
grow, do tasks, threads or file descriptors leak, are sessions left behind?

Each cycle: a bot joins (offer, ICE, DTLS, data channel), waits for the first video frame,
hangs up, and the cycle waits until the server has forgotten the session. After the warm-up
cycles (allocator pools, codec and thread-pool start-up) and at the end the server is measured:
RSS from psutil on its pid, threads and open file descriptors, and from /health/detailed its
asyncio task count and RSS as it reports them. ``GET /sessions`` must be empty at the end.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.soak'``
(200 cycles after 20 warm-up; ``tests/test_soak.py`` runs the same code with fewer)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from bench.common import print_table, start_server, write_result

# The soak client opens well over the default 30 offers a minute; the server must not close
# a quiet call on its idle or media timers while the soak is measuring it.
SERVER_ENV = {
    "AVATAR_ACCESS__OFFER_PER_MIN": "0",
    "AVATAR_SESSIONS__MAX_CONCURRENT": "16",
    # these measure past capacity on purpose: no admission from measured headroom
    "AVATAR_SESSIONS__HEADROOM_ADMISSION": "false",
}


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.load(r)


@dataclass
class Snapshot:
    """The server at one moment: RSS (bytes), threads, fds, asyncio tasks (None where
    /health/detailed is missing), live sessions."""

    cycle: int
    rss_bytes: int
    threads: int
    open_fds: int
    asyncio_tasks: int | None
    reported_rss_bytes: int | None
    sessions: int

    @classmethod
    def take(cls, url: str, pid: int, cycle: int) -> Snapshot:
        proc = psutil.Process(pid)
        with proc.oneshot():
            rss, threads, fds = proc.memory_info().rss, proc.num_threads(), proc.num_fds()
        tasks = reported = None
        try:
            detailed = get_json(url + "/health/detailed")
            tasks = detailed["process"].get("asyncio_tasks")
            reported = detailed["process"].get("rss_bytes")
        except (urllib.error.HTTPError, KeyError, TypeError):
            pass
        sessions = len(get_json(url + "/sessions")["sessions"])
        return cls(cycle, rss, threads, fds, tasks, reported, sessions)


@dataclass
class SoakResult:
    cycles: int
    warmup: int
    seconds: float
    cycle_ms_median: float
    failures: list[str]
    snapshots: list[Snapshot]
    client_tasks_before: int
    client_tasks_after: int
    leftover_sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def baseline(self) -> Snapshot:
        return self.snapshots[0]

    @property
    def final(self) -> Snapshot:
        return self.snapshots[-1]

    @property
    def rss_growth_bytes(self) -> int:
        return self.final.rss_bytes - self.baseline.rss_bytes

    @property
    def task_growth(self) -> int | None:
        a, b = self.baseline.asyncio_tasks, self.final.asyncio_tasks
        return None if a is None or b is None else b - a

    def summary(self) -> dict[str, Any]:
        mb = 1 / (1024 * 1024)
        return {
            "cycles": self.cycles,
            "warmup_cycles": self.warmup,
            "seconds": round(self.seconds, 1),
            "cycle_ms_median": self.cycle_ms_median,
            "failures": len(self.failures),
            "rss_mb_after_warmup": round(self.baseline.rss_bytes * mb, 1),
            "rss_mb_end": round(self.final.rss_bytes * mb, 1),
            "rss_growth_mb": round(self.rss_growth_bytes * mb, 2),
            "rss_growth_kb_per_cycle": round(self.rss_growth_bytes / 1024 / max(1, self.cycles),
                                             1),
            "server_tasks_after_warmup": self.baseline.asyncio_tasks,
            "server_tasks_end": self.final.asyncio_tasks,
            "server_threads": [self.baseline.threads, self.final.threads],
            "server_threads_range": [min(s.threads for s in self.snapshots),
                                     max(s.threads for s in self.snapshots)],
            "server_open_fds": [self.baseline.open_fds, self.final.open_fds],
            "client_tasks": [self.client_tasks_before, self.client_tasks_after],
            "sessions_left": len(self.leftover_sessions),
            "targets": {"rss_growth_mb": 50, "sessions_left": 0},
        }


async def wait_forgotten(url: str, session_id: str | None, limit_s: float) -> bool:
    """Until GET /sessions no longer lists the session (False past ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        body = await loop.run_in_executor(None, get_json, url + "/sessions")
        if all(s["id"] != session_id for s in body["sessions"]):
            return True
        await asyncio.sleep(0.05)
    return False


async def one_cycle(url: str, *, first_video_s: float = 20.0, forget_s: float = 20.0) -> str | None:
    """Join, see video, hang up, wait until the server forgot the call. None, or what failed."""
    from rtc_server.bot import Bot

    bot = Bot(url)
    try:
        await bot.connect()
        await bot.wait_first_video(first_video_s)
        if not bot.video.arrival:
            return "no video frame"
    except Exception as exc:  # noqa: BLE001 - a soak counts failures and goes on
        return f"connect failed: {exc!r}"[:200]
    finally:
        await bot.aclose()
    if not await wait_forgotten(url, bot.session_id, forget_s):
        return f"session {bot.session_id} still listed {forget_s:g} s after hanging up"
    return None


async def soak(url: str, pid: int, *, cycles: int, warmup: int, every: int = 0,
               log: bool = False) -> SoakResult:
    """``warmup`` cycles, a baseline snapshot, ``cycles`` measured cycles (a snapshot every
    ``every`` cycles if > 0), then the final snapshot."""
    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    for _ in range(warmup):
        if (err := await one_cycle(url)) is not None:
            failures.append(f"warm-up: {err}")
    await asyncio.sleep(1.0)  # let the last close settle
    client_before = len(asyncio.all_tasks())
    snaps = [await loop.run_in_executor(None, Snapshot.take, url, pid, 0)]
    durations: list[float] = []
    t_start = time.monotonic()
    for i in range(1, cycles + 1):
        t0 = time.monotonic()
        if (err := await one_cycle(url)) is not None:
            failures.append(f"cycle {i}: {err}")
        durations.append(time.monotonic() - t0)
        if every and i % every == 0 and i < cycles:
            snaps.append(await loop.run_in_executor(None, Snapshot.take, url, pid, i))
            if log:
                print_table([asdict(snaps[-1])])
    seconds = time.monotonic() - t_start
    await asyncio.sleep(1.0)
    snaps.append(await loop.run_in_executor(None, Snapshot.take, url, pid, cycles))
    left = (await loop.run_in_executor(None, get_json, url + "/sessions"))["sessions"]
    durations.sort()
    return SoakResult(
        cycles=cycles,
        warmup=warmup,
        seconds=seconds,
        cycle_ms_median=round(1000 * durations[len(durations) // 2], 1) if durations else 0.0,
        failures=failures,
        snapshots=snaps,
        client_tasks_before=client_before,
        client_tasks_after=len(asyncio.all_tasks()),
        leftover_sessions=left,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--every", type=int, default=25, help="snapshot every N cycles")
    args = p.parse_args()
    proc, url = start_server(SERVER_ENV)
    try:
        result = asyncio.run(soak(url, proc.pid, cycles=args.cycles, warmup=args.warmup,
                                  every=args.every, log=True))
    finally:
        proc.terminate()
        proc.wait()
    rows = [asdict(s) for s in result.snapshots]
    print_table(rows)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    write_result("soak", {"summary": summary, "snapshots": rows, "failures": result.failures})


if __name__ == "__main__":
    main()
