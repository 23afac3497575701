"""Shared fixtures: a live server subprocess for end-to-end tests, kept on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatars.model import DEFAULT_AVATAR_DIR
from media_tracks.aiortc_compat import use_host_candidates

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("AVATAR_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))


def in_loopback_only_netns() -> bool:
    """True when the only network interface is ``lo`` (as inside ``unshare --net``)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@pytest.fixture(scope="session")
def loopback_only() -> None:
    """Peer-connection tests run only inside a loopback-only network namespace.

    ``scripts/test`` provides one and sets AVATAR_REQUIRE_NETNS=1, which turns a skip into a
    failure so CI can never pass by skipping these tests."""
    if in_loopback_only_netns():
        return
    reason = "needs a loopback-only network namespace: run via scripts/test"
    if os.environ.get("AVATAR_REQUIRE_NETNS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def loopback_candidates() -> Iterator[None]:
    """Peer connections made in tests gather 127.0.0.1 only, whatever a test's settings say
    (the server's entry point applies ``webrtc.host_candidates``; ``create_app`` does not)."""
    use_host_candidates("loopback")
    yield
    use_host_candidates("loopback")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "AVATAR_SERVER__HOST": "127.0.0.1",
            "AVATAR_WEBRTC__HOST_CANDIDATES": "loopback",
            "AVATAR_WEBRTC__ICE_SERVERS": "[]",
        }
    )
    env.update(env_extra or {})
    log = open(ARTIFACTS / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtc_server", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def face_rgb() -> np.ndarray:
    """The default avatar's portrait (a real face with committed landmarks), RGB."""
    bgr = cv2.imread(str(DEFAULT_AVATAR_DIR / "astronaut.png"))
    assert bgr is not None
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def committed() -> np.ndarray:
    """The default avatar's committed 68 landmarks."""
    meta = json.loads((DEFAULT_AVATAR_DIR / "avatar.json").read_text())
    return np.array(meta["landmarks"], dtype=np.float64)


@pytest.fixture(scope="module")
def live_server(loopback_only: None, artifacts_dir: Path) -> Iterator[str]:
    """URL of a real server process (``python -m rtc_server``) on 127.0.0.1."""
    port = free_port()
    proc = start_server(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the module (skipped, saying so, without the
    Debian package; ``scripts/test`` installs it)."""
    from tests.fakes.redis_server import redis_server, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def wav2lip_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Wav2Lip generator exported to ONNX (seed 0), built once per session."""
    from tests.fakes.wav2lip import random_wav2lip_onnx  # imports torch: only when used

    return random_wav2lip_onnx(tmp_path_factory.mktemp("wav2lip"), seed=0)
