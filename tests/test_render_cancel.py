"""Who may cancel a render (issue 26 #7), and job sockets at shutdown (#9).

A render request gets its own ``cancel_token``; identical requests share one job, and a
DELETE with one request's token only detaches that request while another still waits. An
admin key (a client on this machine when no keys are set) cancels outright; anyone else gets
403. At shutdown every job WebSocket is sent its job's final state and closed going-away."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from config import load_settings
from pipeline.render.core import ClipRenderer
from rtc_server.app import create_app
from rtc_server.services import SERVICES
from tests.fakes.render import fake_run
from tests.fakes.tts import ToneTTS

pytestmark = pytest.mark.timeout(120)

KEY = "k" * 24
REMOTE = {"X-Forwarded-For": "203.0.113.7"}
SLOW = "steps=400 step_s=0.01 a slow one"


def fake_render(self: object, spec: Any, out_dir: Any, progress: Any, cancel: Any) -> Any:
    return fake_run(spec, out_dir, progress, cancel)


@pytest.fixture(autouse=True)
def fake_renderer(monkeypatch):
    monkeypatch.setattr(ClipRenderer, "render", fake_render)


def app_for(tmp_path, **overrides: Any) -> web.Application:
    base = {"avatars.data_dir": str(tmp_path / "data"), "conversation.listen": False,
            "media.video_width": 64, "media.video_height": 64, "jobs.workers": 1,
            "access.trust_forwarded_for": True}
    base.update(overrides)
    return create_app(load_settings(env={}, overrides=base), tts=ToneTTS())


async def submit(client, text: str = SLOW, **headers: str) -> dict[str, Any]:
    resp = await client.post("/v1/render", json={"text": text, "async": True}, headers=headers)
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def status(client, job_id: str) -> str:
    return (await (await client.get(f"/v1/render/{job_id}")).json())["status"]


async def test_a_second_requester_only_detaches_itself(aiohttp_client, tmp_path):
    client = await aiohttp_client(app_for(tmp_path))
    first = await submit(client, "steps=30 step_s=0.01 shared", **REMOTE)
    second = await submit(client, "steps=30 step_s=0.01 shared", **REMOTE)
    assert first["id"] == second["id"] and first["cancel_token"] != second["cancel_token"]
    resp = await client.delete(f"/v1/render/{first['id']}", headers={
        **REMOTE, "X-Cancel-Token": second["cancel_token"]})
    assert resp.status == 200
    body = await resp.json()
    assert body["detached"] is True and body["waiting"] == 1
    for _ in range(200):
        if await status(client, first["id"]) in ("done", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
    assert await status(client, first["id"]) == "done"  # the first requester got its clip


async def test_a_waiting_sync_request_keeps_its_clip_when_a_joiner_leaves(
        aiohttp_client, tmp_path):
    client = await aiohttp_client(app_for(tmp_path))
    text = "steps=60 step_s=0.01 wanted by two"
    joiner = await submit(client, text, **REMOTE)
    waiting = asyncio.ensure_future(client.post("/v1/render", json={"text": text}, headers=REMOTE))
    svc = client.server.app[SERVICES].engines.render
    for _ in range(200):  # until the synchronous request has joined the job
        if len(getattr(svc, "waiters", {}).get(joiner["id"], ())) == 2:
            break
        await asyncio.sleep(0.01)
    resp = await client.delete(f"/v1/render/{joiner['id']}", headers={
        **REMOTE, "X-Cancel-Token": joiner["cancel_token"]})
    assert resp.status == 200 and (await resp.json())["detached"] is True
    answer = await waiting
    assert answer.status == 200, await answer.text()  # not 409 cancelled
    body = await answer.json()
    assert body["id"] == joiner["id"] and body["status"] == "done"


async def test_the_last_waiter_cancels_and_a_used_token_is_spent(aiohttp_client, tmp_path):
    client = await aiohttp_client(app_for(tmp_path))
    job = await submit(client, **REMOTE)
    url = f"/v1/render/{job['id']}"
    resp = await client.delete(url, params={"token": job["cancel_token"]}, headers=REMOTE)
    assert resp.status == 200
    assert (await resp.json())["status"] in ("cancelled", "running", "queued")
    again = await client.delete(url, params={"token": job["cancel_token"]}, headers=REMOTE)
    assert again.status == 403
    for _ in range(100):
        if await status(client, job["id"]) == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert await status(client, job["id"]) == "cancelled"
    cache = tmp_path / "data" / "cache"  # the worker's partial files are gone
    assert not list((cache / "staging").glob("*"))
    assert (await (await client.get("/cache/stats")).json())["entries"] == 0


@pytest.mark.parametrize("given", [None, "wrong-token", "x" * 5000])
async def test_a_remote_client_without_the_token_cannot_cancel(aiohttp_client, tmp_path, given):
    token = "t" * 20
    client = await aiohttp_client(app_for(tmp_path, **{"access.offer_token": token}))
    job = await submit(client, Authorization=f"Bearer {token}", **REMOTE)
    headers = dict(REMOTE)
    if given is not None:
        headers["X-Cancel-Token"] = given
    resp = await client.delete(f"/v1/render/{job['id']}", headers=headers)
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "forbidden" and "cancel_token" in body["detail"]
    assert await status(client, job["id"]) in ("queued", "running")


async def test_an_admin_key_or_this_machine_cancels_outright(aiohttp_client, tmp_path):
    client = await aiohttp_client(app_for(tmp_path, **{"access.api_keys": [KEY]}))
    job = await submit(client, **REMOTE)
    await submit(client, **REMOTE)  # a second waiter: an admin stops the job all the same
    refused = await client.delete(f"/v1/render/{job['id']}", headers={**REMOTE, "X-API-Key": "no"})
    assert refused.status == 403 and await status(client, job["id"]) in ("queued", "running")
    resp = await client.delete(f"/v1/render/{job['id']}", headers={**REMOTE, "X-API-Key": KEY})
    assert resp.status == 200 and "detached" not in await resp.json()
    local = await aiohttp_client(app_for(tmp_path / "other"))  # no keys: loopback is admin
    job2 = await submit(local)
    assert (await local.delete(f"/v1/render/{job2['id']}")).status == 200


async def test_a_sync_request_that_times_out_hands_over_its_token(aiohttp_client, tmp_path):
    client = await aiohttp_client(app_for(tmp_path, **{"render.sync_timeout_s": 0.3}))
    resp = await client.post("/v1/render", json={"text": SLOW}, headers=REMOTE)
    assert resp.status == 504
    body = await resp.json()
    cancel = await client.delete(f"/v1/render/{body['id']}", headers={
        **REMOTE, "X-Cancel-Token": body["cancel_token"]})
    assert cancel.status == 200


async def test_job_sockets_get_the_final_state_and_a_going_away_close(tmp_path):
    app = app_for(tmp_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"

    async def follow(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], Any]:
        seen: list[dict[str, Any]] = []
        while True:
            msg = await asyncio.wait_for(ws.receive(), 30)
            if msg.type != WSMsgType.TEXT:
                return seen, msg
            seen.append(json.loads(msg.data))

    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/render", json={"text": SLOW, "async": True}) as resp:
            job = await resp.json()
        sockets = [await http.ws_connect(url + job["ws_url"]) for _ in range(3)]
        for ws in sockets:
            first = await ws.receive()
            assert json.loads(first.data)["status"] in ("queued", "running")
        closing = asyncio.ensure_future(runner.cleanup())  # the server shuts down
        ends = await asyncio.gather(*(follow(ws) for ws in sockets))
        await closing
    for seen, msg in ends:  # every subscriber: the final state, then the server's 1001
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001, msg
        assert seen and seen[-1]["status"] == "cancelled"
        assert seen[-1]["closing"] == "the server is shutting down"
