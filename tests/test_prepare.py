"""prepare_avatar: images and short videos made from the default avatar (a real portrait with
committed landmarks), refusals, tracking, smoothing, the seamless loop, crops and masks."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from avatars.analysis import DetectedFace, FaceAnalyzer, create_analyzer
from avatars.prepare import PreparedAvatar, crop_square, prepare_avatar
from avatars.quality import RegistrationRefused, face_box_from_landmarks
from tests.fakes.prepare import FrameMedia
from tests.test_face_analysis import lift_to_3d, project

FPS = 25.0
FACE_CENTRE = (225.0, 132.0)  # roughly the default face's centre in astronaut.png


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return create_analyzer("dlib")


def moving_face(
    face_rgb: np.ndarray, committed: np.ndarray, n: int = 40, size: tuple[int, int] = (640, 480)
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` frames of the default face drifting sideways (90 px), bobbing and zooming in
    (1.15x to 1.35x): a smooth, known similarity transform per frame; and the true landmarks
    of each frame."""
    w, h = size
    frames, truth = [], []
    for i in range(n):
        u = i / (n - 1)
        s = 1.15 + 0.2 * u
        cx = w / 2 + 45 * math.sin(math.pi * (u - 0.5))
        cy = h / 2 + 12 * math.sin(2 * math.pi * u)
        m = np.array([[s, 0, cx - s * FACE_CENTRE[0]], [0, s, cy - s * FACE_CENTRE[1]]])
        frames.append(
            np.asarray(
                cv2.warpAffine(
                    face_rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                )
            )
        )
        truth.append(committed * s + m[:, 2])
    return frames, np.array(truth)


@pytest.fixture(scope="module")
def video(face_rgb, committed) -> tuple[list[np.ndarray], np.ndarray]:
    return moving_face(face_rgb, committed)


@pytest.fixture(scope="module")
def prepared_video(analyzer, video) -> tuple[PreparedAvatar, list[float]]:
    calls: list[float] = []
    frames, _ = video
    prepared = prepare_avatar(FrameMedia("video", frames, FPS), analyzer, progress=calls.append)
    return prepared, calls


def third_diff_rms(x: np.ndarray) -> float:
    d3 = x[3:] - 3 * x[2:-1] + 3 * x[1:-2] - x[:-3]
    return float(np.sqrt(np.mean(d3**2)))


# --------------------------------------------------------------------------- images


