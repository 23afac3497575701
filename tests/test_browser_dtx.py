"""Chromium sends its microphone with Opus DTX when the server's answer asks for it
(``webrtc.opus_dtx``): through the silent part of the fake microphone it leaves most frames
out, and the server hears that time as silence (``mic.dtx_silence_ms``) without losing any."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser import chromium, js, js_await, server_session, wait_js, write_wav

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def tone_then_silence(path: Path, tone_s: float = 1.0, silence_s: float = 4.0) -> Path:
    rate = 48_000
    t = np.arange(int(tone_s * rate)) / rate
    pcm = np.concatenate([np.sin(2 * np.pi * 440.0 * t) * 0.5, np.zeros(int(silence_s * rate))])
    return write_wav(path, pcm, rate)


def test_chromium_leaves_silence_out_and_the_server_hears_it(
    live_server: str, tmp_path: Path
) -> None:
    wav = tone_then_silence(tmp_path / "mic.wav")
    with chromium(wav, tmp_path / "profile") as driver:
        driver.get(f"{live_server}/")
        wait_js(driver, "window.avatarCall !== undefined", message="call.js to load")
        js_await(driver, "avatarCall.start()", timeout=30)
        wait_js(driver, "avatarCall.state === 'connected'", timeout=20)
        session_id = js(driver, "avatarCall.sessionId")
        sent = ("(async () => { for (const r of (await avatarCall.pc.getStats()).values()) "
                "if (r.type === 'outbound-rtp' && r.kind === 'audio') return r.packetsSent; "
                "return null; })()")
        first: Any = server_session(live_server, session_id)
        packets0 = js_await(driver, sent)
        time.sleep(3.0)
        later: Any = server_session(live_server, session_id)
        packets1 = js_await(driver, sent)
    assert first is not None and later is not None
    silence = later["mic"]["dtx_silence_ms"] - first["mic"]["dtx_silence_ms"]
    # any 3 s of the 5 s loop hold at least 2 s of its silence (less Opus's 200 ms before DTX)
    assert silence >= 1000, later["mic"]
    # Chromium sent far fewer packets than the 150 frames of those 3 s
    assert packets0 is not None and packets1 - packets0 < 120, (packets0, packets1)
