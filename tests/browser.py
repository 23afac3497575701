"""Driving the call page (web/) in Debian Chromium through selenium, and analysing what the
page recorded. Shared by the browser end-to-end test and the benchmarks.

Typical use::

    with chromium(write_tone_wav(tmp / "mic.wav"), tmp / "profile") as driver:
        driver.get(base_url + "/")
        js_await(driver, "avatarCall.start()")
        wait_js(driver, "avatarCall.state === 'connected'")
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from media_tracks.clapper import detect_beep_onsets, detect_flash_onsets, pair_offsets_ms

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class JsError(AssertionError):
    """A script run in the page threw or rejected."""


# ---- the fake microphone -------------------------------------------------------------


def write_tone_wav(
    path: Path,
    *,
    freq_hz: float = 440.0,
    dbfs: float = -6.0,
    seconds: float = 6.0,
    sample_rate: int = 48000,
) -> Path:
    """A mono 16-bit WAV sine tone peaking at ``dbfs``; Chromium loops it as the fake mic.

    Chromium's default microphone processing takes a steady tone for noise: its noise
    suppression settles ~19.4 dB down (measured at the server, Chromium 156), so a -6 dBFS
    tone (RMS -9 dBFS) arrives at about -28.4 dBFS. Speech-like signals with pauses fare
    worse on the server's dB average. A whole number of cycles keeps the loop seamless."""
    n = round(seconds * sample_rate)
    cycles = round(freq_hz * seconds)
    t = np.arange(n, dtype=np.float64)
    return write_wav(path, np.sin(2 * np.pi * cycles * t / n) * 10 ** (dbfs / 20), sample_rate)


def write_wav(path: Path, x: np.ndarray, sample_rate: int = 48000) -> Path:
    """``x`` (mono, -1..1) as a 16-bit WAV file for Chromium's fake microphone."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    return path


# ---- the browser ---------------------------------------------------------------------


def chromium_options(
    fake_audio: Path, user_data_dir: Path, *, headless: bool = True, window: str = "1100,900"
) -> Any:
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    opts.binary_location = CHROMIUM
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}",
        "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window}",
    ]
    if headless:
        flags.insert(0, "--headless=new")
    for flag in flags:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return opts


@contextmanager
def chromium(
    fake_audio: Path, user_data_dir: Path, *, headless: bool = True, log_path: Path | None = None
) -> Iterator[Any]:
    """A selenium Chrome driver on Debian's chromium; quits it afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    user_data_dir.mkdir(parents=True, exist_ok=True)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log_path) if log_path else None)
    driver = webdriver.Chrome(
        service=service, options=chromium_options(fake_audio, user_data_dir, headless=headless)
    )
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def console_log(driver: Any) -> list[str]:
    """Browser console lines since the last call (needs the goog:loggingPrefs capability)."""
    try:
        return [f"{e['level']} {e['message']}" for e in driver.get_log("browser")]
    except Exception:  # noqa: BLE001 - diagnostics only
        return []


# ---- calling into the page -----------------------------------------------------------


def js(driver: Any, expression: str) -> Any:
    """Value of a JavaScript expression in the page (must be JSON-able)."""
    return driver.execute_script(f"return ({expression});")


_AWAIT = """
const done = arguments[arguments.length - 1];
Promise.resolve().then(() => (%s)).then(
  (value) => done({ok: true, value: value === undefined ? null : value}),
  (err) => done({ok: false, error: String((err && err.message) || err)}));
"""


def js_await(driver: Any, expression: str, *, timeout: float = 60) -> Any:
    """Value of a JavaScript expression, awaiting it if it is a promise; raises JsError when
    it throws or rejects."""
    driver.set_script_timeout(timeout)
    result = driver.execute_async_script(_AWAIT % expression)
    if not result["ok"]:
        raise JsError(f"{expression}: {result['error']}")
    return result["value"]


def wait_js(
    driver: Any, expression: str, *, timeout: float = 20, poll: float = 0.1, message: str = ""
) -> Any:
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = js(driver, expression)
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {message or expression} (last value {value!r})"
    )


def event_count(driver: Any) -> int:
    return int(js(driver, "avatarCall.lastEvents.length"))