def test_image_avatar(analyzer, face_rgb, committed):
    calls: list[float] = []
    p = prepare_avatar(FrameMedia("image", [face_rgb]), analyzer, progress=calls.append)
    assert p.frame_count == 1 and p.frames[0] is face_rgb
    assert p.landmarks.shape == (1, 68, 2) and p.landmarks.dtype == np.float32
    assert np.abs(p.landmarks[0] - committed).mean() < 0.6
    assert p.boxes.shape == (1, 4) and p.boxes.dtype == np.float32
    np.testing.assert_allclose(p.boxes[0], face_box_from_landmarks(p.landmarks[0]), atol=1e-3)
    assert p.crops.shape == (1, 96, 96, 3) and p.crops.dtype == np.uint8
    assert p.mouth_masks.shape == p.face_masks.shape == (1, 96, 96)
    assert set(p.quality["checks"].values()) == {"pass"}
    assert p.quality["crop_size"] == 96
    json.dumps(p.quality)
    assert calls and calls[-1] == 1.0 and calls == sorted(calls)
    thumb = cv2.imdecode(np.frombuffer(p.thumbnail_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert thumb is not None and thumb.shape == (256, 256, 3)


def test_image_crop_is_the_face_and_matches_the_frame(analyzer, face_rgb):
    p = prepare_avatar(FrameMedia("image", [face_rgb]), analyzer, crop_size=128)
    assert p.crops.shape == (1, 128, 128, 3) and p.crop_size == 128
    x0, y0, x1, y1 = p.crop_boxes[0]
    assert x1 - x0 == pytest.approx(y1 - y0)  # square
    # the crop is the frame's square resampled: compare with an independent resize
    ix0, iy0, side = round(x0), round(y0), round(x1 - x0)
    ref = cv2.resize(face_rgb[iy0 : iy0 + side, ix0 : ix0 + side], (128, 128))
    assert np.abs(p.crops[0].astype(int) - ref.astype(int)).mean() < 12
    # landmarks fall inside the square, the mouth in its lower half
    lm = p.landmarks[0]
    assert (lm[:, 0] > x0).all() and (lm[:, 0] < x1).all()
    assert (lm[:, 1] > y0).all() and (lm[:, 1] < y1).all()
    assert lm[48:68, 1].min() > (y0 + y1) / 2


def test_masks_are_feathered_and_cover_mouth_and_face(analyzer, face_rgb):
    p = prepare_avatar(FrameMedia("image", [face_rgb]), analyzer)
    square = crop_square(p.boxes[0])
    k = 96 / (square[2] - square[0])
    crop_pts = (p.landmarks[0] - np.array(square[:2])) * k
    mouth, face = p.mouth_masks[0], p.face_masks[0]
    mx, my = np.round(crop_pts[62]).astype(int)  # inner upper lip
    assert mouth[my, mx] == 255 and face[my, mx] == 255
    ex, ey = np.round(crop_pts[36:42].mean(0)).astype(int)  # an eye: face yes, mouth no
    assert face[ey, ex] == 255 and mouth[ey, ex] == 0
    for mask in (mouth, face):
        assert mask[0, 0] == 0 and mask[-1, -1] == 0
    lips = np.round(crop_pts[48:68]).astype(int)
    assert mouth[lips[:, 1], lips[:, 0]].min() >= 200  # the whole mouth is (nearly) opaque
    assert (mouth > 0).sum() < (face > 0).sum()
    # feathered: walking away from the mouth (down from the lower lip) and out of the face
    # (left from the nose), the masks fall off gradually over several pixels, never jump
    for profile in (mouth[my:, mx], face[int(crop_pts[30, 1]), : int(crop_pts[30, 0])][::-1]):
        p = profile.astype(int)
        assert p[0] == 255 and p[-1] == 0
        assert (np.diff(p) <= 1).all()  # non-increasing (up to rounding)
        assert ((p > 0) & (p < 255)).sum() >= 4
        assert np.abs(np.diff(p)).max() < 100


def make_small(face_rgb):
    canvas = np.full((640, 640, 3), 120, np.uint8)
    canvas[192:448, 192:448] = cv2.resize(face_rgb, (256, 256), interpolation=cv2.INTER_AREA)
    return canvas


def make_blurred(face_rgb):
    big = cv2.resize(face_rgb, (1280, 1280), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(big, (0, 0), 6)


REFUSALS = {
    "blank": (lambda f: np.full((480, 640, 3), 128, np.uint8), "no_face", "no face"),
    "noise": (
        lambda f: np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "no_face",
        "no face",
    ),
    "two faces": (lambda f: np.concatenate([f, f], axis=1), "multiple_faces", "more than one"),
    "too small": (make_small, "face_too_small", "too small: 5"),
    "blurred": (make_blurred, "too_blurry", "too blurry"),
    "dark": (lambda f: (f * 0.2).astype(np.uint8), "too_dark", "too dark"),
    "bright": (
        lambda f: (255 - (255 - f.astype(np.float32)) * 0.2).astype(np.uint8),
        "too_bright",
        "too bright",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(analyzer, face_rgb, case):
    make, code, words = REFUSALS[case]
    image = np.ascontiguousarray(make(face_rgb))
    with pytest.raises(RegistrationRefused) as e:
        prepare_avatar(FrameMedia("image", [image]), analyzer)
    assert e.value.code == code, e.value.detail
    assert e.value.status == 422
    assert words in e.value.detail


def test_too_small_names_both_sizes(analyzer, face_rgb):
    with pytest.raises(RegistrationRefused) as e:
        prepare_avatar(FrameMedia("image", [make_small(face_rgb)]), analyzer)
    assert e.value.detail.endswith("px, at least 96 px needed")


def test_thresholds_are_adjustable(analyzer, face_rgb):
    small = make_small(face_rgb)
    p = prepare_avatar(
        FrameMedia("image", [small]), analyzer, quality_thresholds={"min_face_px": 48}
    )
    assert p.quality["thresholds"]["min_face_px"] == 48


class TurnedFace:
    """The dlib analyzer, but reporting the landmarks of a head turned 50° (1.6x the size,
    so that the narrower turned face is not also too small)."""

    name = "turned"

    def __init__(self, inner: FaceAnalyzer) -> None:
        self.inner = inner

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        out = []
        for f in self.inner.detect(rgb):
            pts = f.landmarks.astype(np.float64)
            centre = pts.mean(axis=0)
            big = (pts - centre) * 1.6 + 256.0
            turned = project(lift_to_3d(big), yaw=50) - 256.0 + centre
            out.append(DetectedFace(f.box, f.score, turned.astype(np.float32)))
        return out


def test_turned_face_refused_through_prepare(analyzer, face_rgb):
    with pytest.raises(RegistrationRefused) as e:
        prepare_avatar(FrameMedia("image", [face_rgb]), TurnedFace(analyzer))
    assert e.value.code == "face_turned", e.value.detail


class NoFrames:
    kind = "image"
    frames: list[np.ndarray] = []
    fps = 0.0
    width = height = 0


def test_bad_input(analyzer, face_rgb):
    with pytest.raises(ValueError, match="no frames"):
        prepare_avatar(NoFrames(), analyzer)
    with pytest.raises(ValueError, match="crop_size"):
        prepare_avatar(FrameMedia("image", [face_rgb]), analyzer, crop_size=8)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        prepare_avatar(FrameMedia("image", [face_rgb[:, :, 0].copy()]), analyzer)


# --------------------------------------------------------------------------- video


def test_video_landmarks_and_boxes_follow_the_motion(prepared_video, video):
    p, _ = prepared_video
    frames, truth = video
    c = p.quality["video"]["crossfade_frames"]
    n = p.frame_count
    assert c == 12  # 0.5 s at 25 fps
    assert n == len(frames) - c
    assert p.landmarks.shape == (n, 68, 2) and p.boxes.shape == (n, 4)
    assert p.crops.shape == (n, 96, 96, 3)
    # outside the cross-fade every loop frame is the source frame, landmarks on the truth
    for i in range(c, n):
        assert p.frames[i] is frames[i]
    err = np.abs(p.landmarks[c:] - truth[c:n])
    assert err.mean() < 1.0 and err.max() < 5.0, (err.mean(), err.max())
    true_boxes = np.array([face_box_from_landmarks(t) for t in truth[c:n]])
    centre = (p.boxes[c:, :2] + p.boxes[c:, 2:]) / 2
    centre_err = np.abs(centre - (true_boxes[:, :2] + true_boxes[:, 2:]) / 2)
    assert centre_err.mean() < 1.0
    size_ratio = (p.boxes[c:, 2] - p.boxes[c:, 0]) / (true_boxes[:, 2] - true_boxes[:, 0])
    assert np.abs(size_ratio - 1).max() < 0.03
    # the box really moved and zoomed over the clip (a tracker stuck on frame 0 fails above)
    assert np.ptp(truth[c:n, 30, 0]) > 40


def test_video_smoothing_reduces_jitter(prepared_video, video, analyzer):
    p, _ = prepared_video
    frames, truth = video
    c, n = p.quality["video"]["crossfade_frames"], p.frame_count
    raw = np.array([analyzer.detect(f)[0].landmarks for f in frames], dtype=np.float64)
    raw_jitter = third_diff_rms(raw[c:n] - truth[c:n])
    smooth_jitter = third_diff_rms(p.landmarks[c:].astype(np.float64) - truth[c:n])
    assert smooth_jitter < 0.5 * raw_jitter, (smooth_jitter, raw_jitter)
    jit = p.quality["video"]["jitter_px"]
    assert jit["smoothed"] < 0.5 * jit["raw"]


def test_video_loop_is_seamless(prepared_video):
    p, _ = prepared_video
    n = p.frame_count

    def diff(a: int, b: int) -> float:
        return float(np.abs(p.frames[a].astype(int) - p.frames[b].astype(int)).mean())

    wrap = diff(n - 1, 0)
    assert wrap < 0.35 * diff(0, n // 2)
    steps = [diff(i, i + 1) for i in range(n - 1)]
    assert wrap < 2.0 * float(np.median(steps))  # no bigger than an ordinary step
    lm_wrap = np.abs(p.landmarks[-1] - p.landmarks[0]).mean()
    lm_steps = np.abs(np.diff(p.landmarks, axis=0)).mean(axis=(1, 2))
    assert lm_wrap < 2.0 * float(np.median(lm_steps))
    assert lm_wrap < 0.25 * np.abs(p.landmarks[n // 2] - p.landmarks[0]).mean()


def test_video_crops_are_face_aligned(prepared_video, video):
    p, _ = prepared_video
    frames, _ = video
    c, n = p.quality["video"]["crossfade_frames"], p.frame_count
    a, b = c, c + (n - c) // 2
    crop_change = np.abs(p.crops[a].astype(int) - p.crops[b].astype(int)).mean()
    frame_change = np.abs(frames[a].astype(int) - frames[b].astype(int)).mean()
    assert crop_change < 0.4 * frame_change, (crop_change, frame_change)
    for masks in (p.mouth_masks, p.face_masks):
        assert ((masks > 0) & (masks < 255)).any(axis=(1, 2)).all()


def test_video_progress_and_report(prepared_video):
    p, calls = prepared_video
    assert len(calls) > 40 and calls == sorted(calls) and calls[-1] == 1.0
    v = p.quality["video"]
    assert v["frames_analysed"] == 40 and v["detect_every"] == 5
    assert v["detections"] == 8 and v["filled_frames"] == 0
    assert v["checked_frames"][0] == 0 and len(v["checked_frames"]) >= 3
    json.dumps(p.quality)


def test_gif_without_crossfade(analyzer, video):
    frames, truth = video
    p = prepare_avatar(FrameMedia("gif", frames[:12], 10.0), analyzer, loop_crossfade_s=0.0)
    assert p.frame_count == 12 and p.fps == 10.0
    assert np.abs(p.landmarks - truth[:12]).mean() < 1.0


def test_short_face_loss_is_bridged(analyzer, video):
    frames, truth = video
    frames = list(frames)
    for i in range(18, 21):  # 3 frames (0.12 s) without the face
        frames[i] = np.full_like(frames[i], 128)
    p = prepare_avatar(FrameMedia("video", frames, FPS), analyzer)
    assert p.quality["video"]["filled_frames"] >= 3
    c = p.quality["video"]["crossfade_frames"]
    # the bridged frames lie between their neighbours, near where the face would be
    assert np.abs(p.landmarks[18] - truth[18]).mean() < 10.0
    assert c < 18 < p.frame_count


def test_long_face_loss_is_refused(analyzer, video):
    frames = list(video[0])
    for i in range(12, 30):  # 0.72 s without the face
        frames[i] = np.full_like(frames[i], 128)
    with pytest.raises(RegistrationRefused) as e:
        prepare_avatar(FrameMedia("video", frames, FPS), analyzer)
    assert e.value.code == "no_face"
    assert "lost" in e.value.detail


def test_second_face_entering_mid_video_is_refused(analyzer, video, face_rgb):
    frames = list(video[0])
    intruder = face_rgb[50:230, 135:315]  # the face at 1x: 0.6-0.9x the moving one
    for i in range(15, 40):
        f = frames[i].copy()
        f[:180, :180] = intruder
        frames[i] = f
    with pytest.raises(RegistrationRefused) as e:
        prepare_avatar(FrameMedia("video", frames, FPS), analyzer)
    assert e.value.code == "multiple_faces"
    assert e.value.detail.startswith("at ")
