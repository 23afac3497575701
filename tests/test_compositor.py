import numpy as np
import pytest

from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor, Segment

SR = 48000
FPS = 25
SPF = SR // FPS  # samples per video frame


def make(clock=None, events=None, lead_ms=300, fade=5):
    return Compositor(
        clock=clock or ManualClock(),
        fps=FPS,
        sample_rate=SR,
        schedule_lead_ms=lead_ms,
        crossfade_frames=fade,
        on_event=(events.append if events is not None else None),
    )


def tone(n, value=1000):
    return np.full(n, value, dtype=np.int16)


def test_silence_when_nothing_is_scheduled():
    comp = make()
    out = comp.audio_at(0, 960)
    assert out.dtype == np.int16 and out.shape == (960,) and not out.any()
    plan = comp.frame_plan(3)
    assert plan.mouth == 0 and plan.segment_id is None and plan.t_ns == 120_000_000


def test_segment_starts_on_frame_boundary_after_lead():
    clock = ManualClock(start_ns=1_010_000_000)  # 1.01 s
    comp = make(clock)
    s = comp.schedule(Segment(pcm=tone(SPF * 3), mouth=np.ones(3, np.float32)))
    # earliest = 1.31 s -> next frame boundary 1.32 s = frame 33
    assert s.first_frame == 33
    assert s.start == 33 * SPF
    assert s.start % SPF == 0


def test_audio_samples_play_at_start_plus_i():
    comp = make()
    pcm = np.arange(1, SPF * 2 + 1, dtype=np.int16)
    s = comp.schedule(Segment(pcm=pcm, mouth=np.zeros(2, np.float32)))
    before = comp.audio_at(s.start - 480, 960)
    assert not before[:480].any()
    assert list(before[480:483]) == [1, 2, 3]
    mid = comp.audio_at(s.start + 100, 10)
    assert list(mid) == list(range(101, 111))
    after = comp.audio_at(s.end, 960)
    assert not after.any()


def test_video_frame_k_reads_mouth_of_same_audio_window():
    comp = make(fade=0)
    mouth = np.linspace(0.1, 1.0, 10).astype(np.float32)
    s = comp.schedule(Segment(pcm=tone(SPF * 10), mouth=mouth))
    for j in range(10):
        plan = comp.frame_plan(s.first_frame + j)
        assert plan.mouth == pytest.approx(float(mouth[j]))
        # frame k covers exactly the segment's samples [j*SPF, (j+1)*SPF)
        assert comp.frame_start_sample(plan.index) - s.start == j * SPF
    assert comp.frame_plan(s.first_frame - 1).segment_id is None
    assert comp.frame_plan(s.first_frame + 10).segment_id is None


