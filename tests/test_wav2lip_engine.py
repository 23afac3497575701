"""The Wav2Lip engine on a random-weight network of the real architecture: shapes, frame k
paired with mel window k, batching across sessions, paste-back through the mask, providers,
and the engine choice by config."""

import asyncio
import dataclasses
import sys

import numpy as np
import pytest

from common.errors import PipelineError
from config import load_settings
from face.library import AvatarLibrary
from face.yuv import rgb_to_i420
from media_tracks.clock import ManualClock
from media_tracks.compositor import Compositor, FramePlan, Segment
from pipeline.lipsync import create_lipsync_engine
from pipeline.lipsync.backends import choose_providers
from pipeline.lipsync.mel import mel_windows, to_wav2lip_audio, wav2lip_mel
from pipeline.lipsync.wav2lip import Wav2LipEngine, load_wav2lip_engine
from pipeline.lipsync.wav2lip_io import (
    FACE_SIZE,
    crop_face,
    face_geometry,
    model_input,
    paste,
)
from pipeline.tts import SpeechAudio

SR, FPS = 48000, 25


@pytest.fixture(scope="module")
def avatar(tmp_path_factory):
    lib = AvatarLibrary(data_dir=tmp_path_factory.mktemp("data"), width=512, height=512)
    return lib.get("default")


@pytest.fixture(scope="module")
def engine(wav2lip_onnx, tmp_path_factory):
    eng = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path_factory.mktemp("cache"), device="cpu", max_batch=8,
        max_wait_ms=20,
    )
    yield eng
    eng.worker.close()


