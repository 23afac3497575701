"""The viseme engine end to end: real Piper speech -> track -> frames on the default avatar.

Poses are fixed (no blinks, no head motion) wherever pixels are compared, so only the mouth
can move."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from avatars import DEFAULT_AVATAR_DIR, Avatar, load_avatar_dir
from face import FacePose, FaceRenderer, IdleTimeline, MouthShape
from face.library import LoadedAvatar
from face.yuv import flash_i420, rgb_to_i420
from media_tracks.compositor import FramePlan
from pipeline.lipsync.base import VISEMES, LipSyncEngine
from pipeline.lipsync.viseme_engine import VisemeEngine, VisemeRenderer
from pipeline.lipsync.visemes import VISEME_SHAPES, frame_rms, shape_for
from pipeline.tts import PiperTTS, SpeechAudio

FPS = 25
W = H = 512
NS_PER_FRAME = 1_000_000_000 // FPS


class StillTimeline:
    """An idle timeline without motion: eyes open, head still."""

    def pose_at(self, t_ns: int) -> FacePose:
        return FacePose.neutral(t_ns)


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar_dir(DEFAULT_AVATAR_DIR, width=W, height=H)


@pytest.fixture(scope="module")
def loaded(avatar: Avatar) -> LoadedAvatar:
    return LoadedAvatar("default", avatar, FaceRenderer(avatar))


@pytest.fixture(scope="module")
def speech() -> list[SpeechAudio]:
    tts = PiperTTS()
    tts.load()
    text = (
        "Hello! Would you like some coffee, or a cup of tea? "
        "My mother bought five blue boots with the money."
    )
    return list(tts._iter_sentences(text))


@pytest.fixture(scope="module")
def still(loaded: LoadedAvatar) -> VisemeRenderer:
    return VisemeEngine().renderer(
        loaded,
        StillTimeline(),
        width=W,
        height=H,  # type: ignore[arg-type]
        executor=None,
    )


def plan(k: int, lips: object | None = None, blend: float = 1.0, flash: bool = False) -> FramePlan:
    return FramePlan(index=k, t_ns=k * NS_PER_FRAME, lips=lips, blend=blend, flash=flash)


def luma_of(yuv: np.ndarray) -> np.ndarray:
    return yuv[:H].astype(np.int16)


def one_hot(v: str) -> np.ndarray:
    w = np.zeros(len(VISEMES), np.float32)
    w[VISEMES.index(v)] = 1.0
    return w


def test_engine_identity() -> None:
    engine: LipSyncEngine = VisemeEngine()
    assert engine.name == "viseme"
    info = engine.info()
    assert info["engine"] == "viseme" and info["device"] == "cpu"
    asyncio.run(engine.aclose())


def test_render_sync_frames(loaded: LoadedAvatar, speech: list[SpeechAudio]) -> None:
    engine = VisemeEngine()
    tl = IdleTimeline(seed=5)
    r = engine.renderer(loaded, tl, width=W, height=H, executor=None)
    # flash frames
    np.testing.assert_array_equal(r.render_sync(plan(3, flash=True)), flash_i420(W, H))
    # no speech, or blend 0: the idle face at the plan's time
    track = engine.analyse(speech[0], fps=FPS)
    for p in (plan(40), plan(40, lips=track.at(10), blend=0.0)):
        out = r.render_sync(p)
        assert out.shape == (H * 3 // 2, W) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, rgb_to_i420(loaded.face.render(tl.pose_at(p.t_ns))))
    # speech: the idle pose with the viseme mouth
    j = int(np.argmax(track.openness()))
    out = r.render_sync(plan(40, lips=track.at(j), blend=0.6))
    pose = tl.pose_at(40 * NS_PER_FRAME)
    from dataclasses import replace

    want = loaded.face.render(replace(pose, mouth=shape_for(track.at(j), blend=0.6)))
    np.testing.assert_array_equal(out, rgb_to_i420(want))


def test_async_render_runs_in_the_executor(loaded: LoadedAvatar) -> None:
    with ThreadPoolExecutor(2) as pool:
        r = VisemeEngine().renderer(
            loaded,
            StillTimeline(),
            width=W,
            height=H,  # type: ignore[arg-type]
            executor=pool,
        )

        async def main() -> list[np.ndarray]:
            return list(await asyncio.gather(*(r.render(plan(k, one_hot("AA"))) for k in range(4))))

        frames = asyncio.run(main())
    assert all(f.shape == (H * 3 // 2, W) for f in frames)
    assert all(np.array_equal(frames[0], f) for f in frames)


def test_a_calls_frames_come_in_pairs_and_a_pair_renders_as_one_job(
    loaded: LoadedAvatar, speech: list[SpeechAudio]
) -> None:
    engine = VisemeEngine()
    assert engine.frame_group == 2
    track = engine.analyse(speech[0], fps=FPS)
    submitted: list[int] = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            submitted.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return super().submit(fn, *args, **kwargs)

    plans = [plan(k, lips=track.at(k)) for k in range(6)]
    with Counting(2) as pool:
        r = engine.renderer(loaded, IdleTimeline(seed=5), width=W, height=H, executor=pool)

        async def main() -> list[np.ndarray]:
            out: list[np.ndarray] = []
            for i in range(0, len(plans), engine.frame_group):  # as FrameProducer hands them
                out += await asyncio.gather(*(r.render(p) for p in plans[i : i + 2]))
            return out

        frames = asyncio.run(main())
    assert submitted == [2, 2, 2]
    for p, f in zip(plans, frames, strict=True):
        np.testing.assert_array_equal(f, r.render_sync(p))


def test_mouth_moves_with_speech_and_is_still_in_silence(
    loaded: LoadedAvatar, still: VisemeRenderer, speech: list[SpeechAudio]
) -> None:
    x0, y0, x1, y1 = loaded.face._mouth.box
    engine = VisemeEngine()
    rest_frame = luma_of(still.render_sync(plan(0, one_hot("REST"))))[y0:y1, x0:x1]
    idle = luma_of(still.render_sync(plan(0)))
    change, rms = [], []
    for s in speech:
        track = engine.analyse(s, fps=FPS)
        frames = [luma_of(still.render_sync(plan(j, track.at(j)))) for j in range(track.n_frames)]
        for f in frames:
            # nothing outside the mouth rig's box moves
            outside = f.copy()
            outside[y0:y1, x0:x1] = idle[y0:y1, x0:x1]
            assert np.array_equal(outside, idle)
        mouth = [f[y0:y1, x0:x1] for f in frames]
        steps = [int(np.abs(a - b).max()) for a, b in zip(mouth, mouth[1:], strict=False)]
        assert np.mean([d > 0 for d in steps]) > 0.7  # moving while speech plays
        change += [float(np.abs(m - rest_frame).mean()) for m in mouth]
        rms += list(frame_rms(s.pcm, s.sample_rate, FPS))
    # the rendered mouth opens with the voice
    r = float(np.corrcoef(change, rms)[0, 1])
    assert r >= 0.5, r
    # silence (no speech planned): the same frame every time
    quiet = [still.render_sync(plan(k)) for k in range(0, 200, 7)]
    assert all(np.array_equal(quiet[0], q) for q in quiet)
    # and a held shape is exactly still too
    held = [still.render_sync(plan(k, one_hot("OH"))) for k in range(3)]
    assert all(np.array_equal(held[0], q) for q in held)


def test_each_viseme_changes_only_the_mouth_rig_box(loaded: LoadedAvatar, avatar: Avatar) -> None:
    wide = load_avatar_dir(DEFAULT_AVATAR_DIR, width=1280, height=720)
    for av, face in ((avatar, loaded.face), (wide, FaceRenderer(wide))):
        for viseme in VISEMES:
            _changes_only_the_box(av, face, viseme)


def _changes_only_the_box(avatar: Avatar, face: FaceRenderer, viseme: str) -> None:
    out = face.render(FacePose.neutral(mouth=VISEME_SHAPES[viseme]))
    diff = np.abs(out.astype(np.int16) - avatar.image).max(axis=2)
    x0, y0, x1, y1 = face._mouth.box
    inside = diff[y0:y1, x0:x1].copy()
    diff[y0:y1, x0:x1] = 0
    assert not diff.any(), viseme
    assert inside.max() > 40, viseme  # and it does change the mouth
    # the rig's border ring is never edited: no seam
    ring = np.concatenate(
        [inside[:2].ravel(), inside[-2:].ravel(), inside[:, :2].ravel(), inside[:, -2:].ravel()]
    )
    assert not ring.any(), viseme


def dark_width(img: np.ndarray, avatar: Avatar, thresh: float = 60.0) -> int:
    """Width of the dark opening: columns of the mouth area with at least 3 dark pixels (the
    thin shadow line of closed lips does not count)."""
    lm = avatar.landmarks
    x0, x1 = int(lm[48, 0]) - 8, int(lm[54, 0]) + 9
    y0, y1 = int(lm[48:68, 1].min()) - 4, int(lm[48:68, 1].max()) + 10
    luma = img[y0:y1, x0:x1].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    cols = np.flatnonzero((luma < thresh).sum(axis=0) >= 3)
    return int(cols[-1] - cols[0] + 1) if cols.size else 0


def corner_shift(img: np.ndarray, avatar: Avatar, which: int) -> int:
    """How far (px, + = right) a mouth corner (landmark 48 or 54) moved: the best match of
    the portrait's patch around it in ``img``, searched along the row band."""
    x, y = (int(round(v)) for v in avatar.landmarks[which])
    r, search = 5, 12
    patch = avatar.image[y - r : y + r + 1, x - r : x + r + 1]
    band = img[y - r - 3 : y + r + 4, x - r - search : x + r + search + 1]
    score = cv2.matchTemplate(band, patch, cv2.TM_SQDIFF)
    _, _, best, _ = cv2.minMaxLoc(score)
    return int(best[0] - search)


