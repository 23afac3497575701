"""Degrade per call (issue 21): a lip-sync engine that keeps missing the call's frame deadlines
hands the rest of the utterance to the fallback, and takes the next utterance back once no
frame has been missed for a while. The rule alone, then a call's frame pipeline on a manual
clock with a fake engine too slow for the frame rate."""

from __future__ import annotations

import asyncio

import numpy as np

from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor, FramePlan, Segment
from media_tracks.frames import FrameProducer
from media_tracks.tracks import AvatarAudioTrack, AvatarVideoTrack
from pipeline.lipsync import SessionLipSync
from pipeline.lipsync.degrade import DeadlineGuard

MS = 1_000_000
SR, FPS, W, H = 48000, 25, 64, 48


def plan(k: int, segment: int | None) -> FramePlan:
    return FramePlan(index=k, t_ns=k * 40 * MS, segment_id=segment)


def test_the_rule_switches_for_the_rest_of_the_utterance_and_back_when_calm():
    missed = [0]
    switches: list[bool] = []
    guard = DeadlineGuard(lambda: missed[0], switches.append)
    assert not any(guard.use_fallback(plan(k, 1)) for k in range(10))  # on time: primary
    missed[0] = 2  # two misses in a second: a hiccup, nothing changes
    assert not guard.use_fallback(plan(10, 1))
    missed[0] = 3  # the third within the second: the fallback takes over
    assert guard.use_fallback(plan(11, 1)) and switches == [True] and guard.degraded
    # the rest of utterance 1 stays with the fallback, misses or not
    assert all(guard.use_fallback(plan(k, 1)) for k in range(12, 40))
    # utterance 2 starts 1.6 s after the last miss: not calm long enough, still the fallback
    assert guard.use_fallback(plan(40, 2)) and switches == [True]
    assert all(guard.use_fallback(plan(k, 2)) for k in range(41, 60))
    # idle frames after 2 s without a miss: the primary is back (never mid-utterance)
    assert not guard.use_fallback(plan(61, None))
    assert switches == [True, False] and not guard.degraded
    assert not guard.use_fallback(plan(62, 3))


