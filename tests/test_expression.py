"""The listening face (issue 23): the expression layer driven by scripted cues on a manual
media clock, through the call's wiring (``media_tracks.expressive``): nods at pauses and not
during continuous speech, rarer glances and blinks while listening, the thinking look after
the turn and gone on the first speaking frame, the head following the voice's stress, and no
jump of any landmark between frames larger than a stated bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from config import load_settings
from face.expression import NOD_GAP_NS, NOD_NS, THINK_GAZE, Expression, ExpressiveTimeline
from face.timeline import IdleTimeline
from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor, Segment
from media_tracks.expressive import CallExpression

MS = 1_000_000
S = 1_000_000_000
FPS, SR = 25, 48000
FRAME_NS = S // FPS
LEAD_NS = 200 * MS
# the farthest a landmark of the 512x512 face lies from the head's pivot (chin to forehead)
LANDMARK_RADIUS_PX = 260.0
MAX_STEP_PX = 1.0  # the bound: no landmark moves more than this between two frames


def call(strength: float = 1.0) -> tuple[ManualClock, Compositor, CallExpression]:
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=120,
                      crossfade_frames=3)
    return clock, comp, CallExpression(comp, strength=strength, lead_ns=LEAD_NS)


async def at(clock: ManualClock, t_ns: int) -> None:
    await clock.advance(t_ns - clock.now_ns())


def speech(seconds: float, syllables_hz: float = 4.0) -> Segment:
    """A segment whose mouth opens and closes like syllables, louder every third one."""
    n = int(seconds * FPS)
    k = np.arange(n)
    mouth = 0.5 + 0.5 * np.sin(2 * np.pi * syllables_hz * k / FPS)
    mouth *= np.where((k // (FPS / syllables_hz)).astype(int) % 3 == 0, 1.0, 0.4)
    return Segment(pcm=np.zeros(int(seconds * SR), np.int16), mouth=mouth.astype(np.float32))


async def test_nods_come_at_pauses_at_most_one_a_gap_and_never_in_continuous_speech():
    clock, _, ce = call()
    e = ce.expression
    ce.cue("user_start")  # the person starts speaking at 0 (stamped LEAD_NS ahead)
    await at(clock, 3 * S)  # three seconds of continuous speech: no pause, no nod
    assert e.nod_starts() == ()
    t = np.arange(0, 3 * S, FRAME_NS) + LEAD_NS
    assert all(e.offsets(int(x)) == (0.0, 0.0, 0.0) for x in t)
    ce.cue("user_pause")  # a pause: one nod, a little later
    await at(clock, 3 * S + 500 * MS)
    ce.cue("user_pause")  # another 0.5 s later: too soon, no second nod
    await at(clock, 5 * S)
    ce.cue("user_pause")  # 2 s after the first: a nod again
    nods = e.nod_starts()
    assert len(nods) == 2 and nods[1] - nods[0] >= NOD_GAP_NS
    assert nods[0] > 3 * S + LEAD_NS  # after the pause was heard, never before
    # a nod dips the head a few pixels and comes back
    dips = [e.offsets(nods[0] + j * FRAME_NS)[1] for j in range(NOD_NS // FRAME_NS + 2)]
    assert 2.0 <= max(dips) <= 3.0 and dips[0] == pytest.approx(0, abs=0.05)
    assert dips[-1] == pytest.approx(0, abs=0.05)
    ce.cue("user_end")
    await at(clock, 9 * S)
    ce.cue("user_pause")  # not listening any more (the person stopped 3 s ago): no nod
    assert len(e.nod_starts()) == 2


def glances_and_blinks(tl: IdleTimeline, t0: int, t1: int) -> tuple[int, int]:
    """Glances and blinks starting in [t0, t1) that really show (gaze or lids move)."""
    glances = sum(1 for s, e, _, _ in tl.saccades(t1) if s >= t0
                  and tl.pose_at((s + e) // 2).gaze_x != 0.0)
    blinks = 0
    for start in tl.blink_starts_ns(t1):
        if start >= t0 and tl.pose_at(start + tl.blink_duration_ns(start) // 2).blink > 0.5:
            blinks += 1
    return glances, blinks


async def test_glances_and_blinks_are_rarer_while_listening_than_at_rest():
    clock, _, ce = call()
    tl = ce.timeline(IdleTimeline(seed=7))
    rest = glances_and_blinks(tl, 10 * S, 310 * S)  # five minutes at rest
    await at(clock, 310 * S)
    ce.cue("user_start")  # then five minutes of the person speaking
    listening = glances_and_blinks(tl, 312 * S, 612 * S)
    assert rest[0] >= 40 and listening[0] <= 0.5 * rest[0], (rest, listening)
    assert 0.6 * rest[1] <= listening[1] <= 0.85 * rest[1], (rest, listening)


async def test_thinking_looks_up_and_aside_after_the_turn_and_is_gone_on_the_first_speaking_frame():
    clock, comp, ce = call()
    e = ce.expression
    tl = ce.timeline(IdleTimeline(seed=3))
    replans: list[int] = []
    comp.add_cut_listener(replans.append)
    ce.cue("user_start")
    await at(clock, 2 * S)
    ce.cue("user_end")
    await at(clock, 2 * S + 600 * MS)
    ce.state("thinking")  # the turn is being answered
    think_from = 2 * S + 600 * MS + LEAD_NS
    assert e.thinking(think_from - FRAME_NS)[0] == 0.0  # not before the turn ended
    looking = tl.pose_at(think_from + 400 * MS)
    side = math.copysign(1.0, looking.gaze_x)
    assert (abs(looking.gaze_x), looking.gaze_y) == pytest.approx(
        (THINK_GAZE[0], THINK_GAZE[1]), abs=0.05)
    assert looking.mouth_shape().is_rest()  # lips closed
    await at(clock, 3 * S + 500 * MS)
    item = comp.schedule(speech(2.0))  # the reply's speech: its first frame ends the look
    first_ns = comp.frame_t_ns(item.first_frame)
    idle = IdleTimeline(seed=3)
    on_first = tl.pose_at(first_ns)
    assert e.thinking(first_ns)[0] == 0.0
    assert (on_first.gaze_x, on_first.gaze_y) == (idle.pose_at(first_ns).gaze_x,
                                                  idle.pose_at(first_ns).gaze_y)
    # it faded over the frames before, which are drawn again for it
    before = [e.thinking(first_ns - j * FRAME_NS)[0] for j in (3, 2, 1)]
    assert before[0] == pytest.approx(1.0) and 0.0 < before[2] < before[1] <= 1.0
    assert min(replans) == item.first_frame - 2
    # the next turn looks to the other side
    await at(clock, 7 * S)
    ce.state("thinking")
    other = tl.pose_at(7 * S + LEAD_NS + 400 * MS)
    assert math.copysign(1.0, other.gaze_x) == -side
    ce.state("listening")  # that turn found nothing to say: the look goes
    assert e.thinking(7 * S + LEAD_NS + 200 * MS + 100 * MS)[0] == 0.0


async def test_the_head_follows_the_voices_stress_and_stops_with_a_cut():
    clock, comp, ce = call()
    e = ce.expression
    await at(clock, S)
    item = comp.schedule(speech(3.0))
    start = comp.frame_t_ns(item.first_frame)
    dys = np.array([e.offsets(start + j * FRAME_NS)[1] for j in range(75)])
    assert dys.max() > 0.8 and dys.min() >= 0.0  # stressed syllables dip the head
    assert np.corrcoef(dys, item.segment.mouth[:75] > 0.8)[0, 1] > 0.3  # on the loud ones
    await at(clock, start + S)
    cut = comp.clear()  # interrupted: the motion fades out right after the cut
    t_cut = comp.frame_t_ns(cut)
    assert all(e.offsets(t_cut + 200 * MS + j * FRAME_NS) == (0.0, 0.0, 0.0)
               for j in range(10))


async def test_no_landmark_moves_more_than_the_bound_between_frames():
    """Nods, listening, thinking and stressed speech together, frame by frame: the head's
    step (translation plus rotation at the farthest landmark) stays under MAX_STEP_PX."""
    clock, comp, ce = call(strength=1.0)
    tl = ce.timeline(IdleTimeline(seed=11))
    idle = IdleTimeline(seed=11)
    ce.cue("user_start")
    for k in range(1, 6):
        await at(clock, k * 900 * MS)
        ce.cue("user_pause")
    await at(clock, 6 * S)
    ce.cue("user_end")
    ce.state("thinking")
    await at(clock, 7 * S)
    comp.schedule(speech(4.0, syllables_hz=5.0))
    worst = 0.0
    prev = None
    for t in range(0, 12 * S, FRAME_NS):
        p, q = tl.pose_at(t), idle.pose_at(t)
        head = (p.head_dx - q.head_dx, p.head_dy - q.head_dy,
                math.radians(p.head_roll_deg - q.head_roll_deg))
        if prev is not None:
            step = (abs(head[0] - prev[0]) + abs(head[1] - prev[1])
                    + LANDMARK_RADIUS_PX * abs(head[2] - prev[2]))
            worst = max(worst, step)
        prev = head
    assert 0.2 < worst <= MAX_STEP_PX, worst  # it moves, smoothly


def test_strength_zero_or_off_is_the_idle_face():
    idle = IdleTimeline(seed=5)
    e = Expression(strength=0.0)
    e.cue("user_start", 0)
    e.cue("user_pause", S)
    tl = ExpressiveTimeline(idle, e)
    for t in range(0, 3 * S, 7 * FRAME_NS):
        p, q = tl.pose_at(t), idle.pose_at(t)
        assert (p.head_dx, p.head_dy, p.head_roll_deg) == (q.head_dx, q.head_dy,
                                                           q.head_roll_deg)
    settings = load_settings(env={"AVATAR_EXPRESSION__ENABLED": "false"})
    assert settings.expression.enabled is False
    assert load_settings(env={}).expression.strength == 1.0


@pytest.mark.parametrize("frames", [1, 3, 14, 40])
def test_speech_of_any_length_gets_a_stress_curve(frames):
    rng = np.random.default_rng(frames)
    from face.expression import Speech

    s = Speech.from_envelope(0, FRAME_NS, rng.random(frames))
    assert s.stress.shape == (frames,) and 0.0 <= s.stress.min() and s.stress.max() <= 1.0
    assert s.end_ns == frames * FRAME_NS