def wait_event(
    driver: Any, since: int, match: dict[str, Any], *, timeout: float = 30
) -> tuple[int, dict[str, Any]]:
    """Wait for a data-channel message received at index >= ``since`` whose fields include
    ``match``; returns (its index, the message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = js(driver, f"avatarCall.lastEvents.slice({since})")
        for i, ev in enumerate(events):
            if all(ev.get(k) == v for k, v in match.items()):
                return since + i, ev
        time.sleep(0.1)
    events = js(driver, f"avatarCall.lastEvents.slice({since})")
    raise AssertionError(f"no event matching {match} within {timeout} s; got {events}")


def start_call(driver: Any, url: str) -> str:
    """Load the call page at ``url``, start a call and wait until it is connected; returns
    its session id."""
    driver.get(f"{url}/")
    wait_js(driver, "window.avatarCall !== undefined", message="call.js to load")
    js_await(driver, "avatarCall.start()", timeout=30)
    wait_js(driver, "avatarCall.state === 'connected'", timeout=20)
    return str(js(driver, "avatarCall.sessionId"))


def wait_speaking_then_idle(driver: Any, since: int, *, timeout: float = 30) -> None:
    """Wait for state "speaking" and then state "listening" among the messages from ``since``."""
    i, _ = wait_event(driver, since, {"type": "state", "state": "speaking"}, timeout=timeout)
    wait_event(driver, i + 1, {"type": "state", "state": "listening"}, timeout=timeout)


# What the page records by default: what a user would save.
RECORDING_MIME = "video/webm;codecs=vp8,opus"
# For timing measurements: Chromium's MediaRecorder stamps each 60 ms Opus packet about 57 ms
# late (measured against a PCM recording of the same stream, Chromium 156), while PCM
# audio keeps its 10 ms chunks' own times. So A/V sync is measured on PCM recordings.
SYNC_RECORDING_MIME = "video/webm;codecs=vp8,pcm"


def start_recording(driver: Any, mime: str = RECORDING_MIME) -> None:
    """Start the page's MediaRecorder on the remote stream (what the user sees and hears)."""
    js_await(driver, f"avatarCall.startRecording({json.dumps(mime)})")


def stop_recording(driver: Any) -> bytes:
    """Stop the page's MediaRecorder; the webm bytes of the remote stream."""
    return base64.b64decode(js_await(driver, "avatarCall.stopRecording()"))


# ---- the server's HTTP API -----------------------------------------------------------


def get_json(url: str, *, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def server_session(base_url: str, session_id: str) -> dict[str, Any] | None:
    """The session's entry in ``GET /sessions``, or None."""
    for s in get_json(f"{base_url}/sessions")["sessions"]:
        if s["id"] == session_id:
            return dict(s)
    return None


# ---- analysing a recording -----------------------------------------------------------


@dataclass
class ClapperAnalysis:
    """Beeps and flashes found in a recording, in ms of its media time."""

    beeps_ms: list[float] = field(default_factory=list)
    flashes_ms: list[float] = field(default_factory=list)
    offsets_ms: list[float] = field(default_factory=list)  # beep - flash; > 0: audio late
    video_frames: int = 0
    audio_seconds: float = 0.0
    frame_size: tuple[int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "offsets_ms": [round(x, 2) for x in self.offsets_ms],
            "beeps_ms": [round(x, 2) for x in self.beeps_ms],
            "flashes_ms": [round(x, 2) for x in self.flashes_ms],
            "video_frames": self.video_frames,
            "audio_seconds": round(self.audio_seconds, 3),
            "frame_size": list(self.frame_size) if self.frame_size else None,
        }


def _mono_float(frame: av.AudioFrame) -> np.ndarray:
    a: np.ndarray = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        a = a.reshape(channels, -1)
    else:
        a = a.reshape(-1, channels).T
    x = a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        x /= float(np.iinfo(a.dtype.type).max) + 1
    return np.asarray(x.mean(axis=0))


def _luma_mean(frame: av.VideoFrame) -> float:
    plane = frame.planes[0]  # Y of a YUV frame
    y = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[
        : plane.height, : plane.width
    ]
    return float(y.mean())


def analyze_clapper_recording(data: bytes | Path) -> ClapperAnalysis:
    """Find clapper beeps (audio) and flashes (video) in a webm/any recording by their
    presentation times (``pts * time_base``), and pair them."""
    src: Any = io.BytesIO(data) if isinstance(data, bytes | bytearray) else str(data)
    out = ClapperAnalysis()

    # Audio: put each decoded frame at its own pts, so gaps or a late start keep true times.
    pieces: list[tuple[float, np.ndarray]] = []
    sample_rate = 48000
    with av.open(src) as c:
        if c.streams.audio:
            stream = c.streams.audio[0]
            sample_rate = stream.codec_context.sample_rate or sample_rate
            next_t = 0.0
            for frame in c.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else next_t
                x = _mono_float(frame)
                pieces.append((t, x))
                next_t = t + len(x) / frame.sample_rate
    if isinstance(src, io.BytesIO):
        src.seek(0)
    if pieces:
        t0 = pieces[0][0]
        end = max(round((t - t0) * sample_rate) + len(x) for t, x in pieces)
        audio = np.zeros(end, dtype=np.float32)
        for t, x in pieces:
            i = round((t - t0) * sample_rate)
            audio[i : i + len(x)] = x
        out.audio_seconds = len(audio) / sample_rate
        onsets = detect_beep_onsets(audio, sample_rate)
        out.beeps_ms = [(t0 + i / sample_rate) * 1000 for i in onsets]

    times: list[float] = []
    lumas: list[float] = []
    with av.open(src) as c:
        if c.streams.video:
            stream = c.streams.video[0]
            for frame in c.decode(stream):
                if frame.pts is None:
                    continue
                times.append(float(frame.pts * stream.time_base) * 1000)
                lumas.append(_luma_mean(frame))
                out.frame_size = (frame.width, frame.height)
    out.video_frames = len(times)
    out.flashes_ms = [times[i] for i in detect_flash_onsets(lumas)]
    out.offsets_ms = pair_offsets_ms(out.beeps_ms, out.flashes_ms)
    return out
