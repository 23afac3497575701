"""The listening face in a real call (issue 23): the bot speaks into its microphone (Piper
sentences with short pauses between them) and the head motion of the face it receives,
measured from the decoded frames, is compared with the same call's idle face before."""

from __future__ import annotations

import asyncio
import time

import cv2
import numpy as np
import pytest

from config import load_settings
from rtc_server.app import create_app
from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates
from rtc_server.services import SERVICES
from tests.fakes.speech import piper_speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

SR = 48000
# the hair and forehead of the default avatar at 512x512, above the eyes (eyes and mouth
# move on their own)
HEAD = (slice(0, 90), slice(150, 330))
SENTENCES = ("The weather was fine that morning.", "We walked along the river for an hour.",
             "Then we sat down under a tree.", "And we talked about the summer.")


def vertical_motion(shifts: list[tuple[float, float]], fps: float = 25.0) -> float:
    """RMS of the head's vertical position around its own 1-second average: nods count,
    the slow idle sway and breathing hardly do."""
    y = np.array([s for _, s in shifts])
    k = int(fps)
    slow = np.convolve(np.pad(y, k // 2, mode="edge"), np.ones(k) / k, "valid")[: y.size]
    return float(np.sqrt(np.mean((y - slow) ** 2)))


async def test_the_head_nods_while_the_person_speaks_and_is_calmer_at_rest(
        loopback_only, aiohttp_client, tmp_path):
    use_host_candidates("loopback")
    app = create_app(load_settings(env={}, overrides={
        "webrtc.host_candidates": "loopback", "avatars.data_dir": str(tmp_path / "data")}))
    client = await aiohttp_client(app)
    bot = Bot(str(client.make_url("")).rstrip("/"))
    frames: list[tuple[float, np.ndarray]] = []
    bot.on_video_luma = lambda y: frames.append(
        (time.monotonic(), np.ascontiguousarray(y[HEAD], dtype=np.float32)))
    pause = np.zeros(int(0.45 * SR), np.float32)  # over vad.pause_ms, under end_silence_ms
    speech = np.concatenate([np.concatenate([piper_speech(s, SR), pause])
                             for s in SENTENCES])
    try:
        await bot.connect()
        await bot.wait_first_video(15)
        await asyncio.sleep(5.0)  # at rest
        rest_end = time.monotonic()
        bot.mic.play(speech, SR)
        await asyncio.sleep(len(speech) / SR + 0.3)
        speech_end = bot.mic.sent_until
        (session,) = app[SERVICES].sessions.values()
        nods = session.expression.expression.nod_starts()
    finally:
        await bot.aclose()
    ref = frames[0][1]
    window = cv2.createHanningWindow(ref.shape[::-1], cv2.CV_32F)

    def shifts(t0: float, t1: float) -> list[tuple[float, float]]:
        # copies: phaseCorrelate may window its inputs in place
        return [cv2.phaseCorrelate(ref.copy(), f.copy(), window)[0]
                for t, f in frames if t0 <= t < t1]

    rest = shifts(rest_end - 4.0, rest_end)
    listening = shifts(rest_end + 1.0, speech_end)
    assert len(rest) > 80 and len(listening) > 100
    assert len(nods) >= 2  # the server heard the pauses and nodded at them
    moved_rest, moved_listening = vertical_motion(rest), vertical_motion(listening)
    print(f"head motion: rest {moved_rest:.3f} px, listening {moved_listening:.3f} px, "
          f"{len(nods)} nods")

    assert moved_listening > 2.0 * moved_rest and moved_listening > 0.3, (
        moved_rest, moved_listening)
