"""Avatar registration over HTTP (rtc_server/avatars_api.py) with a fake face analysis:
every refusal with its status and reason, de-duplication, concurrency, restart, delete."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import cv2
import numpy as np
import pytest
from yarl import URL

from avatars.model import DEFAULT_AVATAR_DIR
from config import load_settings
from face.library import LoadedAvatar
from rtc_server.app import create_app
from rtc_server.services import SERVICES
from tests.fakes.prepare import (
    FakeAnalyzer,
    FakePrepare,
    encode_image,
    encode_video,
    moving_frames,
    portrait_rgb,
)
from tests.fakes.tts import ToneTTS

MINIMAL_OFFER_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def settings(data_dir, **overrides):
    base = {
        "webrtc.host_candidates": "loopback",
        "avatars.data_dir": str(data_dir),
    }
    base.update(overrides)
    return load_settings(env={}, overrides=base)


@pytest.fixture
def fake_prepare():
    return FakePrepare()


@pytest.fixture
def make_client(aiohttp_client, tmp_path, fake_prepare):
    async def make(data_dir=None, prepare=None, real=False, **overrides):
        app = create_app(
            settings(data_dir or tmp_path / "data", **overrides),
            tts=ToneTTS(),
            prepare=None if real else prepare or fake_prepare,
            analyzer_factory=None if real else FakeAnalyzer,
        )
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client):
    return await make_client()


def form(data: bytes | None, name: str | None = "Alice", filename="upload.bin",
         content_type="application/octet-stream"):
    fd = aiohttp.FormData(default_to_multipart=True)
    if name is not None:
        fd.add_field("name", name)
    if data is not None:
        fd.add_field("file", data, filename=filename, content_type=content_type)
    return fd


async def upload(client, data, name="Alice", **kw):
    return await client.post("/avatars", data=form(data, name, **kw))


async def error_of(resp, status, code=None):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error", "detail"}
    assert body["detail"]
    if code is not None:
        assert body["error"] == code, body
    return body


def stored_ids(client) -> list[str]:
    return [r.id for r in client.app[SERVICES].engines.avatar_api.store.list()]


def avatar_folders(tmp_path) -> list[str]:
    root = tmp_path / "data" / "avatars"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


PORTRAIT_PNG = encode_image(portrait_rgb((320, 240)), ".png")


# --------------------------------------------------------------------------- success


async def test_register_image_then_list_get_thumbnail(client, fake_prepare):
    resp = await upload(client, PORTRAIT_PNG, name="  Alice  ", filename="whatever.txt")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["id"].startswith("av_") and len(body["id"]) == 15
    assert body["created"] is True and body["builtin"] is False
    assert (body["name"], body["frames"], body["fps"]) == ("Alice", 1, 0.0)
    assert (body["width"], body["height"]) == (320, 240)
    assert body["quality"] == {"face_px": 120.0, "sharpness": 123.4, "analyzer": "fake"}
    assert body["created_at"].endswith("Z")
    # avatars.crop_size, min_face_px and multiple_face_ratio reach prepare
    assert fake_prepare.crop_sizes == [96]
    assert fake_prepare.thresholds == [{"min_face_px": 96, "multiple_face_ratio": 0.25}]

    listing = await (await client.get("/avatars")).json()
    assert [a["id"] for a in listing["avatars"]] == ["default", body["id"]]
    assert listing["avatars"][0]["builtin"] is True

    one = await (await client.get(f"/avatars/{body['id']}")).json()
    assert one == {k: v for k, v in body.items() if k != "created"} | {"builtin": False}

    for avatar_id in (body["id"], "default"):
        resp = await client.get(f"/avatars/{avatar_id}/thumbnail")
        assert resp.status == 200 and resp.content_type == "image/jpeg"
        jpeg = await resp.read()
        assert jpeg.startswith(b"\xff\xd8\xff")
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None

    default = await (await client.get("/avatars/default")).json()
    assert default["builtin"] is True and default["frames"] == 1


async def test_registered_avatar_loads_for_calls(client):
    body = await (await upload(client, PORTRAIT_PNG)).json()
    library = client.app[SERVICES].engines.library
    loaded = await asyncio.to_thread(library.get, body["id"])
    assert isinstance(loaded, LoadedAvatar) and loaded.avatar_id == body["id"]
    assert loaded.avatar.size == (512, 512)
    # an offer naming it gets past the avatar lookup (this SDP then fails: 400, not 404)
    resp = await client.post(
        "/offer", json={"sdp": MINIMAL_OFFER_HEAD + "m=x\r\n", "type": "offer",
                        "avatar_id": body["id"]}
    )
    assert resp.status == 400, await resp.text()


async def test_register_video(client):
    frames = moving_frames(20, (160, 120))
    resp = await upload(client, encode_video(frames, 25, container="webm", codec="libvpx"),
                        name="Bob", content_type="video/webm")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert (body["frames"], body["fps"], body["width"], body["height"]) == (20, 25.0, 160, 120)
    loaded = await asyncio.to_thread(client.app[SERVICES].engines.library.get, body["id"])
    assert len(loaded.avatar.loop_frames) == 20


async def test_duplicate_upload_returns_the_same_avatar(client, fake_prepare):
    first = await (await upload(client, PORTRAIT_PNG, name="First")).json()
    resp = await upload(client, PORTRAIT_PNG, name="Second name")
    assert resp.status == 200
    again = await resp.json()
    assert again["id"] == first["id"] and again["created"] is False
    assert again["name"] == "First"
    assert fake_prepare.calls == 1
    assert len(stored_ids(client)) == 1


async def test_concurrent_uploads_of_one_file_make_one_avatar(client, fake_prepare, tmp_path):
    fake_prepare.sleep_s = 0.2
    resps = await asyncio.gather(*(upload(client, PORTRAIT_PNG, name=f"n{i}") for i in range(5)))
    bodies = [await r.json() for r in resps]
    assert sorted(r.status for r in resps) == [200, 200, 200, 200, 201]
    assert len({b["id"] for b in bodies}) == 1
    assert fake_prepare.calls == 1
    assert stored_ids(client) == [bodies[0]["id"]]
    assert avatar_folders(tmp_path) == [bodies[0]["id"]]


async def test_analysis_runs_off_the_event_loop(client, fake_prepare):
    await upload(client, PORTRAIT_PNG)
    assert fake_prepare.threads and all(t.startswith("register") for t in fake_prepare.threads)


async def test_registry_survives_a_restart(make_client, tmp_path):
    first = await make_client()
    body = await (await upload(first, PORTRAIT_PNG, name="Kept")).json()
    await first.close()
    second = await make_client()
    listing = await (await second.get("/avatars")).json()
    assert [a["id"] for a in listing["avatars"]] == ["default", body["id"]]
    assert (await (await second.get(f"/avatars/{body['id']}")).json())["name"] == "Kept"
    dup = await upload(second, PORTRAIT_PNG)
    assert dup.status == 200 and (await dup.json())["id"] == body["id"]
    loaded = await asyncio.to_thread(second.app[SERVICES].engines.library.get, body["id"])
    assert loaded.avatar_id == body["id"]


# --------------------------------------------------------------------------- refusals


async def test_too_large_is_413_and_stores_nothing(make_client, tmp_path):
    client = await make_client(**{"avatars.max_upload_bytes": 4096})
    await error_of(await upload(client, PORTRAIT_PNG), 413, "too_large")
    assert stored_ids(client) == [] and avatar_folders(tmp_path) == []


async def test_oversized_stream_is_cut_short_with_413(make_client):
    client = await make_client(**{"avatars.max_upload_bytes": 100_000})
    sent = 0
    boundary = "b0undary"

    async def body():
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nBig\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
            "\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(400):  # 25 MiB if it were all read
            sent += 1
            yield b"\x00" * 65536
            await asyncio.sleep(0)
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = await client.post(
        "/avatars", data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    await error_of(resp, 413, "too_large")
    assert sent < 100  # the server stopped reading long before the end
    assert (await client.get("/health")).status == 200


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"I am a text file named portrait.jpg\n" * 3, "text"),
        (PORTRAIT_PNG[: len(PORTRAIT_PNG) // 2], "PNG"),
        (b"%PDF-1.4 not a picture", "PDF"),
        (b"\x00\x00\x00\x20ftypisom" + b"\x00" * 64, "MP4"),
    ],
)
async def test_not_decodable_is_415_and_stores_nothing(client, data, needle, tmp_path,
                                                       fake_prepare):
    resp = await upload(client, data, filename="portrait.jpg", content_type="image/jpeg")
    body = await error_of(resp, 415, "unsupported_media")
    assert needle in body["detail"]
    assert stored_ids(client) == [] and avatar_folders(tmp_path) == []
    assert fake_prepare.calls == 0


async def test_empty_file_is_415(client):
    body = await error_of(await upload(client, b""), 415, "unsupported_media")
    assert "empty" in body["detail"]


async def test_refusals_from_prepare_pass_through_as_422(client, tmp_path):
    flat = encode_image(np.full((200, 200, 3), 128, np.uint8), ".png")
    body = await error_of(await upload(client, flat), 422, "no_face")
    assert "face" in body["detail"]
    assert stored_ids(client) == [] and avatar_folders(tmp_path) == []


@pytest.mark.parametrize("code", ["multiple_faces", "face_too_small", "too_dark"])
async def test_each_prepare_refusal_code_reaches_the_client(make_client, code):
    client = await make_client(prepare=FakePrepare(refuse=(code, f"refused: {code}")))
    body = await error_of(await upload(client, PORTRAIT_PNG), 422, code)
    assert body["detail"] == f"refused: {code}"
    assert stored_ids(client) == []


async def test_video_too_long_is_422(make_client, tmp_path):
    client = await make_client(**{"avatars.max_video_s": 1})
    video = encode_video(moving_frames(50, (64, 48)), 25)  # 2 s
    body = await error_of(await upload(client, video), 422, "video_too_long")
    assert "2.0 s" in body["detail"]
    assert avatar_folders(tmp_path) == []


@pytest.mark.parametrize(
    ("fd_args", "needle"),
    [
        ({"data": None}, "file"),
        ({"data": PORTRAIT_PNG, "name": None}, "name"),
        ({"data": PORTRAIT_PNG, "name": "   "}, "name"),
        ({"data": PORTRAIT_PNG, "name": "x" * 101}, "100"),
        ({"data": PORTRAIT_PNG, "name": "bad\x00name"}, "control"),
    ],
)
async def test_bad_form_is_400(client, fd_args, needle):
    resp = await client.post("/avatars", data=form(**fd_args))
    body = await error_of(resp, 400, "bad_request")
    assert needle in body["detail"]
    assert stored_ids(client) == []


async def test_name_of_100_chars_is_accepted(client):
    resp = await upload(client, PORTRAIT_PNG, name="é" * 100)
    assert resp.status == 201
    assert (await resp.json())["name"] == "é" * 100


async def test_not_multipart_is_400(client):
    resp = await client.post("/avatars", data=PORTRAIT_PNG,
                             headers={"Content-Type": "image/png"})
    body = await error_of(resp, 400)
    assert "multipart/form-data" in body["detail"]
    resp = await client.post("/avatars", json={"name": "x"})
    await error_of(resp, 400)
    resp = await client.post("/avatars", data={"name": "x"})  # urlencoded form
    body = await error_of(resp, 400)
    assert "'file'" in body["detail"]


# --------------------------------------------------------------------------- ids


ODD_IDS = [
    "..%2fx",
    "%2e%2e",
    "%2E%2E%2Fregistry.sqlite3",
    "AV_0123456789AB",
    "av_0123456789ab%0a",
    "av_0123456789abc",
    "av_" + "0" * 300,
    "registry.sqlite3",
    "av_zzzzzzzzzzzz",
    "Default",
    "av_0123456789ab",  # well formed, not registered
]


@pytest.mark.parametrize("raw", ODD_IDS)
async def test_odd_or_unknown_ids_are_404(client, raw):
    for method, suffix in (("GET", ""), ("GET", "/thumbnail"), ("DELETE", "")):
        url = URL(f"/avatars/{raw}{suffix}", encoded=True)
        resp = await client.request(method, url)
        await error_of(resp, 404)


async def test_path_traversal_never_reaches_the_file_system(client, monkeypatch):
    store = client.app[SERVICES].engines.avatar_api.store

    def no_lookup(*args):
        raise AssertionError("looked up")

    monkeypatch.setattr(store, "get", no_lookup)
    monkeypatch.setattr(store, "thumbnail", no_lookup)
    for raw in ODD_IDS[:-1]:
        await error_of(await client.get(URL(f"/avatars/{raw}", encoded=True)), 404)
        await error_of(await client.get(URL(f"/avatars/{raw}/thumbnail", encoded=True)), 404)
    await error_of(await client.get(URL("/avatars/../registry.sqlite3", encoded=True)), 404)


# --------------------------------------------------------------------------- delete


async def test_delete_is_409_while_a_session_uses_it_then_removes_everything(client, tmp_path):
    body = await (await upload(client, PORTRAIT_PNG)).json()
    avatar_id = body["id"]
    library = client.app[SERVICES].engines.library
    await asyncio.to_thread(library.get, avatar_id)  # loaded, as by a call
    sessions = client.app[SERVICES].sessions
    sessions["s1"] = SimpleNamespace(avatar=SimpleNamespace(avatar_id=avatar_id))
    sessions["s2"] = SimpleNamespace(avatar=SimpleNamespace(avatar_id="default"))
    err = await error_of(await client.delete(f"/avatars/{avatar_id}"), 409, "avatar_in_use")
    assert "1 live session" in err["detail"]
    assert avatar_folders(tmp_path) == [avatar_id]

    del sessions["s1"]
    resp = await client.delete(f"/avatars/{avatar_id}")
    assert resp.status == 200
    assert await resp.json() == {"id": avatar_id, "deleted": True}
    del sessions["s2"]
    assert avatar_folders(tmp_path) == []
    assert stored_ids(client) == []
    await error_of(await client.get(f"/avatars/{avatar_id}"), 404)
    await error_of(await client.get(f"/avatars/{avatar_id}/thumbnail"), 404)
    await error_of(await client.delete(f"/avatars/{avatar_id}"), 404)
    listing = await (await client.get("/avatars")).json()
    assert [a["id"] for a in listing["avatars"]] == ["default"]
    # a call can no longer pick it
    resp = await client.post(
        "/offer", json={"sdp": MINIMAL_OFFER_HEAD, "type": "offer", "avatar_id": avatar_id}
    )
    await error_of(resp, 404)
    # and the same file may be registered again, as a new avatar
    again = await upload(client, PORTRAIT_PNG)
    assert again.status == 201 and (await again.json())["id"] != avatar_id


async def test_builtin_and_configured_default_cannot_be_deleted(make_client, tmp_path):
    first = await make_client()
    await error_of(await first.delete("/avatars/default"), 403, "builtin_avatar")
    avatar_id = (await (await upload(first, PORTRAIT_PNG)).json())["id"]
    await first.close()
    second = await make_client(**{"avatars.default": avatar_id})
    body = await error_of(await second.delete(f"/avatars/{avatar_id}"), 403, "default_avatar")
    assert "avatars.default" in body["detail"]
    assert avatar_folders(tmp_path) == [avatar_id]


async def test_list_reads_a_registry_written_by_another_process(client, tmp_path):
    # e.g. the CLI registering while the server runs: both use the same files
    from avatars.store import AvatarStore

    other = AvatarStore(tmp_path / "data")
    prepared = FakePrepare()(
        SimpleNamespace(frames=[portrait_rgb((64, 64))], fps=0.0), FakeAnalyzer()
    )
    record = other.save(prepared, name="From CLI", source_hash="ab" * 32)
    listing = await (await client.get("/avatars")).json()
    assert record.id in [a["id"] for a in listing["avatars"]]
    loaded = await asyncio.to_thread(client.app[SERVICES].engines.library.get, record.id)
    assert loaded.avatar.name == "From CLI"
    assert json.loads((tmp_path / "data" / "avatars" / record.id / "avatar.json").read_text())[
        "name"
    ] == "From CLI"


# --------------------------------------------------------------------------- the service


def service_for(tmp_path, prepare, **overrides):
    from avatars.registration import RegistrationService
    from avatars.store import AvatarStore

    s = settings(tmp_path / "data", **overrides)
    return RegistrationService(
        AvatarStore(s.avatars.data_dir), s.avatars, prepare=prepare,
        analyzer_factory=FakeAnalyzer,
    )


async def test_service_reports_progress_by_stage(tmp_path):
    service = service_for(tmp_path, FakePrepare())
    seen: list[tuple[str, float]] = []
    try:
        video = encode_video(moving_frames(10, (64, 64)), 25)
        record, created = await service.register(video, "P", progress=lambda s, f: seen.append(
            (s, f)))
    finally:
        service.close()
    assert created and record.frames == 10
    stages = [s for s, _ in seen]
    assert stages[0] == "decode" and stages[-1] == "store"
    assert stages.index("analyse") > stages.index("decode")
    assert stages.index("store") > max(i for i, s in enumerate(stages) if s == "analyse")
    for stage in ("decode", "analyse", "store"):
        values = [f for s, f in seen if s == stage]
        assert values == sorted(values) and values[-1] == 1.0
        assert all(0.0 <= f <= 1.0 for f in values)


async def test_cancelled_request_still_registers_once(tmp_path):
    prepare = FakePrepare(sleep_s=0.3)
    service = service_for(tmp_path, prepare)
    try:
        task = asyncio.create_task(service.register(PORTRAIT_PNG, "First"))
        await asyncio.sleep(0.1)
        task.cancel()  # the client went away mid-analysis
        with pytest.raises(asyncio.CancelledError):
            await task
        record, created = await service.register(PORTRAIT_PNG, "Retry")
    finally:
        service.close()
    assert created is False and record.name == "First"
    assert prepare.calls == 1
    assert [r.id for r in service.store.list()] == [record.id]


# --------------------------------------------------------------------------- real analysis


async def test_real_analysis_registers_a_portrait(make_client):
    client = await make_client(real=True)
    portrait = (DEFAULT_AVATAR_DIR / "astronaut.png").read_bytes()
    resp = await upload(client, portrait, name="Astronaut")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert (body["frames"], body["width"], body["height"]) == (1, 512, 512)
    quality = body["quality"]
    assert quality["backend"] == "dlib"
    assert set(quality["checks"].values()) == {"pass"}
    assert quality["thresholds"]["min_face_px"] == 96
    loaded = await asyncio.to_thread(client.app[SERVICES].engines.library.get, body["id"])
    assert loaded.avatar.name == "Astronaut"

    flat = encode_image(np.full((256, 256, 3), 120, np.uint8), ".png")
    await error_of(await upload(client, flat), 422, "no_face")
    small = encode_image(portrait_rgb((256, 256)), ".png")  # a ~55 px face
    body = await error_of(await upload(client, small), 422, "face_too_small")
    assert "96" in body["detail"]
    assert len(stored_ids(client)) == 1


async def test_real_analysis_registers_a_video_loop(make_client, tmp_path):
    client = await make_client(real=True, **{"avatars.min_face_px": 48})
    video = encode_video(moving_frames(40, (384, 384)), 25)
    resp = await upload(client, video, name="Sway", content_type="video/mp4")
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["fps"] == 25.0 and 1 < body["frames"] <= 40  # minus the loop's cross-fade
    assert body["quality"]["thresholds"]["min_face_px"] == 48
    folder = tmp_path / "data" / "avatars" / body["id"]
    assert json.loads((folder / "avatar.json").read_text())["loop_mode"] == "cycle"
    loaded = await asyncio.to_thread(client.app[SERVICES].engines.library.get, body["id"])
    assert len(loaded.avatar.loop_frames) == body["frames"]
    assert len(loaded.avatar.loop_landmarks) == body["frames"]
