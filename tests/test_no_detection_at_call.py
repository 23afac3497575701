"""Registration does the face work once: a call with a registered avatar never runs a detector.

The avatar is registered with the real dlib analysis; then every way of detecting or fitting a
face is made to raise, and a whole call (video, speech, mouth) must still run."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import avatars.analysis as analysis
from avatars.analysis.dlib_backend import DlibAnalyzer, ShapePredictor
from avatars.analysis.haar_backend import HaarAnalyzer
from config import load_settings
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.prepare import encode_video, moving_frames
from tests.fakes.tts import ToneTTS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class DetectorCalled(AssertionError):
    pass


def forbid(*_args, **_kwargs):
    raise DetectorCalled("a face detector ran during a call")


async def test_call_with_registered_avatar_runs_no_detector(
    loopback_only, aiohttp_client, tmp_path, monkeypatch
):
    use_host_candidates("loopback")
    settings = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback",
        "avatars.data_dir": str(tmp_path / "data"),
        "avatars.min_face_px": 48,
    })
    client = await aiohttp_client(create_app(settings, tts=ToneTTS()))
    video = encode_video(moving_frames(40, (384, 384)), 25)
    form = aiohttp.FormData()
    form.add_field("name", "Sway")
    form.add_field("file", video, filename="sway.mp4", content_type="video/mp4")
    resp = await client.post("/avatars", data=form)
    assert resp.status == 201, await resp.text()
    avatar_id = (await resp.json())["id"]

    # from here on, any detection or landmark fitting fails loudly
    for cls, names in ((DlibAnalyzer, ("detect", "landmarks_in_box")),
                       (HaarAnalyzer, ("detect", "landmarks_in_box")),
                       (ShapePredictor, ("__call__",))):
        for name in names:
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, forbid)
    monkeypatch.setattr(analysis, "create_analyzer", forbid)
    import dlib

    monkeypatch.setattr(dlib, "get_frontal_face_detector", forbid)
    monkeypatch.setattr(dlib, "shape_predictor", forbid)
    monkeypatch.setattr("cv2.CascadeClassifier", forbid)

    bot = Bot(str(client.make_url("")).rstrip("/"), avatar_id=avatar_id)
    try:
        await bot.connect()
        await bot.wait_first_video(10)
        bot.send({"type": "say", "text": "Hello from a registered face."})
        await bot.wait_event(lambda e: e.get("state") == "speaking", 10)
        await bot.wait_event(lambda e: e.get("state") == "listening", 15)
        server = await bot.server_session()
        await asyncio.sleep(0.2)
    finally:
        await bot.aclose()
    assert server is not None and server["avatar_id"] == avatar_id
    assert server["frames_sent"]["video"] > 25
    assert not [e for e in bot.events if e.get("type") == "error"]
    loaded = client.app[SERVICES].engines.library.get(avatar_id)
    assert len(loaded.avatar.loop_frames) > 1  # the call played the avatar's own idle loop
    assert len(loaded.avatar.loop_landmarks) == len(loaded.avatar.loop_frames)