def test_misses_spread_out_never_switch():
    missed = [0]
    switches: list[bool] = []
    guard = DeadlineGuard(lambda: missed[0], switches.append)
    for k in range(0, 500):
        if k % 20 == 0:  # one miss every 0.8 s: under 3 a second
            missed[0] += 1
        assert not guard.use_fallback(plan(k, k // 100))
    assert switches == []


def test_idle_misses_switch_at_the_next_utterance_not_before():
    missed = [5]
    switches: list[bool] = []
    guard = DeadlineGuard(lambda: missed[0], switches.append)
    assert not guard.use_fallback(plan(0, None))  # the 5 misses before it are not counted
    missed[0] = 9
    assert not guard.use_fallback(plan(1, None))  # idle frames: nothing to hand over
    assert guard.use_fallback(plan(2, 7)) and switches == [True]


class _Engine:
    """A lip-sync engine whose renderer takes ``service_ms`` of media time per frame."""

    frame_group = 1
    render_lead_ms = None
    schedule_lead_ms = None

    def __init__(self, name: str, clock: ManualClock, service_ms: float, luma: int) -> None:
        self.name = name
        self.clock = clock
        self.service_ns = int(service_ms * MS)
        self.luma = luma
        self.rendered = 0
        self.slow = True

    def renderer(self, avatar, timeline, *, width, height, executor):
        engine = self

        class R:
            lock = asyncio.Lock()

            async def render(self, plan):
                async with self.lock:
                    if engine.slow and engine.service_ns:
                        await engine.clock.sleep_until_ns(engine.clock.now_ns()
                                                          + engine.service_ns)
                    engine.rendered += 1
                y = np.full((H * 3 // 2, W), 128, np.uint8)
                y[:H] = engine.luma
                return y

        return R()


async def test_a_call_whose_engine_misses_deadlines_degrades_and_recovers():
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    primary = _Engine("wav2lip", clock, service_ms=70, luma=200)  # 14 fps for a 25 fps call
    fallback = _Engine("viseme", clock, service_ms=0, luma=50)
    switches: list[bool] = []
    lipsync = SessionLipSync(primary, fallback, on_failure=lambda *a: None,
                             on_degrade=switches.append)
    holder: dict[str, FrameProducer] = {}
    renderer = lipsync.renderer(
        None, None, width=W, height=H, executor=None,
        misses=lambda: holder["frames"].stats.late + holder["frames"].stats.skipped)
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=200)
    holder["frames"] = frames
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)
    audio = AvatarAudioTrack(clock=clock, compositor=comp, sample_rate=SR, frame_samples=1920)
    frames.start()
    shown: list[tuple[int, int]] = []  # (media ms, luma)
    sound: list[int] = []

    async def consume_video():
        while True:
            f = await video.recv()
            shown.append((clock.now_ns() // MS, int(f.to_ndarray()[0, 0])))

    async def consume_audio():
        while True:
            await audio.recv()
            sound.append(clock.now_ns() // MS)

    tasks = [asyncio.create_task(consume_video()), asyncio.create_task(consume_audio())]
    pcm = np.full(SR * 5, 1000, np.int16)  # a 5 s utterance
    comp.schedule(Segment(pcm=pcm, mouth=np.full(125, 0.5)))
    for _ in range(4000):  # 4 s
        await clock.advance(MS)
    assert switches == [True] and lipsync.degraded
    degraded_at = next(t for t, y in shown if y == 50)
    assert degraded_at < 2000  # within the first seconds of the utterance
    # from the switch on, the fallback draws every frame of the utterance on time
    late_part = [y for t, y in shown if degraded_at + 200 <= t < 3900]
    assert late_part and set(late_part) == {50}
    assert len(late_part) >= 0.95 * (3900 - degraded_at - 200) / 40
    # the machine has room again; the next utterance gets the configured engine back
    primary.slow = False
    for _ in range(3000):  # the rest of the utterance, then 2 s of idle
        await clock.advance(MS)
    comp.schedule(Segment(pcm=pcm[: SR], mouth=np.full(25, 0.5)))
    for _ in range(1500):
        await clock.advance(MS)
    assert switches == [True, False] and not lipsync.degraded
    assert [y for t, y in shown if t >= 7600][-10:] == [200] * 10
    # the audio never waited: one 40 ms frame every 40 ms, all along
    assert len(sound) >= (8500 // 40) - 2
    assert max(np.diff(sound)) <= 41
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await frames.aclose()


def test_the_switch_is_an_event_on_the_wire_and_a_metric():
    from rtc_server.metrics import Observability
    from rtc_server.protocol import LipSync

    wire = LipSync("viseme", True, "deadlines_missed").to_wire()
    assert wire == {"type": "lipsync", "engine": "viseme", "degraded": True,
                    "reason": "deadlines_missed"}
    obs = Observability()
    obs.observe_event(wire)
    obs.observe_event(wire)
    obs.observe_event(LipSync("wav2lip", False, "headroom_back").to_wire())
    assert obs.registry.get_sample_value(
        "avatar_lipsync_switches_total", {"direction": "degraded"}) == 2
    assert obs.registry.get_sample_value(
        "avatar_lipsync_switches_total", {"direction": "restored"}) == 1


def test_an_engine_that_cannot_run_degrades_at_once_and_is_tried_again_later():
    missed = [0]
    switches: list[bool] = []
    guard = DeadlineGuard(lambda: missed[0], switches.append)
    assert not guard.use_fallback(plan(0, 1))
    guard.unavailable(plan(1, 1))  # its inference pool did not answer
    assert guard.use_fallback(plan(1, 1)) and switches == [True]
    assert guard.reason == "engine_unavailable"
    assert all(guard.use_fallback(plan(k, 1)) for k in range(2, 30))
    # 2 s later, at a new utterance, the primary is tried again
    assert not guard.use_fallback(plan(80, 2)) and switches == [True, False]
    missed[0] = 3  # this time it misses deadlines: said so
    assert guard.use_fallback(plan(81, 2)) and guard.reason == "deadlines_missed"


class _Failing:
    """A primary engine whose renderer raises ``error`` (an unreachable pool, or a bug)."""

    name = "wav2lip"
    frame_group = 1
    render_lead_ms = None
    schedule_lead_ms = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    def renderer(self, avatar, timeline, *, width, height, executor):
        error = self.error

        class R:
            async def render(self, plan):
                raise error

        return R()


async def test_an_unreachable_pool_degrades_the_call_and_a_bug_fails_it_for_good():
    from common.errors import LipSyncUnavailable

    clock = ManualClock()
    fallback = _Engine("viseme", clock, service_ms=0, luma=50)
    for error, failed in ((LipSyncUnavailable("pool away"), False), (ValueError("bug"), True)):
        failures: list[str] = []
        switches: list[bool] = []
        lipsync = SessionLipSync(_Failing(error), fallback,
                                 on_failure=lambda where, exc, seen=failures: seen.append(where),
                                 on_degrade=switches.append)
        r = lipsync.renderer(None, None, width=W, height=H, executor=None, misses=lambda: 0)
        frame = await r.render(plan(0, 1))
        assert int(frame[0, 0]) == 50  # the fallback drew the frame the primary could not
        assert lipsync.failed is failed
        assert (failures, switches) == ((["render"], []) if failed else ([], [True]))
        if not failed:
            assert lipsync.degraded and lipsync.guard is not None
            assert lipsync.guard.reason == "engine_unavailable"
