"""The render API over HTTP with the real renderer (viseme engine, Piper voice, default avatar at
a small size): synchronous and asynchronous renders, progress over the WebSocket, the cache,
cancellation, the bounded queue and bad inputs."""

from __future__ import annotations

import asyncio
import io
import json

import av
import numpy as np
import pytest
from aiohttp import FormData

from config import load_settings
from rtc_server.app import create_app
from tests.fakes.speech import piper_speech, silence, write_wav

pytestmark = pytest.mark.timeout(180)

LONG_TEXT = (
    "This is a long story about the sea, the ships that sail on it and the people who work "
    "on them through the night and the day. "
) * 12


async def start(aiohttp_client, tmp_path, **overrides):
    base = {
        "media.video_width": 192,
        "media.video_height": 192,
        "avatars.data_dir": str(tmp_path / "data"),
        "conversation.listen": False,
        "jobs.workers": 1,
    }
    base.update(overrides)
    app = create_app(load_settings(env={}, overrides=base))
    return await aiohttp_client(app)


def decode_video(data: bytes) -> tuple[str, str, float, float, int]:
    """(video codec, audio codec, video seconds, audio seconds, frames)."""
    with av.open(io.BytesIO(data)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(v))
        c.seek(0)
        samples = sum(f.samples for f in c.decode(a))
        fps = float(v.average_rate)
        return v.codec_context.name, a.codec_context.name, frames / fps, samples / a.rate, frames


async def test_text_renders_to_mp4_and_a_repeat_comes_from_the_cache(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path)
    body = {"text": "Hello there. I am your avatar.", "fps": 25}
    r = await client.post("/v1/render", json=body)
    assert r.status == 200, await r.text()
    first = await r.json()
    assert first["status"] == "done" and first["cached"] is False
    assert set(first["files"]) >= {"video", "audio_ogg", "audio_wav", "timeline"}
    video = await client.get(first["files"]["video"])
    assert video.status == 200 and video.headers["Content-Type"] == "video/mp4"
    vcodec, acodec, v_s, a_s, frames = decode_video(await video.read())
    assert (vcodec, acodec) == ("h264", "aac")
    assert abs(v_s - a_s) <= 1 / 25 + 0.03  # within a frame (plus AAC priming/padding)
    wav = await client.get(first["files"]["audio_wav"])
    with av.open(io.BytesIO(await wav.read())) as c:
        wav_s = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate
    assert abs(frames / 25 - wav_s) <= 1 / 25
    timeline = first["timeline"]
    assert timeline["mouth_cues"] and {c["viseme"] for c in timeline["mouth_cues"]} - {"REST"}
    assert all(0 <= c["t_ms"] <= timeline["duration_ms"] for c in timeline["mouth_cues"])

    stats0 = await (await client.get("/cache/stats")).json()
    r = await client.post("/v1/render", json=body)
    again = await r.json()
    assert r.status == 200 and again["cached"] is True
    assert again["cache_key"] == first["cache_key"] and again["files"] == first["files"]
    assert again["timeline"] == timeline
    stats = await (await client.get("/cache/stats")).json()
    assert stats["entries"] == 1 and stats["hits"] == stats0["hits"] + 1
    assert 0 < stats["hit_rate"] <= 1
    # a different speed is different output: not a hit
    r = await client.post("/v1/render", json={**body, "speed": 1.5})
    faster = await r.json()
    assert faster["cached"] is False and faster["cache_key"] != first["cache_key"]
    assert faster["duration_s"] < first["duration_s"]


async def test_async_render_reports_progress_over_the_websocket_and_webm(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path)
    r = await client.post(
        "/v1/render", json={"text": "Progress, step by step.", "format": "webm", "async": True}
    )
    assert r.status == 202, await r.text()
    job = await r.json()
    assert job["status"] in ("queued", "running") and r.headers["Location"] == job["status_url"]
    states = []
    async with client.ws_connect(job["ws_url"]) as ws:
        async for msg in ws:
            states.append(json.loads(msg.data))
    assert states[-1]["status"] == "done"
    percents = [s["percent"] for s in states]
    assert percents == sorted(percents) and percents[-1] == 100
    assert len({s["stage"] for s in states}) >= 2
    status = await (await client.get(job["status_url"])).json()
    assert status["status"] == "done"
    video = await client.get(status["result"]["files"]["video"])
    vcodec, acodec, *_ = decode_video(await video.read())
    assert (vcodec, acodec) == ("vp9", "opus")
    ogg = await client.get(status["result"]["files"]["audio_ogg"])
    with av.open(io.BytesIO(await ogg.read())) as c:
        assert c.streams.audio[0].codec_context.name == "opus"


async def test_uploaded_audio_renders(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path)
    speech = piper_speech("Audio in, avatar out.", 16000)
    wav = write_wav(tmp_path / "in.wav", np.concatenate([speech, silence(0.5)]), 16000)
    form = FormData()
    form.add_field("audio", wav.read_bytes(), filename="in.wav", content_type="audio/wav")
    form.add_field("fps", "20")
    r = await client.post("/v1/render", data=form)
    assert r.status == 200, await r.text()
    result = await r.json()
    assert result["fps"] == 20
    assert abs(result["duration_s"] - (len(speech) / 16000 + 0.5)) < 0.06
    # the upload was removed once the job finished
    await asyncio.sleep(0.2)
    assert not list((tmp_path / "data" / "cache" / "uploads").glob("*"))


