"""A real ``redis-server`` (Debian package) for tests: loopback only, no persistence.

Use ``with redis_server(tmp_dir) as url: ...``; ``redis_server_binary()`` is None where the
binary is missing (tests then skip, saying so).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(work_dir: Path, *, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Start redis-server on a free 127.0.0.1 port with ``work_dir`` as its folder; yields
    its URL and stops it afterwards."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    work_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(work_dir / "redis.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work_dir)],
        stdout=log, stderr=subprocess.STDOUT, cwd=work_dir,
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _ping(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
