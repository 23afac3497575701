"""The deployment files agree with the settings they configure.

docker-compose.yml and the Dockerfile cannot be run here (no Docker engine), so this checks
what can be checked: every AVATAR_* variable they set, with deploy/env.example's values filled
in the way Compose interpolates them, is a setting the server accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from config import load_settings
from rtc_server.ice import resolve_ice_servers

ROOT = Path(__file__).resolve().parent.parent
VAR = re.compile(r"\$\{(\w+)(?::([-?+])((?:[^{}]|\{[^{}]*\})*))?\}")


def example_env() -> dict[str, str]:
    env = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and ${VAR:+alternative}."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op == "-":
            return value or interpolate(arg, env)
        if op == "?":
            if not value:
                raise KeyError(f"{name}: {arg}")
            return value
        if op == "+":
            return interpolate(arg, env) if value else ""
        return value

    return VAR.sub(sub, text)


def interpolate_values(node: object, env: dict[str, str]) -> object:
    """Compose parses the YAML first, then interpolates the strings in it."""
    if isinstance(node, dict):
        return {k: interpolate_values(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_values(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return interpolate_values(data, example_env())  # type: ignore[return-value]


def test_compose_has_the_server_turn_and_redis(compose) -> None:
    services = compose["services"]
    assert {"avatar", "coturn", "redis", "render-worker"} <= set(services)
    assert services["avatar"]["network_mode"] == "host"  # WebRTC media is UDP on any port
    assert services["coturn"]["network_mode"] == "host"
    assert "/ready" in " ".join(services["avatar"]["healthcheck"]["test"])
    gpu = services["avatar"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


@pytest.mark.parametrize("service", ["avatar", "render-worker"])
def test_every_avatar_variable_is_a_valid_setting(compose, service) -> None:
    env = {k: str(v) for k, v in compose["services"][service]["environment"].items()}
    assert any(k.startswith("AVATAR_") for k in env)
    settings = load_settings(env=env)
    assert settings.jobs.backend == "redis"
    if service == "avatar":
        servers = resolve_ice_servers(settings.webrtc)
        turn = [s for s in servers if any(u.startswith("turn:") for u in s.urls)]
        assert turn and turn[0].username and turn[0].credential  # from the shared secret


def test_turn_secret_is_shared_with_coturn(compose) -> None:
    env = example_env()
    args = compose["services"]["coturn"]["command"]
    assert f"--static-auth-secret={env['TURN_SECRET']}" in args
    conf = (ROOT / "deploy" / "turnserver.conf").read_text()
    assert re.search(r"^use-auth-secret$", conf, re.M)
    assert compose["services"]["avatar"]["environment"]["AVATAR_WEBRTC__TURN_SECRET"] == (
        env["TURN_SECRET"]
    )


def test_dockerfile_is_a_non_root_cuda_image_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:12[\w.-]*runtime", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*/health", text, re.M)
    assert "requirements-gpu.txt" in text
    assert "onnxruntime-gpu" in (ROOT / "requirements-gpu.txt").read_text()
    env = dict(re.findall(r"(AVATAR_\w+)=(\S+)", text))
    assert env and load_settings(env=env)
