"""No answer leaks a file-system path or a stack trace: every route driven with bad input
(unknown ids, bad JSON, wrong types, damaged uploads, path traversal, unknown routes, wrong
methods) answers without the data directory, /tmp, /work, /usr, site-packages, a Python file
name or a traceback in its body."""

from __future__ import annotations

import io
import json
import shutil
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from config import load_settings
from rtc_server.app import create_app
from tests.fakes.prepare import FakeAnalyzer, FakePrepare, encode_image, portrait_rgb
from tests.fakes.tts import ToneTTS

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
MARKERS = ("/tmp", "/work", "/usr", "/home", "/root", "/io/opencv", "site-packages",
           '.py"', ".py'", ".py:", "Traceback", 'File "')
NOT_FOUND_ID = "av_000000000000"
TRAVERSALS = [
    "..%2F..%2Fetc%2Fpasswd",
    "..%2F..%2F..%2F..%2Fetc%2Fshadow",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows%5Cwin.ini",
    "%00",
    "av_0000000000%00",
]


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), "<i2").tobytes())
    return buf.getvalue()


def form(**parts: bytes | str) -> aiohttp.FormData:
    fd = aiohttp.FormData(default_to_multipart=True)
    for name, value in parts.items():
        if isinstance(value, bytes):
            fd.add_field(name, value, filename="../../etc/passwd",
                         content_type="application/octet-stream")
        else:
            fd.add_field(name, value)
    return fd


PNG = encode_image(portrait_rgb())
JPEG = encode_image(portrait_rgb(), ".jpg")
WAV = wav_bytes()
DAMAGED = {
    "text": b"hello, this is not an image at all\n" * 20,
    "truncated_png": PNG[: len(PNG) // 3],
    "png_header_only": PNG[:33],
    "corrupt_jpeg": JPEG[:200] + b"\xff" * 400 + JPEG[-100:],
    "jpeg_header_garbage": b"\xff\xd8\xff\xe0" + b"\x00" * 30 + b"\xff\xc0\x00\x11\x08\xff\xff",
    "fake_mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 8 + b"\x17" * 3000,
    "fake_webm": b"\x1aE\xdf\xa3" + b"\x9f" * 3000,
    "fake_gif": b"GIF89a" + b"\x01\x00\x01\x00" + b"\xee" * 500,
    "fake_wav": b"RIFF\xff\xff\xff\x7fWAVEfmt " + b"\x10" * 500,
    "truncated_wav": WAV[:60],
    "ogg_garbage": b"OggS" + b"\x00" * 300,
    "mp3_garbage": b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 400,
}


@pytest.fixture
async def env(aiohttp_client, tmp_path):
    data_dir = tmp_path / "data"
    settings = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback",
        "avatars.data_dir": str(data_dir),
        "conversation.listen": False,
        "media.video_width": 128,
        "media.video_height": 128,
        "server.max_body_bytes": 65536,
        "render.sync_timeout_s": 20.0,
        "access.offer_per_min": 0,
        "access.avatars_per_min": 0,
        "access.render_per_min": 0,
    })
    app = create_app(settings, tts=ToneTTS(), prepare=FakePrepare(),
                     analyzer_factory=FakeAnalyzer)
    client = await aiohttp_client(app)
    return client, data_dir


async def check(resp: aiohttp.ClientResponse, data_dir: Path, what: str, *,
                json_errors: bool = True) -> dict | None:
    """The answer leaks nothing; an error is JSON {error, detail} (``json_errors``). Returns
    the JSON body."""
    text = await resp.text(errors="replace")
    for marker in (*MARKERS, str(data_dir), str(ROOT)):
        assert marker not in text, f"{what}: {resp.status} leaks {marker!r}: {text[:400]}"
    assert "root:" not in text, f"{what}: traversal reached a system file"
    if resp.status >= 400 and json_errors:
        assert resp.content_type == "application/json", f"{what}: {resp.status} {text[:200]}"
        body = json.loads(text)
        assert {"error", "detail"} <= set(body), f"{what}: {body}"
        return body
    return None


