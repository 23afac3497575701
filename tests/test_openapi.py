"""GET /openapi.json: the document describes exactly the app's routes and is valid OpenAPI 3.1;
then a property-based fuzz run (schemathesis) against the live app on loopback checks that no
answer is a 5xx, every status is documented for its operation, JSON answers match their
documented schema and every error is ``{error, detail}``.

The fuzzed app is cheap: a tone instead of Piper, ``tests.fakes.render.fake_run`` instead of
the clip renderer (a render takes ~0.2 s and makes no video), a short text limit, a small job
queue and the rate limits off (one client sends every request)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.errors import BadRequest
from config import Settings, load_settings
from rtc_server.app import create_app
from rtc_server.openapi import OPENAPI_PATH, build_openapi
from tests.fakes.render import fake_run
from tests.fakes.tts import ToneTTS

pytestmark = pytest.mark.timeout(300)

HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def fuzz_settings(data_dir: str = "/nonexistent-fuzz-data") -> Settings:
    return load_settings(
        env={},
        overrides={
            "avatars.data_dir": data_dir,
            "media.video_width": 64,
            "media.video_height": 64,
            "conversation.listen": False,
            "webrtc.host_candidates": "loopback",
            "render.max_text_chars": 200,
            "render.sync_timeout_s": 60,
            "jobs.max_queue": 4,
            "jobs.workers": 1,
            "access.offer_per_min": 0,
            "access.avatars_per_min": 0,
            "access.render_per_min": 0,
        },
    )


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route, less HEAD, static files and WebSockets."""
    out = set()
    for route in app.router.routes():
        resource = route.resource
        if route.method == "HEAD" or resource is None or isinstance(
            resource, web.StaticResource
        ):
            continue
        out.add((route.method.lower(), resource.canonical))
    return out


def doc_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


# --- the document ---------------------------------------------------------------------------
def test_document_describes_exactly_the_registered_routes() -> None:
    s = fuzz_settings()
    app = create_app(s, tts=ToneTTS())
    doc = build_openapi(s)
    routes = app_routes(app)
    ws = set(doc["x-websocket"])
    assert ws == {"/ws/jobs/{job_id}"}
    assert ("get", "/ws/jobs/{job_id}") in routes  # documented under x-websocket instead
    assert {("get", "/ready"), ("get", "/metrics"), ("get", "/health/detailed")} <= routes
    assert doc_operations(doc) == routes - {("get", p) for p in ws}


@pytest.mark.parametrize("role", ["node", "front"])
def test_a_node_and_a_front_are_described_by_their_own_routes(role: str) -> None:
    from rtc_server.cluster.front import create_front_app

    s = load_settings(env={}, overrides={"cluster.role": role})
    app = create_front_app(s) if role == "front" else create_app(s, tts=ToneTTS())
    doc = build_openapi(s)
    routes = app_routes(app)
    assert doc_operations(doc) == routes - {("get", p) for p in doc["x-websocket"]}
    assert ("post", "/cluster/drain" if role == "node" else "/cluster/nodes/{node_id}/drain") \
        in routes
    schemathesis.openapi.from_dict(doc)  # valid


