"""End to end with the headless bot against a real server process, over loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rtc_server.bot import Bot
from rtc_server.ice import use_host_candidates

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def states(bot: Bot) -> list[str]:
    return [e["state"] for e in bot.events if e.get("type") == "state"]


def received_rms(bot: Bot, t_from: float, t_to: float) -> float:
    """RMS (of full scale) of the audio that arrived between two bot-relative times."""
    chunks = [
        a for a, t in zip(bot.audio.audio, bot.audio.arrival, strict=True)
        if t_from <= t - bot.t0 <= t_to
    ]
    if not chunks:
        return 0.0
    x = np.concatenate(chunks).astype(np.float32) / 32768
    return float(np.sqrt(np.mean(x * x)))


async def test_call_video_audio_say_and_clapper(live_server, artifacts_dir):
    use_host_candidates("loopback")
    bot = Bot(live_server)
    try:
        await bot.connect()
        await bot.wait_first_video(10)
        assert bot.video.arrival, "no video frame arrived"
        hello = await bot.wait_event(lambda e: e.get("type") == "hello", 5)
        assert (hello["width"], hello["height"], hello["fps"]) == (512, 512, 25)

        # idle: 3 s with no speech must be silent
        await asyncio.sleep(3)
        t_idle = asyncio.get_running_loop().time()
        assert states(bot) == []

        # clapper: 5 beeps with 5 flashes
        bot.send({"type": "clapper", "count": 5})
        await bot.wait_event(lambda e: e.get("state") == "speaking", 5)
        await bot.wait_event(lambda e: e.get("state") == "listening", 15)

        # two says: the second queues after the first, one speaking..idle span
        n_events = len(bot.events)
        bot.send({"type": "say", "text": "Hello there."})
        bot.send({"type": "say", "text": "I am the default avatar."})
        speaking = await bot.wait_event(lambda e: e.get("state") == "speaking"
                                        and bot.events.index(e) >= n_events, 15)
        idle = await bot.wait_event(lambda e: e.get("state") == "listening"
                                    and bot.events.index(e) > bot.events.index(speaking), 20)
        assert states(bot) == ["speaking", "listening", "speaking", "listening"]
        speech_s = idle["_t"] - speaking["_t"]
        assert speech_s > 2.0, f"two sentences played in only {speech_s:.2f} s"
        await asyncio.sleep(0.5)
        server = await bot.server_session()
    finally:
        await bot.aclose()
    del t_idle

    s = {**bot.summary(window=(1.0, 11.0)), "server": server}
    (artifacts_dir / "bot_summary.json").write_text(__import__("json").dumps(s, indent=1))
    assert s["first_video_frame_ms"] is not None
    assert s["fps_received"] >= 24.0, s
    assert s["audio_gaps"]["count"] == 0, s["audio_gaps"]
    # idle was silent, speech was loud
    assert received_rms(bot, 1.0, 3.0) < 0.001
    assert received_rms(bot, speaking["_t"] + 0.2, idle["_t"] - 0.2) > 0.02
    offsets = s["av_offsets_ms"]["sender_clock"]
    assert len(offsets) == 5, s["av_offsets_ms"]
    assert all(abs(o) <= 40 for o in offsets), offsets
