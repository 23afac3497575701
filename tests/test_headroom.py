"""Admission from measured headroom (issue 21): the rule fed with counter readings and a
clock, then the HTTP answers of a server whose headroom source is a fake: an offer refused
with 503 overloaded + Retry-After, /ready and /metrics showing the figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from config import load_settings
from rtc_server.app import create_app
from rtc_server.headroom import Headroom, Sample
from rtc_server.services import SERVICES
from tests.fakes.tts import ToneTTS


def feed(h: Headroom, *, seconds: int, busy_cores: float, server_cores: float, calls: int,
         fps: float = 25.0, missed_fps: float = 0.0) -> None:
    """Samples a second apart: the machine and the server busy at those rates, ``calls``
    live calls each due ``fps`` frames a second, ``missed_fps`` of them missed."""
    for t in range(seconds + 1):
        h.add(Sample(t=float(t), machine_busy_s=busy_cores * t, process_s=server_cores * t,
                     frames_due=int(calls * fps * t), frames_missed=int(calls * missed_fps * t),
                     calls=calls))


def test_a_server_without_calls_always_takes_one():
    h = Headroom(cores=2)
    feed(h, seconds=3, busy_cores=2.0, server_cores=0.1, calls=0)
    assert h.refusal(live=0) is None


def test_calls_missing_their_deadlines_refuse_the_next():
    h = Headroom(cores=2, max_missed_share=0.05)
    feed(h, seconds=3, busy_cores=0.8, server_cores=0.7, calls=2, missed_fps=2.5)  # 10 %
    reason, detail = h.refusal(live=2)
    assert reason == "deadlines" and "10%" in detail
    assert h.reading()["missed_share"] == pytest.approx(0.1, abs=0.01)


def test_cpu_headroom_counts_the_machine_the_measured_call_cost_and_the_pending_calls():
    h = Headroom(cores=2, cpu_target=0.9, call_cpu_cores=0.25)
    # 3 calls take 1.2 cores of this server (0.4 each, more than the 0.25 assumed)
    feed(h, seconds=3, busy_cores=1.3, server_cores=1.2, calls=3)
    r = h.reading()
    assert r["call_cores"] == pytest.approx(0.4) and r["busy_cores"] == pytest.approx(1.3)
    assert r["calls_more"] == 1  # (1.8 - 1.3) / 0.4
    assert h.refusal(live=3) is None
    # one call is still connecting: its 0.4 is not in the measurement yet
    reason, detail = h.refusal(live=3, pending=1)
    assert reason == "cpu" and "1.30 of 2 cores" in detail
    # another process takes the cores: the same calls leave no room
    h2 = Headroom(cores=2, cpu_target=0.9)
    feed(h2, seconds=3, busy_cores=1.7, server_cores=0.5, calls=2)
    assert h2.refusal(live=2)[0] == "cpu"


def test_the_window_forgets_an_old_overload():
    h = Headroom(cores=2, window_s=3.0)
    feed(h, seconds=3, busy_cores=1.9, server_cores=0.5, calls=2)
    assert h.refusal(live=2) is not None
    last = h._samples[-1]
    for t in range(4, 9):  # calm again: 0.6 cores busy
        h.add(Sample(t=float(t), machine_busy_s=last.machine_busy_s + 0.6 * (t - 3),
                     process_s=last.process_s + 0.5 * (t - 3), frames_due=50 * t,
                     frames_missed=0, calls=2))
    assert h.refusal(live=2) is None


def test_switched_off_it_never_refuses():
    h = Headroom(enabled=False, cores=2)
    feed(h, seconds=3, busy_cores=2.0, server_cores=2.0, calls=4, missed_fps=20)
    assert h.refusal(live=4) is None


@dataclass
class _Stats:
    frames_sent: int = 0
    frames_repeated: int = 0
    frames_skipped: int = 0
    frames_shed: int = 0


@dataclass
class _Call:
    state: str = "connected"
    stats: _Stats = field(default_factory=_Stats)

    @property
    def video_track(self):
        return self


def test_sample_reads_the_calls_frame_counters_and_a_closed_call_takes_nothing_back():
    readings = {"t": 0.0, "busy": 0.0, "proc": 0.0}
    h = Headroom(cores=2, busy=lambda: readings["busy"], process=lambda: readings["proc"],
                 now=lambda: readings["t"])
    a, b = _Call(), _Call(state="connecting")
    h.sample([a, b])
    readings.update(t=1.0, busy=0.5, proc=0.3)
    a.stats.frames_sent, a.stats.frames_repeated, a.stats.frames_skipped = 25, 4, 0
    b.stats.frames_sent = 99  # not connected: not counted
    h.sample([a, b])
    r = h.reading()
    assert r["calls"] == 1 and r["missed_share"] == pytest.approx(4 / 25)
    readings.update(t=2.0, busy=1.0, proc=0.6)
    h.sample([b])  # a ended: its counts stay in the totals, nothing is subtracted
    assert h.reading()["missed_share"] == pytest.approx(4 / 25)


async def test_an_offer_refused_for_headroom_is_503_overloaded_and_ready_and_metrics_say_so(
    aiohttp_client,
):
    settings = load_settings(env={}, overrides={"sessions.max_concurrent": 8})
    app = create_app(settings, tts=ToneTTS())
    clock = {"t": 0.0}
    fake = Headroom(cores=2, busy=lambda: 1.9 * clock["t"], process=lambda: 0.9 * clock["t"],
                    now=lambda: clock["t"])
    services = app[SERVICES]
    services.headroom = fake
    client = await aiohttp_client(app)
    # two calls are live (their slots connected) and the machine is busy
    for name in ("a", "b"):
        services.slots.reserve(name).connected()
    for t in range(4):
        clock["t"] = float(t)
        fake.add(Sample(t=float(t), machine_busy_s=1.9 * t, process_s=0.9 * t,
                        frames_due=50 * t, frames_missed=0, calls=2))
    resp = await client.post("/offer", json={"sdp": "v=0\r\n", "type": "offer"})
    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit() and int(resp.headers["Retry-After"]) >= 1
    body = await resp.json()
    assert body["error"] == "overloaded" and "cores are busy" in body["detail"]
    ready = await client.get("/ready")
    figures = await ready.json()
    assert ready.status == 503 and figures["checks"]["headroom"] is False
    assert figures["headroom"]["busy_cores"] == pytest.approx(1.9)
    assert figures["headroom"]["calls_more"] == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'avatar_offers_refused_overload_total{reason="cpu"} 1.0' in metrics
    assert "avatar_headroom_busy_cores 1.9" in metrics
    assert "avatar_headroom_calls 0.0" in metrics
    # the machine calms down: offers pass the headroom check again (this one then fails on
    # its SDP, a 400: it got past admission)
    for t in range(4, 8):
        fake.add(Sample(t=float(t), machine_busy_s=1.9 * 3 + 0.5 * (t - 3),
                        process_s=0.9 * 3 + 0.4 * (t - 3), frames_due=50 * t,
                        frames_missed=0, calls=2))
    resp = await client.post("/offer", json={"sdp": "v=0\r\n", "type": "offer"})
    assert resp.status != 503
    ready = await client.get("/ready")
    assert (await ready.json())["checks"]["headroom"] is True