def test_crossfade_in_and_out_over_five_frames():
    comp = make(fade=5)
    n = 30
    s = comp.schedule(Segment(pcm=tone(SPF * n), mouth=np.ones(n, np.float32)))
    blends = [comp.frame_plan(s.first_frame + j).blend for j in range(n)]
    assert blends[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert all(b == 1.0 for b in blends[5:-5])
    assert blends[-5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    # mouth is scaled by the cross-fade
    assert comp.frame_plan(s.first_frame).mouth == pytest.approx(1 / 6)


def test_second_segment_queues_back_to_back_without_fade_between():
    comp = make(fade=5)
    a = comp.schedule(Segment(pcm=tone(SPF * 10 + 5), mouth=np.ones(11, np.float32)))
    b = comp.schedule(Segment(pcm=tone(SPF * 10), mouth=np.ones(10, np.float32)))
    assert b.first_frame == a.first_frame + 11  # next frame boundary after a's end
    assert b.start >= a.end
    assert comp.frame_plan(a.first_frame + a.n_frames - 1).blend == 1.0
    assert comp.frame_plan(b.first_frame).blend == 1.0
    assert comp.frame_plan(b.first_frame + 9).blend < 1.0  # fades out at the very end


def test_state_and_playout_events_follow_playout_in_order():
    events = []
    comp = make(events=events)
    a = comp.schedule(Segment(pcm=tone(SPF * 5), mouth=np.ones(5, np.float32), text="one",
                              tag=("turn", 1)))
    b = comp.schedule(Segment(pcm=tone(SPF * 5), mouth=np.ones(5, np.float32), text="two"))
    pts = 0
    while pts < a.start:
        comp.audio_at(pts, 960)
        pts += 960
    assert events == []
    comp.audio_at(pts, 960)
    assert events == [
        {"type": "playout", "segment_id": a.id, "kind": "speech", "text": "one",
         "tag": ("turn", 1)},
        {"type": "state", "state": "speaking"},
    ]
    pts += 960
    while pts + 960 <= b.start:
        comp.audio_at(pts, 960)
        pts += 960
    assert len(events) == 2  # the second segment's text is not released before its audio
    for _ in range(40):
        comp.audio_at(pts, 960)
        pts += 960
    # both segments played with no idle in between
    assert events[2:] == [
        {"type": "playout", "segment_id": b.id, "kind": "speech", "text": "two", "tag": None},
        {"type": "state", "state": "listening"},
    ]


def test_flash_frames_are_planned_on_their_frames():
    comp = make()
    s = comp.schedule(
        Segment(pcm=tone(SPF * 20), mouth=np.zeros(0, np.float32), flash_frames=frozenset({3}))
    )
    assert comp.frame_plan(s.first_frame + 3).flash
    assert not comp.frame_plan(s.first_frame + 2).flash
    assert not comp.frame_plan(s.first_frame + 4).flash


def test_clear_drops_unplayed_segments():
    comp = make()
    comp.schedule(Segment(pcm=tone(SPF), mouth=np.ones(1, np.float32)))
    comp.clear()
    assert comp.queued == 0
    assert not comp.audio_at(0, SR).any()


class Lips:
    """A LipTrack whose feature for frame j is j itself."""

    def __init__(self, n):
        self.n_frames = n

    def at(self, j):
        return min(max(j, 0), self.n_frames - 1)

    def openness(self):
        return np.ones(self.n_frames, np.float32)


def test_plan_carries_the_lip_feature_of_its_own_frame():
    comp = make(fade=0)
    s = comp.schedule(Segment(pcm=tone(SPF * 10), mouth=np.ones(10, np.float32), lips=Lips(10)))
    for j in range(10):
        assert comp.frame_plan(s.first_frame + j).lips == j
    assert comp.frame_plan(s.first_frame + 10).lips is None


def test_clear_cuts_speech_at_the_next_frame_boundary_and_fades_holding_the_mouth():
    comp = make(fade=4)
    a = comp.schedule(Segment(pcm=tone(SPF * 40), mouth=np.ones(40, np.float32), lips=Lips(40)))
    b = comp.schedule(Segment(pcm=tone(SPF * 10), mouth=np.ones(10, np.float32), lips=Lips(10)))
    # play up to the middle of local frame 12 of the first segment
    pos = a.start
    while pos < a.start + 12 * SPF + SPF // 2:
        comp.audio_at(pos, 960)
        pos += 960
    played = comp.frame_plan(a.first_frame + 12)
    cut = comp.clear()
    assert cut == a.first_frame + 13  # the first frame boundary playout has not reached
    # the second segment is gone; of the first only the rest of the frame playing is left
    assert all(s is not b for s in comp._segments)
    assert a.end == a.start + 13 * SPF and 0 < a.end - pos < SPF
    # audio: the rest of frame 12 still plays, silence from the boundary on
    rest = comp.audio_at(pos, a.start + 13 * SPF - pos)
    assert (rest == 1000).all()
    assert not comp.audio_at(a.start + 13 * SPF, SR).any()
    # video: frames before the cut unchanged; after it the mouth holds frame 12's shape and
    # fades out over the cross-fade frames, then idle
    assert comp.frame_plan(a.first_frame + 12) == played
    blends = []
    for j in range(13, 13 + 4):
        plan = comp.frame_plan(a.first_frame + j)
        assert plan.lips == 12
        blends.append(plan.blend)
    assert blends == sorted(blends, reverse=True) and 0 < blends[-1] < blends[0] < 1
    after = comp.frame_plan(a.first_frame + 17)
    assert after.lips is None and after.blend == 0 and after.segment_id is None


def test_speech_scheduled_after_a_cut_starts_once_the_fade_is_over():
    clock = ManualClock()
    comp = make(clock=clock, fade=4, lead_ms=0)
    a = comp.schedule(Segment(pcm=tone(SPF * 40), mouth=np.ones(40, np.float32), lips=Lips(40)))
    comp.audio_at(a.start, SPF * 3)
    cut = comp.clear()
    c = comp.schedule(Segment(pcm=tone(SPF * 5), mouth=np.ones(5, np.float32), lips=Lips(5)))
    assert c.first_frame >= cut + 4
    assert comp.frame_plan(c.first_frame).segment_id == c.id
    assert comp.frame_plan(c.first_frame).blend < 1  # fades in again


async def test_a_speaker_waits_until_only_the_allowed_speech_is_ahead():
    """wait_until_ahead_at_most: a long text is synthesised as it plays, not all at once."""
    import asyncio

    clock = ManualClock()
    comp = make(clock)
    assert comp.scheduled_end_ns() == 0  # nothing scheduled: it ends now
    await comp.wait_until_ahead_at_most(3_000_000_000)  # returns at once
    seg = comp.schedule(Segment(pcm=np.zeros(SR * 10, np.int16), mouth=np.ones(250)))
    end_ns = seg.start * 1_000_000_000 // SR + 10_000_000_000
    assert comp.scheduled_end_ns() == end_ns
    waiter = asyncio.ensure_future(comp.wait_until_ahead_at_most(3_000_000_000))
    await clock.advance(end_ns - 3_000_000_000 - 1_000_000)
    assert not waiter.done()  # more than 3 s still ahead
    await clock.advance(1_000_000)
    for _ in range(3):
        await asyncio.sleep(0)
    assert waiter.done()
    # an interruption shortens what is ahead: a waiter goes on as soon as it fits
    comp.schedule(Segment(pcm=np.zeros(SR * 10, np.int16), mouth=np.ones(250)))
    waiter = asyncio.ensure_future(comp.wait_until_ahead_at_most(3_000_000_000))
    await asyncio.sleep(0)
    assert not waiter.done()
    comp.clear()
    await clock.advance(1_000_000_000)
    for _ in range(3):
        await asyncio.sleep(0)
    assert waiter.done()


def test_a_ducked_voice_fades_out_over_one_frame_and_back_on_the_same_clock():
    comp = make(fade=0)
    pcm = tone(SPF * 10, 1000)
    s = comp.schedule(Segment(pcm=pcm, mouth=np.ones(10, np.float32)))
    first = comp.audio_at(s.start, 960)
    assert (first == 1000).all()
    comp.duck(True)
    assert comp.ducked
    fade = comp.audio_at(s.start + 960, 960)
    assert fade[0] == 1000 and fade[-1] < 10 and (np.diff(fade.astype(int)) <= 0).all()
    assert not comp.audio_at(s.start + 1920, 960).any()  # silent while ducked
    assert comp.speaking  # ... though the speech goes on underneath
    comp.duck(False)
    back = comp.audio_at(s.start + 2880, 960)
    assert back[0] == 0 and back[-1] > 990 and (np.diff(back.astype(int)) >= 0).all()
    # the clock did not move: the samples after the fade are the segment's own at those pts
    np.testing.assert_array_equal(comp.audio_at(s.start + 3840, 960), pcm[3840:4800])
    assert not comp.ducked


def test_a_cut_while_ducked_stays_silent_up_to_the_cut():
    comp = make(fade=0)
    pcm = tone(SPF * 10, 1000)
    s = comp.schedule(Segment(pcm=pcm, mouth=np.ones(10, np.float32)))
    comp.audio_at(s.start, 960)
    comp.duck(True)
    comp.audio_at(s.start + 960, 480)  # faded out, half way through a video frame
    cut = comp.clear()  # the barge-in: speech stops at the next frame boundary...
    comp.duck(False)  # ... and the fade is over at once
    cut_sample = comp.frame_start_sample(cut)
    pts = s.start + 1440
    assert pts < cut_sample  # some speech is still before the cut
    while pts < cut_sample:
        assert not comp.audio_at(pts, 240).any()  # it does not come back for those samples
        pts += 240
    assert not comp.ducked


def test_a_duck_nobody_ends_ends_by_itself_after_its_media_time():
    comp = make(fade=0)
    pcm = tone(SPF * 50, 1000)  # 2 s of speech
    s = comp.schedule(Segment(pcm=pcm, mouth=np.ones(50, np.float32)))
    comp.audio_at(s.start, 960)
    comp.duck(True, max_ms=100)  # the VAD never says SpeechStart nor SpeechBlip
    pts = s.start + 960
    for _ in range(5):  # 100 ms of media time: faded
        out = comp.audio_at(pts, 960)
        pts += 960
    assert not out.any() and comp.ducked
    back = comp.audio_at(pts, 960)  # its time is up: the voice fades back in
    assert back[-1] > 990 and not comp.ducked
    np.testing.assert_array_equal(comp.audio_at(pts + 960, 960),
                                  pcm[pts + 960 - s.start: pts + 1920 - s.start])
