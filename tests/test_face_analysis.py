"""Face analysis backends (dlib, Haar, insightface) and the quality measures, on the default
avatar (a real 512x512 portrait with committed dlib landmarks) and images derived from it."""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np
import pytest

from avatars.analysis import AnalyzerError, DetectedFace, FaceAnalyzer, create_analyzer
from avatars.analysis.haar_backend import HaarAnalyzer
from avatars.analysis.insightface_backend import map_106_to_68
from avatars.quality import (
    RegistrationRefused,
    assess_quality,
    brightness,
    check_quality,
    face_box_from_landmarks,
    head_pose,
    sharpness,
)

# dlib-68 index of each point's mirror image (left <-> right)
MIRROR_68 = [
    *range(16, -1, -1),
    *range(26, 16, -1),
    27, 28, 29, 30,
    35, 34, 33, 32, 31,
    45, 44, 43, 42, 47, 46,
    39, 38, 37, 36, 41, 40,
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
    64, 63, 62, 61, 60, 67, 66, 65,
]  # fmt: skip


@pytest.fixture(scope="module")
def dlib_analyzer() -> FaceAnalyzer:
    return create_analyzer("dlib")


def lift_to_3d(lm: np.ndarray) -> np.ndarray:
    """A frontal face's 2-D landmarks given plausible depth (a rounded head, the nose and lips
    standing out): a test model independent of the pose estimator's constants."""
    cx = (lm[0, 0] + lm[16, 0]) / 2
    half_w = (lm[16, 0] - lm[0, 0]) / 2
    cy = lm[27:36, 1].mean()
    u = np.clip((lm[:, 0] - cx) / half_w, -1, 1)
    z = 0.85 * half_w * np.sqrt(1 - 0.95 * u**2)
    z[27:31] += np.linspace(0.12, 0.38, 4) * half_w
    z[31:36] += 0.18 * half_w
    z[48:68] += 0.06 * half_w
    return np.c_[lm[:, 0] - cx, lm[:, 1] - cy, z]