def speech(seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    x = env * (0.3 * np.sin(2 * np.pi * 180 * t) + 0.05 * rng.standard_normal(t.size))
    return SpeechAudio(text="x", pcm=(x * 20000).astype(np.int16), sample_rate=SR)


def test_geometry_mask_covers_the_mouth_not_the_eyes_nor_the_border(avatar):
    lm = avatar.avatar.landmarks
    geo = face_geometry(lm, 512, 512)
    assert geo.x0 >= 0 and geo.y0 >= 0 and geo.x0 + geo.side <= 512 and geo.y0 + geo.side <= 512
    m = geo.mask
    assert m.shape == (geo.side, geo.side)
    assert m[0].max() == 0 and m[-1].max() == 0 and m[:, 0].max() == 0 and m[:, -1].max() == 0
    mouth = (lm[48:68].mean(axis=0) - [geo.x0, geo.y0]).round().astype(int)
    assert m[mouth[1], mouth[0]] > 0.95
    eyes_y = int(lm[36:48, 1].max() - geo.y0)
    assert m[: eyes_y + 1].max() == 0  # the eyes and everything above keep the idle pixels


def test_model_input_is_bgr_with_the_lower_half_blanked(avatar):
    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    geo = face_geometry(avatar.avatar.landmarks, 512, 512)
    face = crop_face(rgb, geo)
    assert face.shape == (FACE_SIZE, FACE_SIZE, 3) and (face[..., 2] == 255).all()
    x = model_input(face)
    assert x.shape == (6, FACE_SIZE, FACE_SIZE) and x.dtype == np.float32
    assert (x[2, : FACE_SIZE // 2] == 1).all() and (x[2, FACE_SIZE // 2 :] == 0).all()
    assert (x[5] == 1).all() and (x[3:5] == 0).all()  # the reference half is whole


def test_paste_leaves_every_pixel_outside_the_mask_unchanged(avatar):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    geo = face_geometry(avatar.avatar.landmarks, 512, 512)
    pred = rng.random((3, FACE_SIZE, FACE_SIZE), dtype=np.float32)
    out = paste(rgb, pred, geo, 1.0)
    inside = np.zeros((512, 512), bool)
    ys, xs = geo.slices
    inside[ys, xs] = geo.mask > 0
    assert np.array_equal(out[~inside], rgb[~inside])
    assert (out[inside] != rgb[inside]).mean() > 0.5
    assert np.array_equal(paste(rgb, pred, geo, 0.0), rgb)  # fully faded: the idle frame
    half = paste(rgb, pred, geo, 0.5).astype(int)
    full = out.astype(int)
    # the cross-fade weight scales the change
    d_half = np.abs(half - rgb)[inside].mean()
    d_full = np.abs(full - rgb)[inside].mean()
    assert 0.35 * d_full < d_half < 0.65 * d_full


def test_model_input_and_paste_equal_the_straightforward_formulas_to_the_last_bit(avatar):
    """The model input scaled into place and the paste that blends only the mask's bounding
    box give exactly what the straightforward formulas (both halves built and joined; the
    blend over the whole box) give."""
    import cv2

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    rgb = np.asarray(cv2.GaussianBlur(rgb, (0, 0), 2.0), np.uint8)
    for exact_from in (0, 39):
        geo = face_geometry(avatar.avatar.landmarks, 512, 512, exact_from=exact_from)
        r0, r1, c0, c1 = geo.blend
        assert np.count_nonzero(geo.mask[r0:r1, c0:c1]) == np.count_nonzero(geo.mask) > 0
        if exact_from:
            assert r0 > geo.side // 3  # a lower-rows model's paste touches the lower face only
        ref = crop_face(rgb, geo).astype(np.float32) * (1.0 / 255.0)
        masked = ref.copy()
        masked[FACE_SIZE // 2 :] = 0.0
        joined = np.concatenate([masked, ref], axis=2).transpose(2, 0, 1)
        assert np.array_equal(model_input(crop_face(rgb, geo)), joined)
        for rows in (FACE_SIZE, FACE_SIZE - exact_from):
            pred = rng.random((3, rows, FACE_SIZE), dtype=np.float32)
            whole = np.concatenate(
                [np.zeros((3, FACE_SIZE - rows, FACE_SIZE), np.float32), pred], axis=1)
            big = cv2.resize(
                np.ascontiguousarray(np.clip(whole.transpose(1, 2, 0)[..., ::-1] * 255, 0, 255)),
                (geo.side, geo.side), interpolation=cv2.INTER_CUBIC)
            for weight in (1.0, 0.37):
                want = rgb.copy()
                ys, xs = geo.slices
                region = want[ys, xs].astype(np.float32)
                alpha = (geo.mask * np.float32(weight))[..., None]
                want[ys, xs] = np.clip(region + alpha * (big - region) + 0.5, 0, 255).astype(
                    np.uint8)
                assert np.array_equal(paste(rgb, pred, geo, weight), want), (rows, weight)


def test_paste_has_no_seam_at_the_box_edge(avatar):
    """A prediction unlike the face blends in gradually: no step at the mask's edge."""
    rgb = np.full((512, 512, 3), 100, np.uint8)
    geo = face_geometry(avatar.avatar.landmarks, 512, 512)
    pred = np.ones((3, FACE_SIZE, FACE_SIZE), np.float32)  # white
    out = paste(rgb, pred, geo, 1.0).astype(int)[..., 0]
    steps = np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max()
    assert max(steps) <= 155 * 0.25  # a 155-level jump spread over several pixels


def test_engine_reports_the_provider_really_used(engine):
    info = engine.info()
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(
        "auto", ["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"]
    )[0] == "TensorrtExecutionProvider"
    assert choose_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]


def test_analyse_gives_one_mel_window_per_video_frame(engine):
    audio = speech(1.0)
    track = engine.analyse(audio, fps=FPS)
    assert track.n_frames == 25 and track.windows.shape == (25, 80, 16)
    expected = mel_windows(wav2lip_mel(to_wav2lip_audio(audio.pcm, SR)), 25, FPS)
    assert np.array_equal(track.windows, expected)
    assert track.openness().shape == (25,) and track.openness().max() > 0.5


async def test_frame_k_is_rendered_from_mel_window_k(engine, avatar):
    """Through the compositor: the plan for global frame first+k carries window k, and the
    pixels pasted are the model's output for exactly that window and that frame's face."""
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=SR, schedule_lead_ms=0,
                      crossfade_frames=0)
    audio = speech(1.0, seed=3)
    track = engine.analyse(audio, fps=FPS)
    seg = comp.schedule(Segment(pcm=audio.pcm, mouth=track.openness(), lips=track))
    timeline = avatar.new_timeline()
    r = engine.renderer(avatar, timeline, width=512, height=512, executor=None)
    for k in (0, 7, 24):
        plan = comp.frame_plan(seg.first_frame + k)
        assert np.array_equal(plan.lips, track.windows[k])
        got = await r.render(plan)
        rgb = r.idle_rgb(plan)
        geo = engine.faces(avatar.face).at(plan.t_ns)
        x = model_input(crop_face(rgb, geo))
        pred = engine.model.run(track.windows[k][None, None], x[None])[0]
        want = rgb_to_i420(paste(rgb, pred, geo, 1.0))
        assert got.shape == (512 * 3 // 2, 512)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        other = engine.model.run(track.windows[(k + 12) % 25][None, None], x[None])[0]
        assert np.abs(other - pred).max() > 1e-3  # another window would give other pixels


def test_an_avatars_paste_geometry_lives_only_while_a_call_uses_it(engine, tmp_path):
    import gc

    from face.library import AvatarLibrary

    library = AvatarLibrary(data_dir=tmp_path, width=512, height=512)
    loaded = library.get("default")
    r1 = engine.renderer(loaded, loaded.new_timeline(), width=512, height=512, executor=None)
    r2 = engine.renderer(loaded, loaded.new_timeline(), width=512, height=512, executor=None)
    assert r1._faces is r2._faces  # computed once, shared by the calls
    del r1, r2
    gc.collect()
    assert id(loaded.face) not in engine._faces  # no call: not kept (the library decides)


async def test_sessions_are_batched_together_with_the_same_results(engine, avatar):
    audio = speech(1.0, seed=5)
    track = engine.analyse(audio, fps=FPS)
    renderers = [
        engine.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=None)
        for _ in range(6)
    ]
    plans = [FramePlan(index=k, t_ns=k * 40_000_000, blend=1.0, mouth=1.0, lips=track.at(k))
             for k in range(6)]
    before = dataclasses.replace(engine.worker.stats)
    together = await asyncio.gather(*(r.render(p) for r, p in zip(renderers, plans, strict=True)))
    batches = engine.worker.stats.batches - before.batches
    assert batches < 6  # six sessions' frames shared model calls
    alone = [await r.render(p) for r, p in zip(renderers, plans, strict=True)]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


async def test_idle_and_flash_frames_skip_the_model(engine, avatar):
    timeline = avatar.new_timeline()
    r = engine.renderer(avatar, timeline, width=512, height=512, executor=None)
    items = engine.worker.stats.items
    idle = await r.render(FramePlan(index=0, t_ns=0))
    flash = await r.render(FramePlan(index=1, t_ns=40_000_000, flash=True))
    assert idle.shape == flash.shape == (768, 512)
    assert engine.worker.stats.items == items
    # the idle frame is drawn in I420 directly, equal to the RGB frame converted
    from face.yuv import rgb_to_i420

    assert np.array_equal(idle, rgb_to_i420(avatar.face.render(timeline.pose_at(0))))


async def test_model_render_and_colour_conversion_run_off_the_event_loop(
    engine, avatar, monkeypatch
):
    """A speaking frame's heavy steps (idle render and crop, the model, paste-back and
    RGB -> I420) run on the render pool and the inference worker, never on the loop's thread,
    so the two cores work in parallel while the loop keeps pacing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.lipsync import wav2lip

    seen: dict[str, set[int]] = {"render": set(), "model": set(), "i420": set(),
                                 "idle_i420": set()}
    real_i420, real_run, real_idle = wav2lip.rgb_to_i420, engine.model.run, avatar.face.render
    real_idle_i420 = avatar.face.render_i420

    def i420(rgb):
        seen["i420"].add(threading.get_ident())
        return real_i420(rgb)

    def run(mel, face):
        seen["model"].add(threading.get_ident())
        return real_run(mel, face)

    def idle(pose):
        seen["render"].add(threading.get_ident())
        return real_idle(pose)

    def idle_i420(pose):
        seen["idle_i420"].add(threading.get_ident())
        return real_idle_i420(pose)

    monkeypatch.setattr(wav2lip, "rgb_to_i420", i420)
    monkeypatch.setattr(engine.model, "run", run)
    monkeypatch.setattr(avatar.face, "render", idle)
    monkeypatch.setattr(avatar.face, "render_i420", idle_i420)
    track = engine.analyse(speech(0.5, seed=7), fps=FPS)
    pool = ThreadPoolExecutor(2, thread_name_prefix="render-test")
    try:
        r = engine.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=pool)
        plans = [FramePlan(index=k, t_ns=k * 40_000_000, blend=1.0, mouth=1.0,
                           lips=track.at(k)) for k in range(4)]
        frames = await asyncio.gather(*(r.render(p) for p in plans))
        idle_frame = await r.render(FramePlan(index=9, t_ns=9 * 40_000_000))
    finally:
        pool.shutdown()
    assert all(f.shape == (768, 512) for f in [*frames, idle_frame])
    loop_thread = threading.get_ident()
    assert all(seen.values()), seen  # every step ran ...
    for step, threads in seen.items():
        assert loop_thread not in threads, step  # ... and none on the loop's thread
    assert seen["model"].isdisjoint(seen["render"])  # the model has its own worker thread


async def test_a_frame_group_meets_in_one_batch_however_late_its_second_frame(
    wav2lip_onnx, avatar, tmp_path, monkeypatch
):
    """The two frames of a group are prepared (idle render, crop) one after another in one
    job and reach the worker at different times; each is announced before its preparation,
    so the batch waits for the slower one far beyond max_wait. A preparation that fails
    withdraws its announcement: the other frame does not wait for it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.lipsync.wav2lip import Wav2LipRenderer

    eng = load_wav2lip_engine(
        wav2lip_onnx, cache_dir=tmp_path, device="cpu", max_batch=8, max_wait_ms=1
    )
    eng.worker.max_hold_s = 30.0
    track = eng.analyse(speech(0.5, seed=11), fps=FPS)
    pool = ThreadPoolExecutor(2, thread_name_prefix="render-test")
    real_prepare = Wav2LipRenderer._prepare
    slow = threading.Event()

    def prepare(self, plan):
        if plan.index % 2:
            slow.wait(0.2)  # the second frame of the pair is 200 ms late (max_wait: 1 ms)
            if plan.index == 3:
                raise RuntimeError("idle render failed")
        return real_prepare(self, plan)

    monkeypatch.setattr(Wav2LipRenderer, "_prepare", prepare)
    r = eng.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=pool)
    try:
        plans = [FramePlan(index=k, t_ns=k * 40_000_000, blend=1.0, mouth=1.0,
                           lips=track.at(k)) for k in range(4)]
        pair = await asyncio.wait_for(asyncio.gather(r.render(plans[0]), r.render(plans[1])), 20)
        assert all(f.shape == (768, 512) for f in pair)
        assert eng.worker.stats.sizes == {2: 1}  # one batch for both
        results = await asyncio.wait_for(
            asyncio.gather(r.render(plans[2]), r.render(plans[3]), return_exceptions=True), 20
        )
        assert results[0].shape == (768, 512) and isinstance(results[1], RuntimeError)
        assert eng.worker.stats.sizes == {2: 1, 1: 1}  # frame 2 ran alone, well before 30 s
    finally:
        pool.shutdown()
        eng.worker.close()


def settings(**lipsync):
    return load_settings(env={}, overrides={f"lipsync.{k}": v for k, v in lipsync.items()})


def test_auto_without_weights_or_without_a_gpu_picks_the_viseme_engine(
    wav2lip_onnx, tmp_path, monkeypatch
):
    assert create_lipsync_engine(settings(engine="auto")).name == "viseme"
    monkeypatch.setitem(sys.modules, "openvino", None)  # no OpenVINO: plain ONNX Runtime fp32
    chosen = create_lipsync_engine(
        settings(engine="auto", wav2lip_model=str(wav2lip_onnx), model_cache_dir=str(tmp_path))
    )
    assert chosen.name == "viseme"  # weights, but only the CPU provider is active here
    forced = create_lipsync_engine(
        settings(engine="wav2lip", wav2lip_model=str(wav2lip_onnx), device="cpu",
                 model_cache_dir=str(tmp_path))
    )
    assert isinstance(forced, Wav2LipEngine)
    assert forced.info()["backend"] == "onnxruntime"
    forced.worker.close()


def test_misconfigured_wav2lip_is_a_clear_error(wav2lip_onnx, tmp_path):
    with pytest.raises(PipelineError, match="wav2lip_model is not set"):
        create_lipsync_engine(settings(engine="wav2lip"))
    with pytest.raises(PipelineError, match="no GPU execution provider"):
        create_lipsync_engine(
            settings(engine="wav2lip", wav2lip_model=str(wav2lip_onnx), device="cuda",
                     model_cache_dir=str(tmp_path))
        )
    with pytest.raises(PipelineError, match="missing.onnx"):
        create_lipsync_engine(
            settings(engine="wav2lip", wav2lip_model=str(tmp_path / "missing.onnx"))
        )


def test_the_lipsync_section_builds_the_engine_it_describes(wav2lip_onnx, tmp_path):
    from config import load_settings
    from pipeline.lipsync.wav2lip import wav2lip_engine_from_settings

    cfg = load_settings(env={}, overrides={
        "lipsync.wav2lip_model": str(wav2lip_onnx), "lipsync.device": "cpu",
        "lipsync.max_batch": 4, "lipsync.frame_group": 2, "lipsync.lower_face_only": False,
    }).lipsync
    eng = wav2lip_engine_from_settings(cfg, cache_dir=tmp_path)
    try:
        info = eng.info()
        assert (info["max_batch"], info["frame_group"]) == (4, 2)
        assert eng.model.rows.first == 0  # the whole crop, as lower_face_only false asks
    finally:
        eng.worker.close()
    with pytest.raises(ValueError, match="wav2lip_model"):
        wav2lip_engine_from_settings(load_settings(env={}).lipsync, cache_dir=tmp_path)
