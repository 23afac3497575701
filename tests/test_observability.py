"""Readiness, Prometheus metrics and the detailed health report: from a started app (fakes for
speed), from session events fed to the hook, from a real loopback call, and from the tracks'
own measurements under a ManualClock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor
from media_tracks.frames import FrameProducer
from media_tracks.tracks import (
    FPS_WINDOW_NS,
    AvatarAudioTrack,
    AvatarVideoTrack,
    TrackStats,
    av_offset_ms,
)
from rtc_server.app import create_app
from rtc_server.observability import STAGES, readiness, session_event_hook
from rtc_server.services import SERVICES
from tests.fakes.peer import wait_until
from tests.fakes.tts import ToneTTS

pytestmark = pytest.mark.timeout(120)


def settings(tmp_path, **overrides):
    base = {
        "media.video_width": 128,
        "media.video_height": 128,
        "avatars.data_dir": str(tmp_path / "data"),
        "conversation.listen": False,
        "webrtc.host_candidates": "loopback",
        "sessions.max_concurrent": 3,
    }
    base.update(overrides)
    return load_settings(env={}, overrides=base)


async def start(aiohttp_client, tmp_path, **overrides):
    app = create_app(settings(tmp_path, **overrides), tts=ToneTTS())
    client = await aiohttp_client(app)
    return app, client


async def scrape(client) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> [(sample name, labels, value)] from GET /metrics."""
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(await r.text()):
        out[family.name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def value(metrics, family, sample, **labels) -> float:
    """The value of the one sample named ``sample`` with ``labels`` (0 when there is none)."""
    found = [v for n, lab, v in metrics.get(family, [])
             if n == sample and all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, (family, sample, labels, found)
    return found[0] if found else 0.0


# --- /ready ---------------------------------------------------------------------------------
async def test_ready_after_start_up_and_503_while_draining(aiohttp_client, tmp_path):
    app, client = await start(aiohttp_client, tmp_path)
    r = await client.get("/ready")
    body = await r.json()
    assert r.status == 200, body
    assert body["ready"] is True
    assert {"default_avatar", "tts", "lipsync", "render", "accepting"} <= set(body["checks"])
    assert all(body["checks"].values())
    assert "stt" not in body["checks"]  # not listening: Whisper is not needed
    app[SERVICES].draining.set()
    r = await client.get("/ready")
    body = await r.json()
    assert r.status == 503
    assert body["ready"] is False and body["checks"]["accepting"] is False
    assert body["checks"]["default_avatar"] is True
    # liveness is unaffected
    assert (await client.get("/health")).status == 200


def test_readiness_of_an_app_that_has_not_started_names_what_is_missing(tmp_path):
    app = create_app(settings(tmp_path, **{"conversation.listen": True}), tts=ToneTTS())
    checks = readiness(app)  # the start-up context has not run: most keys are missing
    assert checks["accepting"] is True
    for name in ("default_avatar", "tts", "lipsync", "stt", "vad", "render"):
        assert checks[name] is False, name
    assert readiness(web.Application()) is not None  # not even settings: still no exception


# --- /metrics -------------------------------------------------------------------------------
FAMILIES = {
    "avatar_sessions_live", "avatar_sessions_max", "avatar_session_fps_sent",
    "avatar_session_av_offset_ms", "avatar_session_video_frames", "avatar_video_frames",
    "avatar_session_frames_ahead", "avatar_session_say_queue", "avatar_stage_latency_seconds",
    "avatar_turns", "avatar_session_errors", "avatar_lipsync_queue_depth",
    "avatar_render_pool_pending", "avatar_render_pool_workers", "avatar_render_jobs",
    "avatar_render_cache_hits", "avatar_render_cache_misses", "avatar_render_cache_entries",
    "avatar_http_requests", "avatar_http_request_duration_seconds", "avatar_http_errors",
    "process_resident_memory_bytes",
}


async def test_metrics_parse_and_hold_every_family(aiohttp_client, tmp_path):
    _, client = await start(aiohttp_client, tmp_path)
    await client.get("/health")
    metrics = await scrape(client)
    assert FAMILIES <= set(metrics), FAMILIES - set(metrics)
    assert value(metrics, "avatar_sessions_live", "avatar_sessions_live") == 0
    assert value(metrics, "avatar_sessions_max", "avatar_sessions_max") == 3
    assert value(metrics, "avatar_render_pool_workers", "avatar_render_pool_workers") >= 2
    for stage in STAGES:  # every stage is listed before any turn
        assert value(metrics, "avatar_stage_latency_seconds",
                     "avatar_stage_latency_seconds_count", stage=stage) == 0
    assert value(metrics, "avatar_http_requests", "avatar_http_requests_total",
                 route="/health", method="GET", status="200") == 1


async def test_two_apps_in_one_process_count_apart(aiohttp_client, tmp_path):
    _, a = await start(aiohttp_client, tmp_path / "a")
    _, b = await start(aiohttp_client, tmp_path / "b")
    for _ in range(3):
        await a.get("/health")
    ma, mb = await scrape(a), await scrape(b)
    key = ("avatar_http_requests", "avatar_http_requests_total")
    assert value(ma, *key, route="/health", status="200") == 3
    assert value(mb, *key, route="/health", status="200") == 0


async def test_session_metrics_event_moves_the_stage_histograms(aiohttp_client, tmp_path):
    app, client = await start(aiohttp_client, tmp_path)
    hook = session_event_hook(app[SERVICES])
    session = SimpleNamespace(id="ab" * 16)  # no tracks: only the event is counted
    latencies_ms = {"vad_end_ms": 612.0, "stt_ms": 180.5, "llm_first_token_ms": 40,
                    "tts_first_audio_ms": 95.0, "lipsync_first_frame_ms": 3.2,
                    "voice_to_voice_ms": 1020.0}
    hook(session, {"type": "metrics", "source": "voice", "turn": 1, **latencies_ms})
    hook(session, {"type": "metrics", "source": "chat", "turn": 2, "llm_first_token_ms": 60.0,
                   "stt_ms": "not a number", "voice_to_voice_ms": float("nan")})
    metrics = await scrape(client)
    fam = "avatar_stage_latency_seconds"
    for key, ms in latencies_ms.items():
        stage = key.removesuffix("_ms")
        count = value(metrics, fam, f"{fam}_count", stage=stage)
        assert count == (2 if stage == "llm_first_token" else 1), stage
        if stage != "llm_first_token":
            assert value(metrics, fam, f"{fam}_sum", stage=stage) == pytest.approx(ms / 1000)
    # the 0.612 s observation sits in the 0.75 s bucket, not in the 0.5 s one
    assert value(metrics, fam, f"{fam}_bucket", stage="vad_end", le="0.5") == 0
    assert value(metrics, fam, f"{fam}_bucket", stage="vad_end", le="0.75") == 1
    assert value(metrics, "avatar_turns", "avatar_turns_total", source="voice") == 1
    assert value(metrics, "avatar_turns", "avatar_turns_total", source="chat") == 1


async def test_error_events_count_by_stage(aiohttp_client, tmp_path):
    app, client = await start(aiohttp_client, tmp_path)
    hook = session_event_hook(app[SERVICES])
    session = SimpleNamespace(id="cd" * 16)
    hook(session, {"type": "error", "stage": "llm", "fatal": False, "message": "x"})
    hook(session, {"type": "error", "stage": "llm", "fatal": True, "message": "x"})
    hook(session, {"type": "error", "stage": "tts", "fatal": False, "message": "x"})
    hook(session, {"type": "error", "message": "no stage"})
    hook(session, {"type": "error", "stage": "Weird Stage!", "message": "unbounded label"})
    hook(session, {"type": "state", "state": "listening"})  # not an error
    metrics = await scrape(client)
    fam, sample = "avatar_session_errors", "avatar_session_errors_total"
    assert value(metrics, fam, sample, stage="llm", fatal="false") == 1
    assert value(metrics, fam, sample, stage="llm", fatal="true") == 1
    assert value(metrics, fam, sample, stage="tts", fatal="false") == 1
    assert value(metrics, fam, sample, stage="session", fatal="false") == 2
    assert sum(v for n, _, v in metrics[fam] if n == sample) == 5


async def test_http_errors_count_by_status_and_code_and_routes_are_canonical(
    aiohttp_client, tmp_path
):
    _, client = await start(aiohttp_client, tmp_path)
    r404 = await client.get("/no/such/page")
    r400 = await client.post("/offer", data=b"{not json", headers={"Content-Type":
                                                                     "application/json"})
    rjob = await client.get("/v1/render/nosuchjob")
    assert (r404.status, r400.status, rjob.status) == (404, 400, 404)
    code404, code400 = (await r404.json())["error"], (await r400.json())["error"]
    metrics = await scrape(client)
    fam, sample = "avatar_http_errors", "avatar_http_errors_total"
    assert value(metrics, fam, sample, status="404", error=code404) == 2
    assert value(metrics, fam, sample, status="400", error=code400) == 1
    requests = [lab for n, lab, _ in metrics["avatar_http_requests"]
                if n == "avatar_http_requests_total"]
    routes = {lab["route"] for lab in requests}
    assert "/v1/render/{job_id}" in routes and "<unmatched>" in routes
    assert not any("nosuchjob" in r or "/no/such" in r for r in routes)


async def test_render_cache_hits_and_misses_follow_repeated_requests(
    aiohttp_client, tmp_path, monkeypatch
):
    from pipeline.render.core import ClipRenderer
    from tests.fakes.render import fake_run

    monkeypatch.setattr(ClipRenderer, "render", lambda self, *args: fake_run(*args))
    _, client = await start(aiohttp_client, tmp_path)

    def cache_counts(m):
        return (value(m, "avatar_render_cache_hits", "avatar_render_cache_hits_total"),
                value(m, "avatar_render_cache_misses", "avatar_render_cache_misses_total"))

    hits0, misses0 = cache_counts(await scrape(client))
    body = {"text": "steps=3 step_s=0.001 once"}
    first = await client.post("/v1/render", json=body)
    assert first.status == 200, await first.text()
    assert (await first.json())["cached"] is False
    hits1, misses1 = cache_counts(await scrape(client))
    assert hits1 == hits0 and misses1 > misses0
    again = await client.post("/v1/render", json=body)
    assert (await again.json())["cached"] is True
    hits2, misses2 = cache_counts(await scrape(client))
    assert hits2 == hits1 + 1 and misses2 == misses1
    stats = await (await client.get("/cache/stats")).json()
    assert (stats["hits"], stats["misses"]) == (hits2, misses2)
    metrics = await scrape(client)
    assert value(metrics, "avatar_render_cache_entries", "avatar_render_cache_entries") == 1
    assert value(metrics, "avatar_render_jobs", "avatar_render_jobs", state="queued") == 0


def fake_session(sid: str, *, sent: int, repeated: int, late: int) -> SimpleNamespace:
    """What the collector reads of a session: its tracks' and frame producer's stats."""
    from media_tracks.frames import ProducerStats

    video = TrackStats(frames_sent=sent, frames_repeated=repeated)
    frames = ProducerStats(late=late)
    return SimpleNamespace(
        id=sid,
        video_track=SimpleNamespace(stats=video, recent_fps=lambda: 25.0),
        audio_track=SimpleNamespace(stats=TrackStats(), recent_fps=lambda: 50.0),
        frames=SimpleNamespace(stats=frames, queued=4),
        pending_says=0,
    )


async def test_frame_totals_keep_closed_sessions_once(aiohttp_client, tmp_path):
    app, client = await start(aiohttp_client, tmp_path)
    hook = session_event_hook(app[SERVICES])
    a = fake_session("aa" * 16, sent=100, repeated=3, late=2)
    b = fake_session("bb" * 16, sent=50, repeated=1, late=0)
    app[SERVICES].sessions[a.id] = a
    hook(a, {"type": "hello"})  # seen by the hook, never scraped while live
    app[SERVICES].sessions[b.id] = b
    m = await scrape(client)
    fam, sample = "avatar_video_frames", "avatar_video_frames_total"
    assert value(m, fam, sample, outcome="sent") == 150
    assert value(m, "avatar_session_frames_ahead", "avatar_session_frames_ahead",
                 session="aaaaaaaa") == 4
    assert value(m, "avatar_session_fps_sent", "avatar_session_fps_sent",
                 session="bbbbbbbb", track="audio") == 50
    del app[SERVICES].sessions[a.id]
    a.video_track.stats.frames_sent += 10  # its last frames went out before it closed
    m = await scrape(client)
    assert value(m, fam, sample, outcome="sent") == 160
    assert value(m, fam, sample, outcome="repeated") == 4
    assert value(m, fam, sample, outcome="late") == 2
    assert not [s for s in m["avatar_session_video_frames"] if s[1]["session"] == "aaaaaaaa"]
    hook(a, {"type": "state", "state": "closed"})  # an event after it left: not re-counted
    del app[SERVICES].sessions[b.id]
    m = await scrape(client)
    assert value(m, fam, sample, outcome="sent") == 160
    assert value(m, "avatar_sessions_live", "avatar_sessions_live") == 0


# --- /health/detailed -----------------------------------------------------------------------
async def test_health_detailed_has_the_documented_shape(aiohttp_client, tmp_path):
    _, client = await start(aiohttp_client, tmp_path)
    r = await client.get("/health/detailed")
    assert r.status == 200
    body = await r.json()
    assert set(body) == {"status", "uptime_s", "version", "process", "system", "lipsync", "stt",
                         "tts", "pools", "sessions", "avatars"}
    assert body["status"] == "ok" and body["uptime_s"] >= 0 and body["version"]
    proc = body["process"]
    assert set(proc) == {"pid", "rss_bytes", "cpu_percent", "threads", "asyncio_tasks",
                         "open_fds"}
    assert proc["rss_bytes"] > 10_000_000 and proc["asyncio_tasks"] > 0
    assert proc["threads"] >= 1 and proc["open_fds"] > 0 and proc["cpu_percent"] >= 0
    system = body["system"]
    assert system["cpus"] >= 1
    assert 0 < system["memory_available_bytes"] <= system["memory_total_bytes"]
    assert len(system["load_avg"]) == 3
    assert body["lipsync"]["engine"] == "viseme" and body["lipsync"]["device"] == "cpu"
    assert body["stt"] is None  # not listening
    assert body["tts"]["sample_rate"] == 48000
    assert body["pools"]["render"]["workers"] >= 2 and body["pools"]["render"]["pending"] >= 0
    assert body["pools"]["jobs"]["backend"] == "local"
    assert body["sessions"] == {"live": 0, "max": 3}
    avatars = body["avatars"]
    assert avatars["loaded"] >= 1 and avatars["bytes"] > 0 and avatars["in_use"] == []
    assert avatars["budget_bytes"] == 512 * 1024 * 1024
    again = await (await client.get("/health/detailed")).json()
    assert again["uptime_s"] >= body["uptime_s"]


# --- a real call ----------------------------------------------------------------------------
@pytest.mark.e2e
async def test_a_real_call_shows_in_the_metrics_and_leaves_with_its_session(
    loopback_only, aiohttp_client, tmp_path
):
    from rtc_server.bot import Bot
    from rtc_server.ice import use_host_candidates

    use_host_candidates("loopback")
    app, client = await start(aiohttp_client, tmp_path)
    bot = Bot(str(client.make_url("")).rstrip("/"))
    await bot.connect()
    await bot.wait_first_video(20)
    label = bot.session_id[:8]
    bot.send({"type": "chat", "text": "Hello there."})
    turn = await bot.wait_event(lambda e: e.get("type") == "metrics", 40)
    session = app[SERVICES].sessions[bot.session_id]
    await wait_until(lambda: session.video_track.stats.frames_sent >= 30)
    metrics = await scrape(client)
    assert value(metrics, "avatar_sessions_live", "avatar_sessions_live") == 1
    assert value(metrics, "avatar_session_fps_sent", "avatar_session_fps_sent",
                 session=label, track="video") > 0
    assert value(metrics, "avatar_session_fps_sent", "avatar_session_fps_sent",
                 session=label, track="audio") > 0
    offsets = [v for n, lab, v in metrics["avatar_session_av_offset_ms"]
               if lab.get("session") == label]
    assert len(offsets) == 1 and np.isfinite(offsets[0])
    sent = value(metrics, "avatar_session_video_frames", "avatar_session_video_frames_total",
                 session=label, outcome="sent")
    assert sent >= 30
    # the turn's metrics event went through the hook into the histograms
    fam = "avatar_stage_latency_seconds"
    for stage in STAGES:
        expected = 1 if f"{stage}_ms" in turn else 0
        assert value(metrics, fam, f"{fam}_count", stage=stage) == expected, stage
    assert value(metrics, "avatar_turns", "avatar_turns_total", source=turn["source"]) == 1

    await bot.aclose()
    await wait_until(lambda: not app[SERVICES].sessions)
    metrics = await scrape(client)
    assert value(metrics, "avatar_sessions_live", "avatar_sessions_live") == 0
    for family in ("avatar_session_fps_sent", "avatar_session_av_offset_ms",
                   "avatar_session_video_frames", "avatar_session_frames_ahead"):
        assert not [s for s in metrics[family] if s[1].get("session") == label], family
    # the closed session's frames stay in the totals
    assert value(metrics, "avatar_video_frames", "avatar_video_frames_total",
                 outcome="sent") >= sent


# --- the tracks' own measurements -----------------------------------------------------------
def test_recent_fps_counts_the_last_window_and_falls_to_zero():
    stats = TrackStats()
    step = 40_000_000  # 25 fps
    for k in range(100):  # 4 s of frames
        stats.observe_send(k * step + 1_000_000, k * step, frame_s=0.04)
    now = 99 * step + 1_000_000
    assert stats.recent_fps(now) == pytest.approx(25.0)
    assert len(stats.sent_at_ns) <= FPS_WINDOW_NS // step + 1  # bounded by the window
    assert stats.recent_fps(now + FPS_WINDOW_NS // 2) == pytest.approx(12.5)
    assert stats.recent_fps(now + FPS_WINDOW_NS) == 0.0


def test_av_offset_is_video_lateness_minus_audio_lateness_smoothed():
    video, audio = TrackStats(), TrackStats()
    assert av_offset_ms(video, audio) is None
    for k in range(200):  # 8 s: video 30 ms late, audio 5 ms late
        video.observe_send(k * 40_000_000 + 30_000_000, k * 40_000_000, frame_s=0.04)
    for k in range(400):
        audio.observe_send(k * 20_000_000 + 5_000_000, k * 20_000_000, frame_s=0.02)
    assert av_offset_ms(video, audio) == pytest.approx(25.0)
    for k in range(200, 210):  # one late video frame moves the estimate a little, not fully
        late = 130_000_000 if k == 200 else 30_000_000
        video.observe_send(k * 40_000_000 + late, k * 40_000_000, frame_s=0.04)
    offset = av_offset_ms(video, audio)
    assert offset is not None and 25.0 < offset < 30.0


async def test_tracks_record_hand_over_times_on_their_clock():
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=25, sample_rate=48000, schedule_lead_ms=120,
                      crossfade_frames=0)

    class InlineRenderer:
        async def render(self, plan):
            return np.full((48 * 3 // 2, 64), 128, np.uint8)

    loop = asyncio.get_running_loop()
    frames = FrameProducer(clock=clock, compositor=comp, lead_ms=80, renderer=InlineRenderer())
    audio = AvatarAudioTrack(clock=clock, compositor=comp, sample_rate=48000, frame_samples=960)
    video = AvatarVideoTrack(clock=clock, compositor=comp, frames=frames)

    async def pull(track, n):
        for _ in range(n):
            task = loop.create_task(track.recv())
            while not task.done():
                await asyncio.sleep(0)
                if not task.done():
                    await clock.advance(5_000_000)
            task.result()

    await pull(video, 10)
    await pull(audio, 20)
    assert video.stats.frames_sent == 10 and audio.stats.frames_sent == 20
    assert video.recent_fps() > 0 and audio.recent_fps() > 0
    # the clock steps land on every deadline: both tracks hand over on time
    assert av_offset_ms(video.stats, audio.stats) == pytest.approx(0.0)
    await clock.advance(30_000_000)  # the next audio frame is handed over 10 ms late
    await pull(audio, 1)
    offset = av_offset_ms(video.stats, audio.stats)
    assert offset is not None and -10.0 < offset < 0.0  # audio now later: video "ahead"
    await frames.aclose()


async def test_the_server_freezes_its_start_up_objects_once_loaded(aiohttp_client, tmp_path):
    """``python -m rtc_server`` moves what start-up loaded out of the cyclic collector's reach
    (a full collection walking it held the event loop 34-206 ms), after loading, not before."""
    import gc

    from rtc_server.__main__ import _freeze_start_up_objects

    app = create_app(settings(tmp_path), tts=ToneTTS())
    _freeze_start_up_objects(app)
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        await aiohttp_client(app)
        assert gc.get_freeze_count() > 0
        # the lip-sync engine made during start-up is frozen (``gc.get_objects`` lists only
        # what the collector still walks): the freeze ran after loading
        engine = app[SERVICES].engines.lipsync
        assert not any(o is engine for o in gc.get_objects())
    finally:
        gc.unfreeze()  # this test process goes on: give the objects back to the collector
    assert any(o is engine for o in gc.get_objects())
