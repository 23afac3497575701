"""The shared lip-sync inference pool (issue 22): Wav2Lip (the random-weight network of the
real architecture) on Ray Serve, started as ``python -m pipeline.lipsync.serve`` with its own
local Ray instance on 127.0.0.1, once for the module.

What the pool answers equals the in-process model's output within float16's rounding; a
call's frames rendered through the pool equal the local engine's within one level of 255; a
live call with ``lipsync.device: remote`` gets its mouths from the pool, and when the pool
stops mid-sentence the call degrades to the viseme engine, says so, and its audio goes on
without a gap. (The wire format alone: the first tests, no pool.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import LipSyncUnavailable, PipelineError
from config import load_settings
from media_tracks.compositor import FramePlan
from pipeline.lipsync.remote import (
    RemoteRunner,
    decode_answer,
    decode_batch,
    encode_answer,
    encode_batch,
    remote_wav2lip_engine,
)
from pipeline.lipsync.wav2lip import load_wav2lip_engine, load_wav2lip_model
from pipeline.lipsync.wav2lip_io import model_input
from tests.conftest import ARTIFACTS, ROOT, free_port

pytestmark = pytest.mark.timeout(240)

POOL_ENV = {"AVATAR_LIPSYNC__DEVICE": "openvino", "AVATAR_LIPSYNC__MAX_BATCH": "4",
            "AVATAR_LIPSYNC__MAX_WAIT_MS": "4"}


def inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((n, 1, 80, 16)).astype(np.float32)
    crops = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    return mel, np.stack([model_input(c) for c in crops])


# --- the wire format ---------------------------------------------------------------------------
def test_a_batch_crosses_the_wire_exactly_and_the_answer_within_float16():
    mel, face = inputs(3)
    mel2, face2 = decode_batch(encode_batch(mel, face))
    assert np.array_equal(mel2, mel) and np.array_equal(face2, face)  # bit for bit
    pred = np.random.default_rng(1).random((3, 3, 64, 96)).astype(np.float32)
    back = decode_answer(encode_answer(pred), 3)
    assert back.shape == pred.shape and np.abs(back - pred).max() < 0.5 / 255


def test_bad_batches_and_answers_are_refused():
    mel, face = inputs(2)
    body = encode_batch(mel, face)
    for bad in (b"", b"W2L1", body[:-1], b"XXXX" + body[4:]):
        with pytest.raises(ValueError):
            decode_batch(bad)
    answer = encode_answer(np.zeros((2, 3, 64, 96), np.float32))
    with pytest.raises(PipelineError):
        decode_answer(answer, 3)  # not the batch it was sent
    with pytest.raises(PipelineError):
        decode_answer(answer[:-2], 2)


def test_an_unreachable_pool_is_a_clear_start_up_error_and_then_unavailable():
    with pytest.raises(PipelineError, match="lipsync.pool_url"):
        RemoteRunner(f"http://127.0.0.1:{free_port()}/wav2lip", timeout_s=0.5)
    runner = RemoteRunner(f"http://127.0.0.1:{free_port()}/wav2lip", timeout_s=0.5,
                          info={"rows": {"first": 0, "exact_from": 0}})
    with pytest.raises(LipSyncUnavailable):
        runner.run(*inputs(1))


# --- a real pool -------------------------------------------------------------------------------
def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.loads(r.read())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def pool(loopback_only: None, wav2lip_onnx: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cache = tmp_path_factory.mktemp("pool-cache")
    port = free_port()
    env = {**os.environ, **POOL_ENV, "AVATAR_LIPSYNC__WAV2LIP_MODEL": str(wav2lip_onnx),
           "AVATAR_LIPSYNC__MODEL_CACHE_DIR": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "pool.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.lipsync.serve", "--port", str(port), "--num-cpus", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/wav2lip"
    deadline = time.monotonic() + 150
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the pool exited with {proc.returncode}; see {log.name}")
            try:
                info = get_json(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pool did not start; see {log.name}") from None
                time.sleep(0.5)
        yield {"url": url, "proc": proc, "info": info, "cache": cache, "model": wav2lip_onnx}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_the_pool_says_what_it_runs_and_answers_as_the_model_does(pool, tmp_path):
    info = pool["info"]
    assert info["backend"] == "openvino" and info["rows"] == {"first": 32, "exact_from": 39}
    local = load_wav2lip_model(pool["model"], cache_dir=pool["cache"], device="openvino",
                               max_batch=4)
    runner = RemoteRunner(pool["url"], timeout_s=10)
    for n in (1, 3, 4):
        mel, face = inputs(n, seed=n)
        there, here = runner.run(mel, face), local.run(mel, face)
        assert there.shape == here.shape == (n, 3, 64, 96)
        assert np.abs(there - here).max() * 255 <= 0.5  # float16 on the way back
    after = get_json(pool["url"])
    assert after["frames"] >= 8 and after["batches"] >= 3


async def test_frames_drawn_through_the_pool_equal_the_local_engines(pool):
    from face.library import AvatarLibrary
    from pipeline.tts import SpeechAudio

    settings = load_settings(env={}, overrides={
        "lipsync.device": "remote", "lipsync.pool_url": pool["url"], "lipsync.max_batch": 4,
        "lipsync.pool_timeout_ms": 10000})
    remote = remote_wav2lip_engine(settings.lipsync)
    local = load_wav2lip_engine(pool["model"], cache_dir=pool["cache"], device="openvino",
                                max_batch=4)
    try:
        assert remote.info()["backend"] == "remote"
        lib = AvatarLibrary(data_dir=pool["cache"] / "data", width=512, height=512)
        avatar = lib.get("default")
        t = np.arange(48000) / 48000
        pcm = (8000 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)))
        audio = SpeechAudio(text="x", pcm=pcm.astype(np.int16), sample_rate=48000)
        track = local.analyse(audio, fps=25)
        timeline = avatar.new_timeline()  # the same idle motion for both
        renderers = [e.renderer(avatar, timeline, width=512, height=512, executor=None)
                     for e in (remote, local)]
        for k in range(0, 20, 4):
            plan = FramePlan(index=k, t_ns=k * 40_000_000, blend=1.0, mouth=1.0,
                             lips=track.at(k))
            there, here = [await r.render(plan) for r in renderers]
            diff = np.abs(there.astype(int) - here.astype(int))
            assert diff.max() <= 1, (k, int(diff.max()))  # the stated tolerance: one level
    finally:
        remote.worker.close()
        local.worker.close()


async def test_a_call_on_the_pool_degrades_to_visemes_when_the_pool_stops(
        pool, aiohttp_client, tmp_path):
    """Last in the module: it stops the pool."""
    from rtc_server.app import create_app
    from rtc_server.bot import Bot
    from rtc_server.services import SERVICES

    settings = load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "conversation.listen": False,
        "avatars.data_dir": str(tmp_path / "data"), "lipsync.engine": "wav2lip",
        "lipsync.device": "remote", "lipsync.pool_url": pool["url"],
        # a pool slowed by the shared cores is not a pool away: only the stop must count
        "lipsync.max_batch": 4, "lipsync.pool_timeout_ms": 3000,
        # the pool, this server and the bot share 2 cores here: a frame rate Wav2Lip on them
        # holds, so no deadline is missed before the pool stops
        "media.fps": 10})
    app = create_app(settings)
    client = await aiohttp_client(app)
    bot = Bot(str(client.make_url("")).rstrip("/"))
    try:
        await bot.connect()
        await bot.wait_first_video(15)
        (session,) = app[SERVICES].sessions.values()
        assert session.lipsync.name == "wav2lip"
        served = get_json(pool["url"])["frames"]
        bot.send({"type": "say", "text": "The lighthouse keeper climbed the stairs every "
                  "evening to light the lamp, and the ships passed in the night. " * 3})
        await bot.wait_event(lambda e: e.get("type") == "state"
                             and e.get("state") == "speaking", 20)
        await asyncio.sleep(2.0)
        assert get_json(pool["url"])["frames"] > served  # the pool drew this call's mouths
        stopped_at = time.monotonic()
        pool["proc"].send_signal(signal.SIGTERM)
        assert not [e for e in bot.events if e.get("type") == "lipsync"]  # none before
        switch = await bot.wait_event(lambda e: e.get("type") == "lipsync", 30)
        assert {k: switch[k] for k in ("engine", "degraded", "reason")} == {
            "engine": "viseme", "degraded": True, "reason": "engine_unavailable"}
        v0 = len(bot.video.pts)
        await asyncio.sleep(2.0)
        assert len(bot.video.pts) - v0 >= 15  # the face goes on, drawn by the viseme engine
        assert session.state == "connected" and not session.lipsync.failed
        arrivals = np.array(bot.audio.arrival)
        window = arrivals[arrivals >= stopped_at - 1.0]
        gaps = np.diff(window)
        assert window.size > 100 and gaps.max() < 0.12, float(gaps.max())  # 20 ms packets
    finally:
        await bot.aclose()