async def test_cancel_stops_the_job_frees_the_worker_and_leaves_no_files(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path)
    r = await client.post("/v1/render", json={"text": LONG_TEXT, "async": True})
    job = await r.json()
    async with client.ws_connect(job["ws_url"]) as ws:
        async for msg in ws:
            state = json.loads(msg.data)
            if state["stage"] == "rendering" and state["percent"] > 0:
                break
    r = await client.delete(job["status_url"])
    assert r.status == 200
    assert (await r.json())["status"] == "cancelled"
    cache_dir = tmp_path / "data" / "cache"
    assert not [p for p in (cache_dir / "staging").glob("*")]
    assert (await (await client.get("/cache/stats")).json())["entries"] == 0
    # the single worker is free: a new job runs at once
    r = await client.post("/v1/render", json={"text": "Next, please."})
    assert r.status == 200 and (await r.json())["status"] == "done"
    # cancelling again changes nothing; unknown jobs are 404
    assert (await (await client.delete(job["status_url"])).json())["status"] == "cancelled"
    assert (await client.get("/v1/render/nope")).status == 404
    assert (await client.delete("/v1/render/nope")).status == 404


async def test_a_full_queue_answers_429(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path, **{"jobs.max_queue": 1})
    ids, statuses = [], []
    for i in range(3):
        r = await client.post("/v1/render", json={"text": f"{i} {LONG_TEXT}", "async": True})
        statuses.append(r.status)
        body = await r.json()
        if r.status == 202:
            ids.append(body["id"])
        else:
            assert body["error"] and body["detail"]
            assert int(r.headers["Retry-After"]) >= 1
    assert statuses == [202, 202, 429]
    for job_id in ids:
        await client.delete(f"/v1/render/{job_id}")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"text": "x" * 5001}, 400, "5000"),
        ({"text": "hi", "avatar_id": "av_000000000000"}, 404, "avatar"),
        ({"text": "hi", "avatar_id": "../etc"}, 404, "avatar"),
        ({"text": "hi", "speed": 2.5}, 400, "speed"),
        ({"text": "hi", "speed": 0.1}, 400, "speed"),
        ({"text": "hi", "speed": "fast"}, 400, "speed"),
        ({"text": "hi", "format": "avi"}, 400, "format"),
        ({"text": "hi", "fps": 7}, 400, "fps"),
        ({"text": "hi", "voice": "nobody"}, 400, "voice"),
        ({"text": "   "}, 400, "empty"),
        ({}, 400, "text"),
        ({"text": "hi", "colour": "red"}, 400, "unknown"),
        ({"text": "hi", "priority": 99}, 400, "priority"),
    ],
)
async def test_bad_requests_get_reasons(aiohttp_client, tmp_path, body, status, needle):
    client = await start(aiohttp_client, tmp_path)
    r = await client.post("/v1/render", json=body)
    assert r.status == status
    err = await r.json()
    assert set(err) >= {"error", "detail"} and needle in err["detail"].lower()


async def test_bad_uploads_and_bodies_get_reasons(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path, **{"render.max_audio_bytes": 4096})
    form = FormData()
    form.add_field("audio", b"this is not audio at all" * 10, filename="a.wav")
    r = await client.post("/v1/render", data=form)
    assert r.status == 400 and "not audio" in (await r.json())["detail"]
    form = FormData()
    form.add_field("audio", b"\0" * 10_000, filename="big.wav")
    r = await client.post("/v1/render", data=form)
    assert r.status == 413
    form = FormData()
    form.add_field("audio", b"RIFF", filename="a.wav")
    form.add_field("text", "both")
    r = await client.post("/v1/render", data=form)
    assert r.status == 400 and "exactly one" in (await r.json())["detail"]
    r = await client.post("/v1/render", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/v1/render", data=b"text", headers={"Content-Type": "text/plain"})
    assert r.status == 400
    assert (await client.get("/v1/results/" + "0" * 64 + "/video.mp4")).status == 404
    assert (await client.get("/v1/results/../../etc/passwd")).status == 404
    async with client.ws_connect("/ws/jobs/nope") as ws:
        msg = await ws.receive_json()
        assert msg["error"] == "not_found"


async def test_cache_administration(aiohttp_client, tmp_path):
    client = await start(aiohttp_client, tmp_path)
    r = await client.post("/v1/render", json={"text": "Cache me."})
    files = (await r.json())["files"]
    assert (await (await client.get("/cache/stats")).json())["entries"] == 1
    report = await (await client.post("/cache/cleanup")).json()
    assert report["expired"] == 0 and report["evicted"] == 0
    r = await client.delete("/cache")
    assert (await r.json())["removed"] == 1
    assert (await client.get(files["video"])).status == 404
    stats = await (await client.get("/cache/stats")).json()
    assert stats["entries"] == 0 and stats["bytes"] == 0


async def test_the_redis_backend_renders_and_its_jobs_outlive_the_api(
    aiohttp_client, tmp_path, redis_url
):
    overrides = {"jobs.backend": "redis", "jobs.redis_url": redis_url}
    client = await start(aiohttp_client, tmp_path, **overrides)
    r = await client.post("/v1/render", json={"text": "Through the queue.", "async": True})
    assert r.status == 202
    job = await r.json()
    async with client.ws_connect(job["ws_url"]) as ws:
        states = [json.loads(msg.data) async for msg in ws]
    assert states[-1]["status"] == "done"
    video = await client.get(states[-1]["result"]["files"]["video"])
    assert decode_video(await video.read())[:2] == ("h264", "aac")
    await client.close()
    # a new API process (no workers of its own) on the same Redis and cache still knows the job
    client = await start(aiohttp_client, tmp_path, **overrides, **{"jobs.workers": 0})
    status = await (await client.get(job["status_url"])).json()
    assert status["status"] == "done" and status["result"]["files"]["video"]
    r = await client.post("/v1/render", json={"text": "Through the queue."})
    assert r.status == 200 and (await r.json())["cached"] is True
