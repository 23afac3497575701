"""Tracks paced by a ManualClock: deadlines from the epoch, pts grids, repeated frames."""

import asyncio
from concurrent.futures import Executor, Future
from fractions import Fraction

import numpy as np
import pytest

from face.yuv import flash_i420, rgb_to_i420
from media_tracks.clock import VIDEO_TIME_BASE, ManualClock
from media_tracks.compositor import Compositor, FramePlan, Segment
from media_tracks.frames import FrameProducer, SyncRenderer, send_step_ns
from media_tracks.tracks import AvatarAudioTrack, AvatarVideoTrack

SR, FPS, W, H = 48000, 25, 64, 48


class InlineExecutor(Executor):
    """Runs submitted work at once, so rendering is deterministic under a ManualClock."""

    def submit(self, fn, /, *args, **kwargs):
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


def setup(clock, render=None, lead_ms=80):
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=120,
                      crossfade_frames=0)
    calls: list[FramePlan] = []

    def default_render(plan: FramePlan) -> np.ndarray:
        calls.append(plan)
        if plan.flash:
            return flash_i420(W, H)
        y = np.full((H * 3 // 2, W), 128, np.uint8)
        y[:H] = min(255, plan.index)  # frame index encoded in luma
        return y

    renderer = SyncRenderer(render or default_render, InlineExecutor())
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=lead_ms)
    audio = AvatarAudioTrack(clock=clock, compositor=comp, sample_rate=SR, frame_samples=960)
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)
    return comp, frames, audio, video, calls


async def pull(track, clock, step_ns):
    task = asyncio.ensure_future(track.recv())
    for _ in range(1000):
        await asyncio.sleep(0)
        if task.done():
            return task.result()
        await clock.advance(step_ns)
    raise AssertionError("recv never returned")


async def test_audio_pts_are_sample_counts_released_at_their_deadline():
    clock = ManualClock(start_ns=5_000_000)  # 5 ms after the epoch
    _, _, audio, _, _ = setup(clock)
    got = []
    for _ in range(5):
        frame = await pull(audio, clock, 1_000_000)
        got.append((frame.pts, clock.now_ns()))
        assert frame.time_base == Fraction(1, SR)
        assert frame.samples == 960 and frame.format.name == "s16"
    # starts on the first 20 ms boundary after "now", then every 960 samples
    assert [p for p, _ in got] == [960, 1920, 2880, 3840, 4800]
    for pts, released in got:
        assert released == pts * 1_000_000_000 // SR  # exactly at epoch + pts * time_base


async def test_audio_never_drifts_over_an_hour_of_frames():
    clock = ManualClock()
    _, _, audio, _, _ = setup(clock)
    audio._pts = 48000 * 3600 - 960  # resume just before the one-hour mark
    frame = await pull(audio, clock, 1_000_000_000 * 3600)
    assert frame.pts == 48000 * 3600
    assert clock.now_ns() >= 3600 * 1_000_000_000


async def test_video_pts_on_90khz_grid_and_frames_rendered_ahead():
    clock = ManualClock()
    comp, frames, _, video, calls = setup(clock)
    frames.start()
    out = []
    for _ in range(6):
        f = await pull(video, clock, 10_000_000)
        out.append(f)
    assert [f.pts for f in out] == [0, 3600, 7200, 10800, 14400, 18000]
    assert all(f.time_base == VIDEO_TIME_BASE for f in out)
    assert (out[0].width, out[0].height) == (W, H)
    # frame k carries the pixels rendered for plan k (luma encodes the index)
    for k, f in enumerate(out):
        assert int(f.to_ndarray()[0, 0]) == k
    assert video.stats.frames_repeated == 0
    assert frames.rendered >= 6
    await frames.aclose()


async def test_video_repeats_last_frame_when_render_is_late_and_counts_it():
    clock = ManualClock()
    _, frames, _, video, _ = setup(clock)
    # no producer running: only the very first frame is rendered on demand
    first = await pull(video, clock, 10_000_000)
    second = await pull(video, clock, 10_000_000)
    assert second.pts == first.pts + 3600
    assert np.array_equal(first.to_ndarray(), second.to_ndarray())
    assert video.stats.frames_repeated == 1


async def test_video_skips_ahead_when_far_behind_the_clock():
    clock = ManualClock()
    _, frames, _, video, _ = setup(clock)
    await pull(video, clock, 10_000_000)
    await clock.advance(400_000_000)  # stalled for 10 frames
    f = await pull(video, clock, 1_000_000)
    assert f.pts >= 10 * 3600
    assert video.stats.frames_skipped >= 9


