from fractions import Fraction

import pytest

from media_tracks.clock import (
    VIDEO_TIME_BASE,
    ManualClock,
    ns_to_pts,
    ns_to_pts_ceil,
    pts_to_ns,
    samples_to_video_pts,
    video_pts_to_samples,
)

AUDIO_TB = Fraction(1, 48000)


def test_pts_arithmetic_is_exact_integers():
    assert pts_to_ns(960, AUDIO_TB) == 20_000_000
    assert pts_to_ns(3600, VIDEO_TIME_BASE) == 40_000_000
    assert ns_to_pts(40_000_000, VIDEO_TIME_BASE) == 3600
    assert ns_to_pts(39_999_999, VIDEO_TIME_BASE) == 3599
    assert ns_to_pts_ceil(39_999_999, VIDEO_TIME_BASE) == 3600
    assert samples_to_video_pts(1920, 48000) == 3600
    assert video_pts_to_samples(3600, 48000) == 1920
    # an hour of audio converts with no accumulated error
    hour = 48000 * 3600
    assert samples_to_video_pts(hour, 48000) == 90000 * 3600
    for pts in (1, 7, 959, 12345678):
        assert ns_to_pts(pts_to_ns(pts, AUDIO_TB), AUDIO_TB) == pts


async def test_manual_clock_wakes_sleepers_in_deadline_order():
    import asyncio

    clock = ManualClock()
    woke: list[tuple[str, int]] = []

    async def sleeper(name: str, deadline: int) -> None:
        await clock.sleep_until_ns(deadline)
        woke.append((name, clock.now_ns()))

    tasks = [
        asyncio.create_task(sleeper("b", 30)),
        asyncio.create_task(sleeper("a", 10)),
        asyncio.create_task(sleeper("c", 50)),
    ]
    await asyncio.sleep(0)
    assert clock.sleepers == 3
    await clock.advance(35)
    assert woke == [("a", 10), ("b", 30)]
    assert clock.now_ns() == 35
    await clock.advance(100)
    assert woke[-1] == ("c", 50)
    await asyncio.gather(*tasks)


async def test_sleep_until_past_deadline_returns_at_once():
    clock = ManualClock(start_ns=1000)
    await clock.sleep_until_ns(500)  # must not block
    assert clock.now_ns() == 1000


@pytest.mark.parametrize("fps", [25, 30, 50])
def test_video_frame_pts_grid(fps):
    step = 90000 // fps
    assert [k * 90000 // fps for k in range(4)] == [0, step, 2 * step, 3 * step]


async def test_wait_until_ns_returns_at_the_deadline_or_when_the_event_is_set():
    import asyncio

    from media_tracks.clock import ManualClock

    clock = ManualClock()
    event = asyncio.Event()
    waiter = asyncio.get_running_loop().create_task(clock.wait_until_ns(50_000_000, event))
    await asyncio.sleep(0)
    await clock.advance(49_000_000)
    assert not waiter.done()
    await clock.advance(1_000_000)
    await asyncio.sleep(0)
    assert waiter.done()  # the deadline
    event.clear()
    waiter = asyncio.get_running_loop().create_task(clock.wait_until_ns(500_000_000, event))
    await asyncio.sleep(0)
    event.set()
    await asyncio.sleep(0)
    assert waiter.done() and clock.sleepers == 0  # the event; its timer is gone


async def test_real_clock_wait_until_ns_wakes_on_the_event_long_before_the_deadline():
    import asyncio
    import time

    from media_tracks.clock import MediaClock

    clock = MediaClock()
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    started = time.monotonic()
    await clock.wait_until_ns(clock.now_ns() + 60_000_000_000, event)
    assert time.monotonic() - started < 30  # woken by the event, not after a minute