def test_rounding_narrows_the_mouth_and_spreading_widens_it(
    loaded: LoadedAvatar, avatar: Avatar
) -> None:
    face = loaded.face
    by = {v: face.render(FacePose.neutral(mouth=VISEME_SHAPES[v])) for v in VISEMES}
    # the dark opening: small and round for OO, a wide slot for EE and AA
    assert 0 < dark_width(by["OO"], avatar) < 0.4 * dark_width(by["EE"], avatar)
    assert dark_width(by["REST"], avatar) == 0
    assert dark_width(by["OH"], avatar) < dark_width(by["AA"], avatar)
    # the corners: pulled in when rounded, out when spread
    half_w = 0.5 * float(avatar.landmarks[54, 0] - avatar.landmarks[48, 0])
    assert corner_shift(by["OO"], avatar, 48) > 0.15 * half_w
    assert corner_shift(by["OO"], avatar, 54) < -0.15 * half_w
    assert corner_shift(by["EE"], avatar, 48) < 0 < corner_shift(by["EE"], avatar, 54)
    assert 0 < corner_shift(by["OH"], avatar, 48) < corner_shift(by["OO"], avatar, 48)
    # pressed lips (REST in speech) hide the teeth the portrait shows
    lm = avatar.landmarks
    teeth = (
        slice(int(lm[61:64, 1].min()), int(lm[65:68, 1].max())),
        slice(int(lm[61, 0]), int(lm[63, 0]) + 1),
    )
    luma = np.array([0.299, 0.587, 0.114])
    bright = lambda img: float((img[teeth].astype(np.float64) @ luma > 215).mean())  # noqa: E731
    assert bright(avatar.image) > 0.3 and bright(by["REST"]) < 0.06
    # f, v: the lower lip rises to the upper teeth (less of them shows than at rest)
    assert 0 < bright(by["FF"]) < bright(avatar.image)


