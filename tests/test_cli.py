"""The server command refuses bad configuration with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_server(*args: str, env_extra: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVATAR_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "rtc_server", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_unknown_key_in_user_yaml_stops_the_server(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("media:\n  fsp: 30\n")
    proc = run_server("--config", str(cfg))
    assert proc.returncode == 2
    assert "media.fsp" in proc.stderr and "unknown key" in proc.stderr


def test_wrong_type_from_environment_stops_the_server():
    proc = run_server(env_extra={"AVATAR_SERVER__PORT": "eighty"})
    assert proc.returncode == 2
    assert "server.port" in proc.stderr


def test_missing_config_file_is_reported(tmp_path):
    proc = run_server("--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr


def test_missing_insightface_pack_is_a_clear_start_up_error(tmp_path):
    proc = run_server("--port", str(free_port()), env_extra={
        "AVATAR_AVATARS__ANALYZER": "insightface",
        "AVATAR_AVATARS__INSIGHTFACE_ROOT": str(tmp_path / "no-pack"),
        "AVATAR_AVATARS__DATA_DIR": str(tmp_path / "data"),
        "AVATAR_SERVER__HOST": "127.0.0.1",
    })
    assert proc.returncode == 1
    assert "start-up failed" in proc.stderr and "no-pack" in proc.stderr