async def test_signaling_and_sessions(env):
    client, data_dir = env
    bad_offers = [
        ("text", {"data": "v=0", "headers": {"Content-Type": "text/plain"}}),
        ("not json", {"data": "{nope", "headers": {"Content-Type": "application/json"}}),
        ("bad utf-8", {"data": b'{"sdp": "\xff\xfe"}',
                       "headers": {"Content-Type": "application/json"}}),
        ("array", {"json": [1, 2]}),
        ("sdp number", {"json": {"sdp": 5, "type": "offer"}}),
        ("sdp garbage", {"json": {"sdp": "v=0\r\nm=garbage\r\n", "type": "offer"}}),
        ("sdp no media", {"json": {"sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n",
                                   "type": "offer"}}),
        ("avatar traversal", {"json": {"sdp": "v=0\r\n", "type": "offer",
                                       "avatar_id": "../../etc/passwd"}}),
        ("avatar unknown", {"json": {"sdp": "v=0\r\n", "type": "offer",
                                     "avatar_id": NOT_FOUND_ID}}),
        ("avatar list", {"json": {"sdp": "v=0\r\n", "type": "offer", "avatar_id": ["x"]}}),
    ]
    for what, kw in bad_offers:
        resp = await client.post("/offer", **kw)
        assert resp.status in (400, 404, 422), (what, resp.status, await resp.text())
        await check(resp, data_dir, f"POST /offer {what}")
    for path in ["/sessions/nope", *(f"/sessions/{t}" for t in TRAVERSALS)]:
        await check(await client.delete(path), data_dir, f"DELETE {path}")


async def test_avatar_routes(env):
    client, data_dir = env
    for name, blob in DAMAGED.items():
        resp = await client.post("/avatars", data=form(name="Bad", file=blob))
        body = await check(resp, data_dir, f"POST /avatars {name}")
        assert resp.status in (400, 413, 415, 422), (name, resp.status, body)
    for what, kw in [
        ("no body", {}),
        ("json", {"json": {"file": "x"}}),
        ("no file", {"data": form(name="Only a name")}),
        ("no name", {"data": form(file=PNG)}),
        ("long name", {"data": form(name="x" * 5000, file=PNG)}),
        ("control chars", {"data": form(name="a\x00b", file=PNG)}),
        ("broken framing", {"data": b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n"
                                    b"\r\nabc", "headers": {
                                        "Content-Type": "multipart/form-data; boundary=B"}}),
        ("no boundary", {"data": b"abc", "headers": {"Content-Type": "multipart/form-data"}}),
    ]:
        resp = await client.post("/avatars", **kw)
        assert resp.status in (400, 413, 415, 422), (what, resp.status, await resp.text())
        await check(resp, data_dir, f"POST /avatars {what}")
    for t in ["nope", NOT_FOUND_ID, *TRAVERSALS]:
        for method, path in (("GET", f"/avatars/{t}"), ("GET", f"/avatars/{t}/thumbnail"),
                             ("DELETE", f"/avatars/{t}")):
            resp = await client.request(method, path)
            assert resp.status in (400, 403, 404), (method, path, resp.status)
            await check(resp, data_dir, f"{method} {path}")