def test_shape_fields_blend_continuously(loaded: LoadedAvatar) -> None:
    face = loaded.face
    prev = face.render(FacePose.neutral()).astype(np.int16)
    for t in np.linspace(0.05, 1.0, 20):
        s = MouthShape(open=0.4 * t, width=-0.8 * t, press=0.6 * t, tongue=0.5 * t)
        cur = face.render(FacePose.neutral(mouth=s)).astype(np.int16)
        assert np.abs(cur - prev).max() < 140  # no jumps between nearby shapes
        prev = cur


def test_mouth_open_alone_is_the_plain_jaw_drop(loaded: LoadedAvatar) -> None:
    face = loaded.face
    for m in (0.2, 0.7):
        np.testing.assert_array_equal(
            face.render(FacePose.neutral(mouth_open=m)),
            face.render(FacePose.neutral(mouth=MouthShape(open=m))),
        )


def test_loop_video_avatars_get_the_same_shapes(
    avatar: Avatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    import face.renderer

    monkeypatch.setattr(face.renderer, "LOOP_RIGS", 2)  # rigs are rebuilt as needed
    n, shift = 4, 6
    m = np.float32([[1, 0, shift], [0, 1, 0]])
    frames = [avatar.image]
    for _ in range(n - 1):
        frames.append(cv2.warpAffine(frames[-1], m, (W, H), borderMode=cv2.BORDER_REPLICATE))
    lms = tuple(avatar.landmarks + np.float32([shift * i, 0]) for i in range(n))
    loop = Avatar("loop", "loop", avatar.image, avatar.landmarks, tuple(frames), 25.0, lms, "cycle")
    looped, plain = FaceRenderer(loop), FaceRenderer(avatar)
    x0, y0, x1, y1 = plain._mouth.box
    for i in range(n):
        for v in ("OO", "EE", "FF"):
            shape = VISEME_SHAPES[v]
            got = looped.render(FacePose.neutral(i * NS_PER_FRAME, mouth=shape))
            want = plain.render(FacePose.neutral(mouth=shape))
            s = shift * i
            np.testing.assert_array_equal(got[y0:y1, x0 + s : x1 + s], want[y0:y1, x0:x1])
    assert len(looped._loop_mouths) == 2


def test_a_closed_mouth_portrait_gets_painted_teeth(loaded: LoadedAvatar, avatar: Avatar) -> None:
    """A portrait with the lips together shows no teeth of its own: spread and f-shapes paint
    them under the upper lip, the dark opening of an 'ah' stays mostly dark."""
    face = loaded.face
    closed = face.render(FacePose.neutral(mouth=VISEME_SHAPES["REST"]))
    rig = face._mouth
    lm = avatar.landmarks.copy()
    x0, y0 = rig.box[:2]
    for up, lo in ((60, 60), (61, 67), (62, 66), (63, 65), (64, 64)):
        c = int(round(float(lm[up, 0]) - x0))
        meet = float(rig.in_u[0, c] + 0.3 * (rig.in_l[0, c] - rig.in_u[0, c])) + y0
        lm[up, 1] = lm[lo, 1] = meet
    shut = FaceRenderer(Avatar("shut", "shut", closed, lm))
    assert shut._mouth.paint_teeth_h > 2
    luma = np.array([0.299, 0.587, 0.114])
    mx0, mx1 = int(lm[60, 0]), int(lm[64, 0]) + 1
    my0, my1 = int(lm[48:68, 1].min()) - 2, int(lm[48:68, 1].max()) + 8

    def teeth_px(v: str) -> int:
        img = shut.render(FacePose.neutral(mouth=VISEME_SHAPES[v]))[my0:my1, mx0:mx1]
        rgb = img.astype(np.float64)
        white = (rgb @ luma > 175) & (rgb.max(axis=2) - rgb.min(axis=2) < 30)
        return int(white.sum())

    assert teeth_px("REST") <= 5
    assert teeth_px("EE") >= 35 and teeth_px("TH") >= 30 and teeth_px("FF") >= 8


def test_a_frame_is_drawn_by_the_face_room_in_one_call():
    from dataclasses import replace

    face = FaceRenderer(load_avatar_dir(DEFAULT_AVATAR_DIR, width=256, height=256))
    timeline = IdleTimeline(seed=7)
    mouth = MouthShape(open=0.6)
    t = 1_234_000_000
    expected = rgb_to_i420(face.render(replace(timeline.pose_at(t), mouth=mouth)))
    np.testing.assert_array_equal(face.frame_i420(timeline, t, mouth), expected)
    idle = rgb_to_i420(face.render(timeline.pose_at(t)))
    np.testing.assert_array_equal(face.frame_i420(timeline, t), idle)
    assert not np.array_equal(expected, idle)  # the mouth really is drawn
