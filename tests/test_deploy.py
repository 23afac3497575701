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


# --------------------------------------------------------------------------- scale-out
K8S = ROOT / "deploy" / "k8s"
# what the manifests take from secrets and the cluster (stand-ins of the right form)
SECRETS = {"api-keys": '["' + "k" * 24 + '"]', "turn-secret": "t" * 32}
DOWNWARD = {"HOST_IP": "10.1.2.3", "NODE_NAME": "gpu-node-1"}


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def config_map(docs: list[dict], name: str) -> dict[str, str]:
    return next(d["data"] for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"] == name)


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes gives it: secrets, config maps, the downward
    API and $(VAR) references filled in."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        else:
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                value = SECRETS[ref["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                value = config_map(docs, r["name"])[r["key"]]
            else:
                value = DOWNWARD[item["name"]]
        env[item["name"]] = value
    return env


def our_containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("avatar-rtc"):
                    out.append((d, c))
    return out


def app_routes(settings) -> set[str]:
    from rtc_server.app import create_app
    from rtc_server.cluster.front import create_front_app

    app = (create_front_app(settings) if settings.cluster.role == "front"
           else create_app(settings))
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_every_manifest_parses_and_names_real_settings_ports_and_commands() -> None:
    import importlib.util

    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "DaemonSet", "Service", "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    roles = set()
    for workload, c in our_containers(docs):
        env = container_env(docs, c)
        settings = load_settings(env=env)  # every AVATAR_* key exists and its value is valid
        roles.add(settings.cluster.role)
        assert c["command"][:2] == ["python3", "-m"]
        assert importlib.util.find_spec(c["command"][2]) is not None, c["command"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == settings.server.port
        routes = app_routes(settings)
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] in routes and get["port"] in ports, (probe, get)
        redis_host = settings.cluster.redis_url.split("//")[1].split(":")[0].split(".")[0]
        assert redis_host in services, settings.cluster.redis_url
        if settings.cluster.role == "node":
            assert workload["spec"]["template"]["spec"]["hostNetwork"] is True  # media is UDP
            assert settings.cluster.node_url == f"http://10.1.2.3:{settings.server.port}"
            assert settings.cluster.node_id == "gpu-node-1"
            hook = c["lifecycle"]["preStop"]["exec"]["command"]
            assert hook[:2] == ["python3", "-m"] and importlib.util.find_spec(hook[2])
            grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > settings.cluster.drain_timeout_s
            assert "/cluster/drain" in routes
    assert roles == {"front", "node"}
    # every Service selects pods that have the port it targets
    for svc in services.values():
        pods = [c for w, c in our_containers(docs) + [
            (d, c) for d in docs if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]]
            if w["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]]
        assert pods, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert any(port["targetPort"] in {p["name"] for p in c["ports"]} for c in pods)


def test_the_compose_cluster_profile_runs_a_front_and_two_nodes(compose) -> None:
    services = compose["services"]
    from pipeline.lipsync.serve import ROUTE

    cluster = {n: s for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert set(cluster) == {"front", "node-1", "node-2", "pool"}
    pool = cluster.pop("pool")
    command = pool["command"]
    assert command[:3] == ["python3", "-m", "pipeline.lipsync.serve"]
    pool_port = int(command[command.index("--port") + 1])
    pool_settings = load_settings(env={k: str(v) for k, v in pool["environment"].items()})
    assert pool_settings.lipsync.device == "cuda"
    assert f"127.0.0.1:{pool_port}{ROUTE}" in " ".join(pool["healthcheck"]["test"])
    ports, ids = set(), set()
    for name, svc in cluster.items():
        settings = load_settings(env={k: str(v) for k, v in svc["environment"].items()})
        assert settings.cluster.role == ("front" if name == "front" else "node")
        assert settings.cluster.redis_url.startswith("redis://127.0.0.1:6379")
        assert svc["network_mode"] == "host"
        health = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{settings.server.port}/ready" in health
        ports.add(settings.server.port)
        if name != "front":
            assert settings.cluster.node_url == f"http://127.0.0.1:{settings.server.port}"
            ids.add(settings.cluster.node_id)
            grace = int(svc["stop_grace_period"].rstrip("s"))
            assert grace > settings.cluster.drain_timeout_s
            assert settings.access.trusted_proxies == ("127.0.0.1/32",)
            assert settings.lipsync.device == "remote"
            assert settings.lipsync.pool_url == f"http://127.0.0.1:{pool_port}{ROUTE}"
            assert svc["depends_on"]["pool"]["condition"] == "service_healthy"
    assert len(ports) == 3 and ids == {"node-1", "node-2"}


def test_the_pool_manifest_deploys_the_serve_app_the_nodes_call() -> None:
    import importlib

    from pipeline.lipsync.serve import ROUTE

    docs = k8s_docs()
    (ray_service,) = [d for d in docs if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["route_prefix"] == ROUTE
    cluster = ray_service["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        settings = load_settings(env=container_env(docs, worker))
        assert settings.lipsync.device == "cuda" and settings.lipsync.wav2lip_model
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the nodes call it at its Serve service (KubeRay names it <name>-serve-svc, port 8000)
    url = f"http://{ray_service['metadata']['name']}-serve-svc:8000{ROUTE}"
    nodes = [c for w, c in our_containers(docs) if w["kind"] == "DaemonSet"]
    assert nodes
    for c in nodes:
        settings = load_settings(env=container_env(docs, c))
        assert settings.lipsync.device == "remote" and settings.lipsync.pool_url == url
