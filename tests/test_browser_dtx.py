"""Chromium sends its microphone with Opus DTX when the server's answer asks for it
(``webrtc.opus_dtx``): through the silent part of the fake microphone it leaves most frames
out, and the server hears that time as silence (``mic.dtx_silence_ms``) without losing any."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser import chromium, js_await, server_session, start_call, wait_event, write_wav

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
        session_id = start_call(driver, live_server)
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


def test_chromium_in_dtx_ends_a_spoken_turn(live_server: str, tmp_path: Path) -> None:
    """The person's question, then silence that Chromium leaves out: the server still hears
    the turn end (the silence it fills in) and transcribes the question."""
    from tests.fakes.speech import piper_speech, with_silence

    rate = 48_000
    question = piper_speech("What is the weather like today?", sample_rate=rate)
    wav = write_wav(tmp_path / "q.wav", with_silence(question, 1.0, 6.0, rate) * 0.7, rate)
    with chromium(wav, tmp_path / "profile") as driver:
        session_id = start_call(driver, live_server)
        _, said = wait_event(driver, 0, {"type": "transcript", "role": "user"}, timeout=40)
        info: Any = server_session(live_server, session_id)
    assert "weather" in said["text"].lower(), said
    assert info is not None and info["mic"]["dtx_silence_ms"] > 0, info["mic"]
