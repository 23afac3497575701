"""Audio first (media_tracks/priority.py): aiortc's audio encodes never queue behind video
encodes, and video work runs below the event loop's priority."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
from aiortc.codecs.opus import OpusEncoder
from av import AudioFrame

from config import load_settings
from media_tracks.clock import ManualClock
from media_tracks.priority import BACKGROUND_NICE, LoadGovernor, MediaExecutor, is_audio_encode
from media_tracks.tracks import AvatarVideoTrack, TrackStats
from rtc_server.app import create_app
from rtc_server.services import SERVICES
from tests.fakes.tts import ToneTTS

FPS = 25


def audio_frame() -> AudioFrame:
    frame = AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 48000, 0, Fraction(1, 48000)
    return frame


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_audio_encodes_run_at_once_even_behind_a_busy_queue():
    ex = MediaExecutor(1)
    gate = threading.Event()
    try:
        blocked = ex.submit(gate.wait, 10)  # the only worker is busy (a long video encode)
        encoder = OpusEncoder()
        assert is_audio_encode(encoder.encode) and not is_audio_encode(gate.wait)
        fut = ex.submit(encoder.encode, audio_frame(), False)
        assert fut.done()  # not queued behind the busy worker
        payloads, timestamp = fut.result()
        assert payloads and isinstance(timestamp, int)
        assert ex.inline == 1 and not blocked.done()
    finally:
        gate.set()
        ex.shutdown()


def test_an_audio_encode_that_fails_hands_the_error_to_the_sender():
    ex = MediaExecutor(1)
    try:
        fut = ex.submit(OpusEncoder().encode, "not a frame", False)
        with pytest.raises(Exception):  # noqa: B017 - whatever aiortc raises
            fut.result()
    finally:
        ex.shutdown()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is Linux's")
def test_other_work_runs_on_lower_priority_threads():
    base = thread_nice()
    ex = MediaExecutor(2)
    try:
        assert ex.submit(thread_nice).result() == min(19, base + BACKGROUND_NICE)
    finally:
        ex.shutdown()
    assert thread_nice() == base  # the caller (the event loop) keeps its priority


async def test_the_app_installs_it_only_with_audio_first(aiohttp_client):
    for audio_first in (True, False):
        settings = load_settings(env={}, overrides={"conversation.listen": False,
                                                    "media.audio_first": audio_first})
        app = create_app(settings, tts=ToneTTS())
        await aiohttp_client(app)
        loop = asyncio.get_running_loop()
        default = loop._default_executor  # type: ignore[attr-defined]
        assert isinstance(default, MediaExecutor) == audio_first
        if audio_first:
            render_nice = app[SERVICES].engines.pool.submit(thread_nice).result()
            assert render_nice == min(19, thread_nice() + BACKGROUND_NICE)
        loop._default_executor = None  # type: ignore[attr-defined]
        if isinstance(default, MediaExecutor):
            default.shutdown(wait=False)


def test_recent_max_gap_counts_the_wait_since_the_last_frame():
    stats = TrackStats()
    ms = 1_000_000
    for t in (0, 20, 40, 200, 220):
        stats.observe_send(t * ms, t * ms, frame_s=0.02)
    assert stats.recent_max_gap_ns(230 * ms) == 160 * ms
    assert stats.recent_max_gap_ns(600 * ms) == 380 * ms  # nothing sent since 220 ms
    assert stats.recent_max_gap_ns(10_000 * MS) == 0  # nothing in the last 2 s


# --- the governor: video is shed when the event loop lags ---------------------------------------
MS = 1_000_000


def test_the_stride_rises_with_lag_one_step_a_second_and_falls_after_calm():
    g = LoadGovernor(high_ms=10, low_ms=3, max_stride=4, step_s=1.0, calm_s=3.0, window=4)
    t = 0
    for _ in range(10):  # 0.5 s of a loop 40 ms behind: one step only
        t += 50 * MS
        g.observe(40 * MS, t)
    assert g.stride == 2
    for _ in range(60):  # 3 s more: one step a second, up to the cap
        t += 50 * MS
        g.observe(40 * MS, t)
    assert g.stride == 4 and g.raised == 3
    for _ in range(40):  # 2 s calm: not yet
        t += 50 * MS
        g.observe(1 * MS, t)
    assert g.stride == 4
    for _ in range(23):  # past 3 s calm (counted from when the median fell): one step down
        t += 50 * MS
        g.observe(1 * MS, t)
    assert g.stride == 3
    for _ in range(4):  # between the marks: calm starts again
        t += 50 * MS
        g.observe(6 * MS, t)
    assert g.stride == 3 and g.info()["max_loop_lag_ms"] == 40.0


def test_single_stalls_move_nothing_a_loop_late_most_of_the_time_does():
    g = LoadGovernor(window=20)
    t = 0
    for i in range(200):  # 10 s: one wake-up in ten is 500 ms late, the rest on time
        t += 50 * MS
        g.observe((500 if i % 10 == 0 else 1) * MS, t)
    assert g.stride == 1 and g.info()["loop_lag_ms"] == 1.0
    for i in range(40):  # 2 s: most wake-ups 20 ms late
        t += 50 * MS
        g.observe((20 if i % 3 else 1) * MS, t)
    assert g.stride >= 2


async def test_the_governor_measures_the_loops_real_lag():
    g = LoadGovernor(period_s=0.01, high_ms=5, step_s=0.0, window=3)
    task = asyncio.ensure_future(g.run())
    try:
        await asyncio.sleep(0.05)
        for _ in range(4):  # callbacks that hold the loop 50 ms, again and again
            time.sleep(0.05)  # noqa: ASYNC251 - on purpose
            await asyncio.sleep(0)
        await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert g.info()["max_loop_lag_ms"] >= 30
    assert g.stride >= 2


async def test_a_stride_sends_and_renders_only_every_nth_frame():
    from tests.test_tracks import pull, setup

    clock = ManualClock(start_ns=0)
    comp, frames, _, _, calls = setup(clock, lead_ms=80)
    stride = [1]
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames,
                             stride=lambda: stride[0])
    frames._stride = lambda: stride[0]  # the session gives both the same governor
    frames.start()
    sent = [(await pull(video, clock, 5 * MS)).pts for _ in range(4)]
    stride[0] = 2
    sent += [(await pull(video, clock, 5 * MS)).pts for _ in range(6)]
    await frames.aclose()
    indices = [pts * FPS // 90000 for pts in sent]
    assert indices[:4] == [0, 1, 2, 3]
    assert indices[4:] == [4, 6, 8, 10, 12, 14]
    assert video.stats.frames_shed == 5
    rendered = sorted({p.index for p in calls})
    assert not [k for k in rendered if k > 5 and k % 2]  # shed frames were not rendered