async def test_clapper_flash_frame_and_beep_share_one_media_time():
    from media_tracks.clapper import clapper_pcm, detect_beep_onsets, flash_frames

    clock = ManualClock()
    comp, frames, audio, video, _ = setup(clock)
    s = comp.schedule(Segment(pcm=clapper_pcm(count=2, fps=FPS, sample_rate=SR),
                              mouth=np.zeros(0, np.float32),
                              flash_frames=frozenset(flash_frames(2, FPS))))
    frames.start()
    got: dict[str, list] = {"audio": [], "video": []}

    async def consume(track):
        while True:
            got[track.kind].append(await track.recv())

    tasks = [asyncio.create_task(consume(audio)), asyncio.create_task(consume(video))]
    end_ns = (s.end * 1_000_000_000) // SR + 100_000_000
    while clock.now_ns() < end_ns:
        await clock.advance(1_000_000)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    flash_pts = [f.pts for f in got["video"] if f.to_ndarray()[0, 0] > 200]
    first_pts = got["audio"][0].pts
    pcm = np.concatenate([a.to_ndarray().reshape(-1) for a in got["audio"]])
    beep_samples = [first_pts + o for o in detect_beep_onsets(pcm, SR)]
    flash_samples = [v * SR // 90000 for v in flash_pts]
    assert len(flash_samples) == 2 and len(beep_samples) == 2
    for b, fl in zip(beep_samples, flash_samples, strict=True):
        # sent ahead by the codec's lookahead, so it plays out on the flash's media time
        assert b + audio.codec_delay - fl in range(0, SR // 1000 * 2)
    await frames.aclose()


def test_rgb_to_i420_is_limited_range():
    white = np.full((4, 4, 3), 255, np.uint8)
    black = np.zeros((4, 4, 3), np.uint8)
    assert rgb_to_i420(white)[:4].max() == 235
    assert rgb_to_i420(black)[:4].min() == 16
    assert abs(int(rgb_to_i420(white)[4:].mean()) - 128) <= 1


class GatedRenderer:
    """An async renderer whose frames finish only when the test opens the gate."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.started: list[int] = []
        self.plans: dict[int, FramePlan] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.cancelled: list[int] = []
        self.finished: list[int] = []

    async def render(self, plan):
        self.started.append(plan.index)
        self.plans[plan.index] = plan
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(plan.index)
            raise
        finally:
            self.inflight -= 1
        self.finished.append(plan.index)
        y = np.full((H * 3 // 2, W), 128, np.uint8)
        y[:H] = 200 if plan.blend > 0 else 50  # speaking frames bright, idle dark
        return y


def gated_setup(clock, lead_ms=200):
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    renderer = GatedRenderer()
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=lead_ms)
    audio = AvatarAudioTrack(clock=clock, compositor=comp, sample_rate=SR, frame_samples=960)
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)
    return comp, frames, renderer, audio, video


async def test_producer_keeps_the_lead_in_flight_for_a_slow_engine():
    clock = ManualClock()
    comp, frames, renderer, _, _ = gated_setup(clock)
    frames.start()
    await asyncio.sleep(0)
    for _ in range(4):
        await clock.advance(1_000_000)
    # 200 ms lead at 25 fps: frames 0..5 are due at once, all handed over without waiting
    assert renderer.started[:6] == [0, 1, 2, 3, 4, 5]
    assert renderer.max_inflight >= 6
    assert renderer.max_inflight <= frames._max_inflight  # bounded
    renderer.gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    # frame 0 (due at t = 0) finished late; the rest are ready ahead of their time
    assert frames.stats.late == 1 and frames.stats.rendered >= 5 and frames.queued >= 5
    await frames.aclose()


async def test_late_frames_repeat_the_last_frame_count_late_and_audio_never_waits():
    clock = ManualClock()
    comp, frames, renderer, audio, video = gated_setup(clock)
    frames.start()
    got = {"audio": [], "video": []}

    async def consume(track):
        while True:
            got[track.kind].append(await track.recv())

    renderer.gate.set()
    tasks = [asyncio.create_task(consume(audio)), asyncio.create_task(consume(video))]
    for _ in range(200):  # 200 ms with frames on time
        await clock.advance(1_000_000)
    renderer.gate.clear()  # the engine stalls for 400 ms (frames already started finish)
    for _ in range(400):
        await clock.advance(1_000_000)
    renderer.gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    for _ in range(200):
        await clock.advance(1_000_000)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # audio: every 20 ms frame, contiguous pts, none missing while video stalled
    pts = [f.pts for f in got["audio"]]
    assert pts == list(range(pts[0], pts[0] + 960 * len(pts), 960))
    assert len(pts) >= 39
    # video kept its 25 fps grid by repeating frames, and the late ones were counted
    vpts = [f.pts for f in got["video"]]
    assert vpts == list(range(vpts[0], vpts[0] + 3600 * len(vpts), 3600))
    # frames started after the stall began and due before it ended (t = 440..560 ms) were late
    assert frames.stats.late >= 4
    assert video.stats.frames_repeated >= frames.stats.late
    await frames.aclose()


async def test_frames_the_track_has_passed_are_cancelled_not_rendered_for_nothing():
    """An engine behind the clock must not keep working on frames that can no longer be
    shown: when the track takes frame k, frames <= k still in flight are cancelled (a batching
    engine then drops them from its queue) and counted late."""
    clock = ManualClock()
    comp, frames, renderer, audio, video = gated_setup(clock, lead_ms=200)
    frames.start()
    shown = []

    async def consume():
        while True:
            await video.recv()
            shown.append(video._k)

    renderer.gate.set()
    task = asyncio.create_task(consume())
    for _ in range(100):  # 100 ms on time
        await clock.advance(1_000_000)
    repeated0 = video.stats.frames_repeated
    renderer.gate.clear()  # the engine stalls for 600 ms
    for _ in range(600):
        await clock.advance(1_000_000)
    assert video.stats.frames_repeated - repeated0 >= 4
    # every frame the track moved past either finished or was stopped; only frames still
    # ahead are in flight
    passed = {k for k in renderer.started if k <= shown[-1]}
    assert passed <= set(renderer.finished) | set(renderer.cancelled)
    assert len(renderer.cancelled) >= 4
    assert all(k > shown[-1] for k in frames._inflight)
    assert frames.stats.late == len(renderer.cancelled)
    assert renderer.inflight == len(frames._inflight)  # their slots were given back
    renderer.gate.set()  # the engine recovers: the frames ahead are shown
    for _ in range(200):
        await clock.advance(1_000_000)
    repeated1 = video.stats.frames_repeated
    for _ in range(200):
        await clock.advance(1_000_000)
    assert video.stats.frames_repeated == repeated1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await frames.aclose()


async def test_clear_drops_frames_rendered_ahead_and_renders_them_again():
    clock = ManualClock()
    comp, frames, renderer, audio, video = gated_setup(clock, lead_ms=200)
    renderer.gate.set()
    seg = comp.schedule(Segment(pcm=np.full(SR, 1000, np.int16), mouth=np.ones(25, np.float32)))
    frames.start()
    for _ in range(5):
        await clock.advance(1_000_000)
    ahead = sorted(frames._ready)
    assert ahead and all(renderer.plans[k].blend > 0 for k in ahead)  # speaking, pre-rendered
    comp.audio_at(0, 960)  # playout has reached 20 ms
    cut = comp.clear()
    assert cut == 1 and not any(k >= cut for k in frames._ready)  # the frame queue emptied
    before = len(renderer.started)
    for _ in range(5):
        await asyncio.sleep(0)
    # the re-planned frames were handed to the renderer again, now idle (no fade configured)
    again = renderer.started[before:]
    assert set(again) >= {k for k in ahead if k >= cut}
    assert all(renderer.plans[k].blend == 0 for k in again)
    assert frames.stats.rerendered >= len([k for k in ahead if k >= cut])
    assert seg.end == SR // FPS  # the audio queue ends at the cut
    await frames.aclose()


class SerialRenderer:
    """An engine slower than the frame rate: one frame at a time, ``service_ms`` of media time
    each (the clock is advanced by the test)."""

    def __init__(self, clock, service_ms):
        self.clock = clock
        self.service_ns = service_ms * 1_000_000
        self.lock = asyncio.Lock()
        self.rendered = 0

    async def render(self, plan):
        async with self.lock:
            await self.clock.sleep_until_ns(self.clock.now_ns() + self.service_ns)
            self.rendered += 1
        y = np.full((H * 3 // 2, W), 128, np.uint8)
        y[:H] = plan.index % 256
        return y


async def test_an_overloaded_engine_costs_frames_not_the_whole_picture():
    """An engine that renders 20 frames/s for a 25 fps call: with a fixed queue every frame
    would wait behind the others and miss its deadline (a frozen picture). The window shrinks
    and frames that cannot make it are skipped, so most of what is rendered is shown."""
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    renderer = SerialRenderer(clock, service_ms=50)
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=200)
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)
    frames.start()
    shown: list[int] = []

    async def consume():
        while True:
            f = await video.recv()
            shown.append(int(f.to_ndarray(format="gray")[0, 0]))

    task = asyncio.create_task(consume())
    for _ in range(8000):  # 8 s of media time in 1 ms steps
        await clock.advance(1_000_000)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await frames.aclose()
    # the engine's whole capacity (~20 fps) is used, and nearly all of it is shown in time
    assert renderer.rendered >= 150
    assert frames.stats.rendered >= 0.85 * renderer.rendered
    assert frames.stats.late <= 0.15 * renderer.rendered
    assert frames.stats.skipped > 0  # what could not make it was never started
    # the picture moves: distinct frames keep arriving over the last 4 s
    assert len(set(shown[-100:])) >= 60


class LateWakeClock(ManualClock):
    """Timers fire 3 ms after their deadline, as real ones do (a little late)."""

    async def sleep_until_ns(self, deadline_ns):
        await super().sleep_until_ns(deadline_ns + 3_000_000)

    async def wait_until_ns(self, deadline_ns, event):
        await super().wait_until_ns(deadline_ns + 3_000_000, event)


class StallOnceRenderer(SerialRenderer):
    """The first frame takes ``stall_ms`` (a model's first batch of a new shape), then each
    takes ``service_ms``."""

    def __init__(self, clock, service_ms, stall_ms):
        super().__init__(clock, service_ms)
        self.stall_ns = stall_ms * 1_000_000
        self.on_time_after_stall = 0

    async def render(self, plan):
        if self.stall_ns:
            stall, self.stall_ns = self.stall_ns, 0
            await self.clock.sleep_until_ns(self.clock.now_ns() + stall)
        return await super().render(plan)


async def test_after_a_long_stall_rendering_resumes_with_timers_that_fire_late():
    """A 1.5 s stall makes the render time estimate huge for a while; frames must still be
    started (a little after their due time, as timers fire) and the estimate recover, rather
    than every frame being skipped for being started a few ms after its due time."""
    clock = LateWakeClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    renderer = StallOnceRenderer(clock, service_ms=10, stall_ms=1500)
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=200)
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)
    frames.start()

    async def consume():
        while True:
            await video.recv()

    task = asyncio.create_task(consume())
    for _ in range(3000):  # the stall, then 1.5 s
        await clock.advance(1_000_000)
    mid = frames.stats.rendered
    repeated_mid = video.stats.frames_repeated
    for _ in range(3000):  # 3 s more
        await clock.advance(1_000_000)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await frames.aclose()
    assert frames.stats.rendered - mid >= 70  # 3 s at 25 fps: nearly every frame fresh
    assert video.stats.frames_repeated - repeated_mid <= 5


async def test_frames_are_handed_over_in_groups_for_a_batching_engine():
    """With group=2 the second frame of each pair starts with the first (at the first one's
    due time), so a batching engine sees a call's frames at least two at a time."""
    started = {}
    for group in (1, 2):
        clock = ManualClock()
        comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                          crossfade_frames=0)
        renderer = GatedRenderer()
        renderer.gate.set()
        frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=80,
                               group=group)
        frames.start()
        await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        at_zero = sorted(renderer.started)
        for _ in range(40):  # to t = 40 ms: frame 3 (t = 120 ms) is due at 40 ms alone
            await clock.advance(1_000_000)
        started[group] = (at_zero, sorted(renderer.started))
        await frames.aclose()
    # group 1: frames 0..2 (t <= 80 ms) at t = 0, frame 3 at 40 ms
    assert started[1][0] == [0, 1, 2] and started[1][1][:4] == [0, 1, 2, 3]
    # group 2: frame 3 goes with frame 2 at t = 0, and frames 4 and 5 together at 80 ms
    assert started[2][0] == [0, 1, 2, 3]
    assert 4 not in started[2][1]




def test_the_media_sends_step_is_the_gcd_of_the_audio_and_video_frames():
    assert send_step_ns(20_000_000, 25) == 20_000_000  # sends at 0, 20, 40, ... ms
    assert send_step_ns(40_000_000, 25) == 40_000_000
    assert send_step_ns(60_000_000, 25) == 20_000_000  # 0, 40, 60, 80, 120, ...
    assert send_step_ns(20_000_000, 30) == 6_666_666  # 0, 20, 33.3, 40, 60, 66.7, ...
    for audio_ms, fps in ((20, 25), (60, 25), (20, 30), (40, 50), (10, 60)):
        step = send_step_ns(audio_ms * 1_000_000, fps)
        sends = {a * audio_ms * 1_000_000 for a in range(60)} | {
            v * 1_000_000_000 // fps for v in range(120)}
        # every send, audio or video, is a multiple of the step (within a microsecond: the
        # step is rounded to whole nanoseconds at 30 fps)
        assert all(min(s % step, step - s % step) <= 1_000 for s in sends)
        assert step >= 3_000_000  # ... and the step is not trivially small


async def hand_over_ms(*, lead_ms: int, audio_frame_ns: int | None, until_ms: int
                       ) -> dict[int, int]:
    """The media time (ms) at which the producer hands each frame to the renderer."""
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    renderer = GatedRenderer()
    renderer.gate.set()
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=lead_ms,
                           audio_frame_ns=audio_frame_ns)
    frames.start()
    at: dict[int, int] = {}
    for _ in range(until_ms + 1):
        for _ in range(4):
            await asyncio.sleep(0)
        for k in renderer.started:
            at.setdefault(k, clock.now_ns() // 1_000_000)
        await clock.advance(1_000_000)
    await frames.aclose()
    return at


async def test_frames_are_handed_over_off_the_media_send_instants():
    """Given the call's audio frame (20 ms at 25 fps), frame k is handed over at t_k - lead
    + 10 ms: between the loop's sends (0, 20, 40 ms, ...), not on them."""
    plain = await hand_over_ms(lead_ms=80, audio_frame_ns=None, until_ms=60)
    assert [plain[k] for k in range(4)] == [0, 0, 0, 40]  # t_k - 80 ms, or at once
    shifted = await hand_over_ms(lead_ms=80, audio_frame_ns=20_000_000, until_ms=60)
    # frames 0 and 1 at once; 2 (t = 80 ms) at 10 ms, 3 at 50 ms: 10 ms after t_k - lead
    assert [shifted[k] for k in range(4)] == [0, 0, 10, 50]


async def test_a_lead_off_the_send_grid_still_hands_frames_over_midway():
    """lead 90 ms: t_k - lead already lies 10 ms past a send (at 30 ms for frame 3), so the
    hand-overs stay there rather than moving onto the next send."""
    at = await hand_over_ms(lead_ms=90, audio_frame_ns=20_000_000, until_ms=80)
    assert [at[k] for k in (3, 4)] == [30, 70]


async def test_a_group_of_frames_renders_as_one_executor_job():
    """``SyncRenderer`` turns the frames a group hands over at once into one job: with
    group=2, after the first lead every job is a pair of consecutive frames."""
    jobs: list[list[int]] = []

    class Recording(InlineExecutor):
        def submit(self, fn, /, *args, **kwargs):
            jobs.append([plan.index for plan in args[0]])
            return super().submit(fn, *args, **kwargs)

    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    renderer = SyncRenderer(lambda plan: np.zeros((H * 3 // 2, W), np.uint8), Recording())
    frames = FrameProducer(clock=clock, compositor=comp, renderer=renderer, lead_ms=80, group=2)
    frames.start()
    for _ in range(400):  # 0.4 s
        await clock.advance(1_000_000)
    await frames.aclose()
    first = jobs[0]  # the first lead's frames at once
    assert len(first) >= 2 and first == list(range(first[0], first[-1] + 1)), jobs
    assert len(jobs) >= 4
    assert all(job == [job[0], job[0] + 1] and job[0] % 2 == 0 for job in jobs[1:]), jobs


@pytest.mark.parametrize(("w", "h"), [(512, 512), (360, 202), (1280, 720), (322, 240)])
def test_i420_frame_is_pyavs_frame(w, h):
    """The track's own I420 -> VideoFrame copy gives PyAV's frame, whatever the strides."""
    from av import VideoFrame

    from media_tracks.tracks import i420_frame

    yuv = np.random.default_rng(w + h).integers(0, 256, (h * 3 // 2, w), dtype=np.uint8)
    ours, pyav = i420_frame(yuv), VideoFrame.from_ndarray(yuv, format="yuv420p")
    assert (ours.width, ours.height, ours.format.name) == (w, h, "yuv420p")
    assert np.array_equal(ours.to_ndarray(), pyav.to_ndarray())