async def test_render_routes(env):
    client, data_dir = env
    bad_json = [
        {"text": 5},
        {"text": ""},
        {"text": "hi", "avatar_id": "../../etc/passwd"},
        {"text": "hi", "avatar_id": NOT_FOUND_ID},
        {"text": "hi", "voice": "../../../etc/passwd"},
        {"text": "hi", "voice": ["x"]},
        {"text": "hi", "speed": "fast"},
        {"text": "hi", "speed": 1e400},
        {"text": "hi", "fps": 7},
        {"text": "hi", "format": "../../x"},
        {"text": "hi", "async": "perhaps"},
        {"text": "hi", "priority": 99},
        {"text": "hi", "unknown": 1},
        {"audio": "x"},
    ]
    for body in bad_json:
        resp = await client.post("/v1/render", json=body)
        assert resp.status in (400, 404), (body, resp.status, await resp.text())
        await check(resp, data_dir, f"POST /v1/render {body}")
    resp = await client.post("/v1/render", data="{x",
                             headers={"Content-Type": "application/json"})
    await check(resp, data_dir, "POST /v1/render bad JSON")
    resp = await client.post("/v1/render", data="text=hi",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    await check(resp, data_dir, "POST /v1/render form-urlencoded")
    for name, blob in DAMAGED.items():
        resp = await client.post("/v1/render", data=form(audio=blob))
        assert resp.status in (400, 413), (name, resp.status, await resp.text())
        await check(resp, data_dir, f"POST /v1/render audio {name}")
    resp = await client.post("/v1/render", data=form(audio=WAV, text="both"))
    await check(resp, data_dir, "POST /v1/render both")
    resp = await client.post("/v1/render", data=form(audio=WAV, fps="abc"))
    await check(resp, data_dir, "POST /v1/render multipart fps")
    resp = await client.post("/v1/render", data=form(**{"../../x": "1"}))
    await check(resp, data_dir, "POST /v1/render odd part")
    for t in ["nope", "x" * 100, *TRAVERSALS]:
        for method, path in (("GET", f"/v1/render/{t}"), ("DELETE", f"/v1/render/{t}"),
                             ("GET", f"/v1/results/{t}/video.mp4"),
                             ("GET", f"/v1/results/{'0' * 64}/{t}"),
                             ("GET", f"/ws/jobs/{t}")):
            resp = await client.request(method, path)
            assert resp.status in (400, 404), (method, path, resp.status)
            await check(resp, data_dir, f"{method} {path}")


async def test_static_unknown_routes_and_methods(env):
    client, data_dir = env
    paths = [
        "/web/..%2F..%2Fetc%2Fpasswd",
        "/web/..%2F..%2Frtc_server%2Fapp.py",
        "/web/%2e%2e/%2e%2e/etc/passwd",
        "/web/../rtc_server/app.py",
        "/web/nope.js",
        "/web/",
        "/..%2F..%2Fetc%2Fpasswd",
        "/nope",
        "/favicon.ico",
        "/sessions/",
        "/v1/results/" + "..%2F" * 6 + "etc%2Fpasswd/x",
    ]
    for path in paths:
        resp = await client.get(path)
        assert resp.status in (400, 403, 404), (path, resp.status)
        # aiohttp's static route answers a missing file with an empty 404 of its own
        await check(resp, data_dir, f"GET {path}", json_errors=not path.startswith("/web/"))
    for method, path in [("PUT", "/offer"), ("PATCH", "/avatars"), ("GET", "/offer"),
                         ("POST", "/health"), ("PUT", "/cache"), ("POST", "/sessions"),
                         ("DELETE", "/avatars"), ("POST", "/v1/results/x/y")]:
        resp = await client.request(method, path)
        assert resp.status == 405, (method, path, resp.status)
        await check(resp, data_dir, f"{method} {path}")
    # cache admin with stray bodies and odd content types still answers cleanly
    for method, path in [("DELETE", "/cache"), ("POST", "/cache/cleanup"), ("GET", "/cache/stats")]:
        resp = await client.request(method, path, data=b"\xff" * 100,
                                    headers={"Content-Type": "application/json"})
        await check(resp, data_dir, f"{method} {path}")


async def test_a_damaged_registered_avatar(env):
    """An avatar whose files were damaged on disk: the call and the render fail without
    naming the files."""
    client, data_dir = env
    resp = await client.post("/avatars", data=form(name="Soon broken", file=PNG))
    assert resp.status == 201, await resp.text()
    avatar_id = (await resp.json())["id"]
    folders = [p for p in data_dir.rglob(avatar_id) if p.is_dir()]
    assert folders, "the registered avatar has no folder"
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                f.write_bytes(b"{ damaged")
    for what, coro in [
        ("offer", client.post("/offer", json={"sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
                                              "s=-\r\nt=0 0\r\n", "type": "offer",
                                              "avatar_id": avatar_id})),
        ("render", client.post("/v1/render", json={"text": "Hello.", "avatar_id": avatar_id})),
        ("get", client.get(f"/avatars/{avatar_id}")),
        ("thumbnail", client.get(f"/avatars/{avatar_id}/thumbnail")),
    ]:
        resp = await coro
        await check(resp, data_dir, f"damaged avatar: {what}")
    for folder in folders:
        shutil.rmtree(folder)
    resp = await client.post("/v1/render", json={"text": "Hello.", "avatar_id": avatar_id})
    await check(resp, data_dir, "vanished avatar: render")


@pytest.mark.parametrize("path", ["/avatars", "/v1/render"])
async def test_control_character_in_a_part_name_is_400(env, path) -> None:
    """aiohttp raises InvalidHeader (not a ValueError) for such a part header: still the
    client's mistake, never a 500 (found by the fuzz run)."""
    client, _ = env
    body = b'--B\r\nContent-Disposition: form-data; name="a\x02b"\r\n\r\nx\r\n--B--\r\n'
    resp = await client.post(
        path, data=body, headers={"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"] == "bad_request"
