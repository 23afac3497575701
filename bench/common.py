"""Shared benchmark plumbing: a server subprocess on loopback, results as table + JSON.

Benchmarks that open peer connections must run in a loopback-only network namespace:
``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.NAME'``."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update({"AVATAR_SERVER__HOST": "127.0.0.1", "AVATAR_WEBRTC__HOST_CANDIDATES": "loopback",
                "AVATAR_SERVER__LOG_LEVEL": "warning"})
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "rtc_server", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@contextlib.contextmanager
def start_cluster(nodes: int, env_extra: dict[str, str] | None = None) -> Iterator[
        tuple[list[subprocess.Popen[bytes]], str]]:
    """A redis-server, ``nodes`` media nodes and a front on 127.0.0.1 (``cluster.role``);
    yields (the front and node processes, the front's URL) and stops them all."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        base = {"AVATAR_CLUSTER__DRAIN_TIMEOUT_S": "1",  # stopping never waits for calls
                **(env_extra or {}), "AVATAR_CLUSTER__REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        for i in range(nodes):
            proc, _ = start_server({**base, "AVATAR_CLUSTER__ROLE": "node",
                                    "AVATAR_CLUSTER__NODE_ID": f"node-{i + 1}"})
            procs.append(proc)
        front, url = start_server({**base, "AVATAR_CLUSTER__ROLE": "front"})
        procs.insert(0, front)
        for _ in range(100):  # every node registered
            with urllib.request.urlopen(url + "/cluster/nodes", timeout=2) as r:
                if len(json.loads(r.read())["nodes"]) == nodes:
                    break
            time.sleep(0.1)
        yield procs, url
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        redis.terminate()
        redis.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "cpu": next((ln.split(":", 1)[1].strip() for ln in
                         Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("model name")), "?")}


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(width[c]) for c in cols))