def project(points: np.ndarray, *, yaw: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """Orthographic view after turning the head (yaw > 0: nose towards image right; pitch > 0:
    looking up; image y points down)."""
    a, b = math.radians(yaw), math.radians(pitch)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return (points @ ry.T @ rx.T)[:, :2] + 256.0


# --------------------------------------------------------------------------- dlib


def test_dlib_landmarks_land_on_the_committed_ones(dlib_analyzer, face_rgb, committed):
    faces = dlib_analyzer.detect(face_rgb)
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    err = np.abs(face.landmarks - committed)
    assert err.mean() < 0.6 and err.max() < 2.5, (err.mean(), err.max())
    x0, y0, x1, y1 = face.box
    assert x0 < committed[:, 0].mean() < x1 and y0 < committed[:, 1].mean() < y1
    assert face.score > 0


def test_dlib_maps_boxes_back_from_the_downscaled_copy(dlib_analyzer, face_rgb, committed):
    # 2x enlarged on a 1280x720 frame: detection runs on a 640x360 copy
    frame = np.full((720, 1280, 3), 90, np.uint8)
    big = cv2.resize(face_rgb, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    frame[:, 100:1124] = big[80:800]
    expected = (committed + 0.5) * 2 - 0.5 + [100, -80]
    faces = dlib_analyzer.detect(frame)
    assert len(faces) == 1
    err = np.abs(faces[0].landmarks - expected)
    assert err.mean() < 1.5 and err.max() < 5, (err.mean(), err.max())
    x0, y0, x1, y1 = faces[0].box
    assert 150 < x1 - x0 < 230  # the 88 px box of the 1x image, doubled


def test_dlib_finds_every_face_largest_first(dlib_analyzer, face_rgb):
    small = cv2.resize(face_rgb, (384, 384), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 896, 3), 120, np.uint8)
    canvas[:, :512] = face_rgb
    canvas[64:448, 512:] = small
    faces = dlib_analyzer.detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[2] < 512 <= faces[1].box[0]


def test_dlib_no_face_in_blank_or_noise(dlib_analyzer):
    assert dlib_analyzer.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    noise = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert dlib_analyzer.detect(noise) == []


def test_dlib_landmarks_in_a_given_box_track_a_shifted_face(dlib_analyzer, face_rgb, committed):
    shifted = np.ascontiguousarray(np.roll(face_rgb, (6, -9), axis=(0, 1)))
    box = dlib_analyzer.detect(face_rgb)[0].box  # the unshifted face's box
    pts = dlib_analyzer.landmarks_in_box(shifted, box)
    assert np.abs(pts - (committed + [-9, 6])).mean() < 1.0


def test_analyzer_rejects_non_rgb(dlib_analyzer):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        dlib_analyzer.detect(np.zeros((64, 64), np.uint8))


# --------------------------------------------------------------------------- Haar


def test_haar_detects_the_default_face(face_rgb, committed):
    haar = create_analyzer("haar")
    assert haar.name == "haar"
    faces = haar.detect(face_rgb)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert x0 <= committed[:, 0].min() + 5 and x1 >= committed[:, 0].max() - 5
    assert isinstance(x0, float)
    err = np.abs(faces[0].landmarks - committed)
    assert err.mean() < 1.0, err.mean()  # dlib's predictor on the converted Haar box


def test_haar_template_landmarks_are_rough_estimates(face_rgb, committed):
    haar = HaarAnalyzer(use_dlib=False)
    assert haar.landmarks_are_estimates
    faces = haar.detect(face_rgb)
    assert len(faces) == 1
    err = np.abs(faces[0].landmarks - committed)
    assert err.mean() < 4.0 and err.max() < 10.0, (err.mean(), err.max())


# --------------------------------------------------------------------------- insightface


def test_unknown_backend_is_an_analyzer_error():
    with pytest.raises(AnalyzerError, match="unknown face analysis backend 'opencv-dnn'") as e:
        create_analyzer("opencv-dnn")
    assert e.value.status == 500
    assert "dlib, haar, insightface" in e.value.detail


def test_insightface_without_a_folder_is_an_analyzer_error():
    with pytest.raises(AnalyzerError, match="needs a model folder"):
        create_analyzer("insightface")


def test_insightface_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(AnalyzerError) as e:
        create_analyzer("insightface", insightface_root=str(missing))
    assert str(missing) in e.value.detail and "does not exist" in e.value.detail
    assert "never downloaded" in e.value.detail


def test_insightface_empty_pack_is_refused_before_insightface_runs(tmp_path, monkeypatch):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    (tmp_path / "models" / "buffalo_l" / "README.txt").write_text("no models here")
    fa = pytest.importorskip("insightface.app.face_analysis")

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("insightface tried to download a model pack")

    monkeypatch.setattr(fa, "ensure_available", no_download)
    with pytest.raises(AnalyzerError) as e:
        create_analyzer("insightface", insightface_root=str(tmp_path))
    assert "buffalo_l" in e.value.detail and str(tmp_path) in e.value.detail
    assert ".onnx" in e.value.detail


def test_insightface_broken_pack_is_a_clear_analyzer_error(tmp_path, monkeypatch):
    fa = pytest.importorskip("insightface.app.face_analysis")

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("insightface tried to download a model pack")

    monkeypatch.setattr(fa, "ensure_available", no_download)
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    (pack / "det_10g.onnx").write_bytes(b"this is not an onnx model" * 40)
    with pytest.raises(AnalyzerError) as e:
        create_analyzer("insightface", insightface_root=str(tmp_path))
    assert e.value.status == 500
    assert str(pack) in e.value.detail and "could not be loaded" in e.value.detail


INSIGHTFACE_ROOT = os.environ.get("AVATAR_TEST_INSIGHTFACE_ROOT")


@pytest.mark.skipif(
    not INSIGHTFACE_ROOT,
    reason="no insightface model pack configured: set AVATAR_TEST_INSIGHTFACE_ROOT to a folder "
    "holding models/<pack>/*.onnx (e.g. buffalo_l); packs are not on PyPI and never downloaded",
)
def test_insightface_pack_finds_the_default_face(face_rgb, committed):
    analyzer = create_analyzer("insightface", insightface_root=INSIGHTFACE_ROOT)
    assert analyzer.name == "insightface"
    faces = analyzer.detect(face_rgb)
    assert len(faces) == 1
    # a different landmark model: same points within a few pixels on this 90 px face
    err = np.abs(faces[0].landmarks - committed)
    assert err.mean() < 4.0, err.mean()
    pts = analyzer.landmarks_in_box(face_rgb, faces[0].box)
    assert np.abs(pts - faces[0].landmarks).mean() < 1.0


def test_106_point_map_is_a_68_point_selection():
    pts = np.stack([np.arange(106.0), np.zeros(106)], axis=1)
    mapped = map_106_to_68(pts)
    idx = mapped[:, 0].astype(int)
    assert mapped.shape == (68, 2) and len(set(idx)) == 68
    assert idx[8] == 0  # the chin is the 106-point contour's centre
    with pytest.raises(ValueError):
        map_106_to_68(np.zeros((68, 2)))


# --------------------------------------------------------------------------- head pose


def test_frontal_face_pose_is_near_zero(committed):
    yaw, pitch, roll = head_pose(committed)
    assert abs(yaw) < 8 and abs(pitch) < 10 and abs(roll) < 6


@pytest.mark.parametrize("yaw", [-45, -30, -15, 15, 30, 45])
def test_yaw_estimate_follows_a_turned_head(committed, yaw):
    pts = project(lift_to_3d(committed), yaw=yaw)
    est, pitch, _ = head_pose(pts)
    assert est == pytest.approx(yaw, abs=8)
    assert abs(pitch) < 10
    mirrored = pts[MIRROR_68] * [-1, 1]
    assert head_pose(mirrored)[0] == pytest.approx(-est, abs=0.01)


@pytest.mark.parametrize("pitch", [-35, -20, 20, 35])
def test_pitch_estimate_follows_a_nodding_head(committed, pitch):
    _, est, _ = head_pose(project(lift_to_3d(committed), pitch=pitch))
    assert est == pytest.approx(pitch, abs=12)
    assert np.sign(est) == np.sign(pitch)


def test_profile_is_far_past_the_threshold(committed):
    yaw, _, _ = head_pose(project(lift_to_3d(committed), yaw=70))
    assert yaw > 40


@pytest.mark.parametrize("roll", [-40, -10, 25])
def test_roll_is_the_eye_line_angle(committed, roll):
    centre = committed.mean(axis=0)
    a = math.radians(roll)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = (committed - centre) @ rot.T + centre
    yaw0, pitch0, roll0 = head_pose(committed)
    yaw, pitch, est = head_pose(pts)
    assert est - roll0 == pytest.approx(roll, abs=0.5)
    assert yaw == pytest.approx(yaw0, abs=0.5) and pitch == pytest.approx(pitch0, abs=0.5)


def test_turned_face_is_refused_with_the_angle(face_rgb, committed):
    # a turned head's face box narrows; 1.6x the default face keeps it over the size limit
    big = (committed - committed.mean(0)) * 1.6 + 256.0
    turned = project(lift_to_3d(big), yaw=50).astype(np.float32)
    face = DetectedFace(box=(150.0, 60.0, 300.0, 210.0), score=1.0, landmarks=turned)
    with pytest.raises(RegistrationRefused) as e:
        check_quality(face_rgb, [face], backend="test")
    assert e.value.code == "face_turned" and e.value.status == 422
    assert "turned" in e.value.detail and "35°" in e.value.detail
    slight = project(lift_to_3d(big), yaw=20).astype(np.float32)
    report = check_quality(face_rgb, [DetectedFace(face.box, 1.0, slight)], backend="test")
    assert report["checks"]["face_turned"] == "pass"
    assert 12 < report["yaw_deg"] < 28


# --------------------------------------------------------------------------- measures


def test_quality_report_of_the_default_face(dlib_analyzer, face_rgb):
    report = check_quality(face_rgb, dlib_analyzer.detect(face_rgb), backend="dlib")
    assert report["backend"] == "dlib" and report["faces"] == 1
    assert set(report["checks"].values()) == {"pass"}
    assert report["face_size_px"] >= 100  # the landmark face box, forehead to chin
    assert 120 < report["brightness"] < 220
    assert report["sharpness"] > 0.8
    json.dumps(report)  # JSON-ready


def test_face_box_from_landmarks_takes_in_the_forehead(committed):
    x0, y0, x1, y1 = face_box_from_landmarks(committed)
    assert x0 < committed[:, 0].min() and x1 > committed[:, 0].max()
    assert committed[:, 1].min() - y0 > 0.25 * np.ptp(committed[:, 1])  # forehead
    assert 0 < y1 - committed[:, 1].max() < 0.1 * np.ptp(committed[:, 1])


def test_sharpness_falls_with_blur_and_ignores_exposure(face_rgb, committed):
    box = face_box_from_landmarks(committed)
    sharp = sharpness(face_rgb, box)
    values = [sharpness(cv2.GaussianBlur(face_rgb, (0, 0), s), box) for s in (1, 2, 4)]
    assert sharp > values[0] > values[1] > values[2]
    assert values[2] < 0.3 < 0.8 < sharp
    dim = (face_rgb * 0.4).astype(np.uint8)
    assert sharpness(dim, box) == pytest.approx(sharp, rel=0.1)


def test_brightness_is_the_face_luma(face_rgb, committed):
    base = brightness(face_rgb, committed)
    assert brightness((face_rgb * 0.5).astype(np.uint8), committed) == pytest.approx(
        base * 0.5, abs=1.5
    )
    grey = np.full_like(face_rgb, 77)
    assert brightness(grey, committed) == pytest.approx(77, abs=0.5)


def test_assess_quality_reports_every_failure_in_order(face_rgb, committed):
    dark_blurred = cv2.GaussianBlur((face_rgb * 0.15).astype(np.uint8), (0, 0), 4)
    face = DetectedFace((179.0, 83.0, 267.0, 171.0), 1.0, committed.astype(np.float32))
    report, failures = assess_quality(dark_blurred, [face], backend="test", min_face_px=200)
    codes = [c for c, _ in failures]
    assert codes == ["face_too_small", "too_dark", "too_blurry"]
    assert report["checks"]["face_too_small"] == "fail"
    assert report["checks"]["face_turned"] == "pass"
    assert report["thresholds"]["min_face_px"] == 200


def test_no_face_detail_mentions_a_blank_image():
    with pytest.raises(RegistrationRefused) as e:
        check_quality(np.zeros((100, 100, 3), np.uint8), [], backend="test")
    assert e.value.code == "no_face" and "blank" in e.value.detail