def test_document_is_valid_openapi_3_1_with_errors_security_and_bounds() -> None:
    s = fuzz_settings()
    doc = build_openapi(s)
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises on any mistake
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": "/", "description": "this server"}]
    json.dumps(doc)  # plain JSON data
    paths = doc["paths"]
    # every error answer is the {error, detail} body (not /ready's 503: a readiness report)
    for path, item in paths.items():
        if path == "/ready":
            continue
        for method, op in item.items():
            assert op["tags"] and op["responses"], (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400 and "RenderTimeout" not in json.dumps(resp):
                    schema_ref = resp["content"]["application/json"]["schema"]
                    assert schema_ref == {"$ref": "#/components/schemas/Error"}, (path, status)
    # admin routes carry the API key schemes and their refusals
    admin = [("get", "/sessions"), ("delete", "/sessions/{session_id}"), ("post", "/avatars"),
             ("delete", "/avatars/{avatar_id}"), ("get", "/cache/stats"), ("delete", "/cache"),
             ("post", "/cache/cleanup"), ("get", "/metrics"), ("get", "/health/detailed")]
    for method, path in admin:
        op = paths[path][method]
        assert op["security"] == [{"bearerAuth": []}, {"apiKey": []}], path
        assert {"401", "403"} <= set(op["responses"]), path
    assert "security" not in paths["/avatars"]["get"]
    assert {"/", "/register", "/web/{name}", "/health", "/ready"} <= set(paths)
    for path in ("/", "/register", "/web/{name}", "/health", "/ready"):
        assert "security" not in paths[path]["get"], path
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": schemes["apiKey"]["description"]}
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    # bounds come from the settings
    render = doc["components"]["schemas"]["RenderRequest"]
    assert render["properties"]["text"]["maxLength"] == 200
    assert render["properties"]["speed"]["minimum"] == 0.5
    assert render["properties"]["speed"]["maximum"] == 2.0
    assert render["additionalProperties"] is False and render["required"] == ["text"]
    assert set(paths["/v1/render"]["post"]["requestBody"]["content"]) == {
        "application/json", "multipart/form-data"}
    assert "429" in paths["/offer"]["post"]["responses"]
    assert paths["/offer"]["post"]["responses"]["503"]["headers"]["Retry-After"]
    # an offer token in the settings: the routes behind it say so (and may answer 401)
    token_routes = [("post", "/offer"), ("post", "/v1/render"), ("get", "/ice-servers")]
    for method, path in token_routes:
        assert paths[path][method]["security"] == [] and "401" not in paths[path][method][
            "responses"], path
    with_token = build_openapi(
        load_settings(env={}, overrides={"access.offer_token": "s3cret-token-0123456789"}))
    for method, path in token_routes:
        op = with_token["paths"][path][method]
        assert op["security"] == [{"offerToken": []}, {"apiKey": []}] and "401" in op[
            "responses"], path
    assert "s3cret-token-0123456789" not in json.dumps(with_token)


async def test_the_server_serves_the_document(aiohttp_client, tmp_path: Path) -> None:
    s = fuzz_settings(str(tmp_path / "data"))
    client = await aiohttp_client(create_app(s, tts=ToneTTS()))
    r = await client.get(OPENAPI_PATH)
    assert r.status == 200 and r.content_type == "application/json"
    assert await r.json() == json.loads(json.dumps(build_openapi(s)))


# --- fuzzing the live app -----------------------------------------------------------------------
class ThreadedServer:
    """An aiohttp app on 127.0.0.1 served by its own event loop in a thread, so that
    schemathesis' blocking client (requests) can call it from the test."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self._make_app = make_app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(120)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._make_app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # the listening asyncio server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"


def fake_clip_render(self: object, spec: Any, out_dir: Path, progress: Any,
                     cancel: Any) -> dict[str, object]:
    return fake_run(spec, out_dir, progress, cancel)


@pytest.fixture(scope="module")
def fuzz_server(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ThreadedServer]:
    from pipeline.render.core import ClipRenderer

    mp = pytest.MonkeyPatch()
    mp.setattr(ClipRenderer, "render", fake_clip_render)
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    s = fuzz_settings(str(data_dir))
    try:
        with ThreadedServer(lambda: create_app(s, tts=ToneTTS())) as server:
            served = requests.get(server.url + OPENAPI_PATH, timeout=30).json()
            assert served == json.loads(json.dumps(build_openapi(s)))
            yield server
    finally:
        mp.undo()


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
    return None


def errors_are_json(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("application/json"), (
            f"{case.method} {case.formatted_path} -> {response.status_code} is not JSON"
        )
        body = response.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("detail"), str) and body["detail"], body
        assert "Traceback" not in body["detail"] and "/work/" not in body["detail"], body
    return None


CHECKS = [no_server_error, errors_are_json, status_code_conformance, content_type_conformance,
          response_schema_conformance]

# The document is built from the same settings as the fuzzed app (so its bounds are the app's);
# the fixture checks that the live app serves exactly this document.
SCHEMA = schemathesis.openapi.from_dict(build_openapi(fuzz_settings()))
# /offer is fuzzed with a few examples only: every fuzzed SDP must be a 400, never a 500, but
# each one costs a peer connection's set-up and tear-down.
OFFER_EXAMPLES = 15
EXAMPLES = 30


@SCHEMA.exclude(path="/offer").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_fuzz_every_operation(case: Any, fuzz_server: ThreadedServer) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)


@SCHEMA.include(path="/offer").parametrize()
@settings(max_examples=OFFER_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_fuzz_offer(case: Any, fuzz_server: ThreadedServer) -> None:
    response = case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
    assert response.status_code != 200 or case.body.get("type") == "offer"
    sessions = requests.get(fuzz_server.url + "/sessions", timeout=30).json()["sessions"]
    assert sessions == [] or response.status_code == 200


def test_request_schemas_are_the_declarations_the_handlers_check() -> None:
    from rtc_server.bodies import field_names, offer_model, render_model
    from rtc_server.render_api import validate

    s = load_settings(env={}, overrides={"render.max_text_chars": 123, "render.max_fps": 50})
    schemas = build_openapi(s)["components"]["schemas"]
    assert schemas["Offer"] == offer_model(s).model_json_schema()
    assert schemas["RenderRequest"] == render_model(s).model_json_schema()
    assert set(schemas["RenderUpload"]["properties"]) == {"audio", *field_names(render_model(s))}
    # a bound from the settings reaches the document and the check alike
    assert schemas["RenderRequest"]["properties"]["text"]["maxLength"] == 123
    assert schemas["RenderRequest"]["properties"]["fps"]["maximum"] == 50
    with pytest.raises(BadRequest, match="at most 123 are accepted"):
        validate({"text": "a" * 124}, None, s, ["default"])
    with pytest.raises(BadRequest, match=r"within 10\.\.50"):
        validate({"text": "hi", "fps": 60}, None, s, ["default"])
    # every field the document allows is one the handler accepts, and no other
    with pytest.raises(BadRequest, match="unknown field"):
        validate({"text": "hi", "colour": "red"}, None, s, ["default"])
