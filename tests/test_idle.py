"""The default avatar, its loader, the idle timeline and the face renderer."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from avatars import DEFAULT_AVATAR_DIR, Avatar, AvatarError, load_avatar_dir
from face import FacePose, FaceRenderer, IdleTimeline

NS = 1_000_000_000
MS = 1_000_000


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return load_avatar_dir(DEFAULT_AVATAR_DIR, width=512, height=512)


@pytest.fixture(scope="module")
def renderer(avatar: Avatar) -> FaceRenderer:
    return FaceRenderer(avatar)


def pose(**kw: Any) -> FacePose:
    return replace(FacePose.neutral(), **kw)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def poly_mask(shape: tuple[int, ...], pts: np.ndarray, erode: int = 0) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    if erode:
        kernel = np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)
        return np.asarray(cv2.erode(mask, kernel)).astype(bool)
    return mask.astype(bool)


def eye_pts(av: Avatar, which: int) -> np.ndarray:
    return av.landmarks[36:42] if which == 0 else av.landmarks[42:48]


def eye_region(av: Avatar, which: int) -> tuple[int, int, int, int]:
    """Generous box around one eye, from the brow to well under the lower lid."""
    pts = eye_pts(av, which)
    brow = av.landmarks[17:22] if which == 0 else av.landmarks[22:27]
    w = float(pts[:, 0].max() - pts[:, 0].min())
    x0 = int(pts[:, 0].min() - 0.5 * w)
    x1 = int(pts[:, 0].max() + 0.5 * w) + 1
    y0 = int(brow[:, 1].min() - 0.2 * w)
    y1 = int(pts[:, 1].max() + 0.5 * w) + 1
    return x0, y0, x1, y1


def skin_above_eye(img: np.ndarray, av: Avatar, which: int) -> np.ndarray:
    """Mean colour of the skin between the upper lid and the brow."""
    pts = eye_pts(av, which)
    w = float(pts[:, 0].max() - pts[:, 0].min())
    top = float(pts[1:3, 1].min())
    xs = slice(int(pts[1, 0]), int(pts[2, 0]) + 1)
    ys = slice(int(top - 0.4 * w), int(top - 0.2 * w) + 1)
    return img[ys, xs].reshape(-1, 3).astype(np.float64).mean(axis=0)


def dark_centroid_x(img: np.ndarray, mask: np.ndarray) -> float:
    lum = luma(img)
    wgt = np.where(mask, np.maximum(120.0 - lum, 0.0), 0.0) ** 2
    xs = np.arange(img.shape[1])[None, :]
    return float((wgt * xs).sum() / wgt.sum())


# ---------------------------------------------------------------------------------------------
# assets and loader


def test_default_avatar_assets(avatar: Avatar) -> None:
    meta = json.loads((DEFAULT_AVATAR_DIR / "avatar.json").read_text())
    assert meta["id"] == "default" and meta["name"] == "Eileen Collins (NASA)"
    assert meta["image"] == "astronaut.png"
    assert len(meta["landmarks"]) == 68
    assert "public domain" in meta["license"].lower()
    assert (DEFAULT_AVATAR_DIR / "SOURCE.md").is_file()
    assert avatar.avatar_id == "default"
    assert avatar.image.shape == (512, 512, 3) and avatar.image.dtype == np.uint8
    assert avatar.landmarks.shape == (68, 2) and avatar.landmarks.dtype == np.float32
    # 512x512 is the image's own size: untouched pixels and landmarks
    bgr = cv2.imread(str(DEFAULT_AVATAR_DIR / "astronaut.png"))
    assert bgr is not None
    raw = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(avatar.image, raw)
    np.testing.assert_allclose(avatar.landmarks, np.array(meta["landmarks"]), atol=1e-4)
    # the landmarks sit on the face: eyes above the nose above the mouth above the chin,
    # the iris inside the eye polygon is dark
    lm = avatar.landmarks
    assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]
    eye = poly_mask(avatar.image.shape, lm[36:42], erode=1)
    assert luma(avatar.image)[eye].min() < 60


def test_default_avatar_image_is_skimage_astronaut(avatar: Avatar) -> None:
    skdata = pytest.importorskip("skimage.data")
    np.testing.assert_array_equal(avatar.image, skdata.astronaut())


@pytest.mark.parametrize("size", [(1280, 720), (640, 480), (720, 1280), (256, 256)])
def test_fit_to_output_size_keeps_face_and_landmarks(avatar: Avatar, size: tuple[int, int]) -> None:
    w, h = size
    fitted = load_avatar_dir(DEFAULT_AVATAR_DIR, width=w, height=h)
    assert fitted.image.shape == (h, w, 3)
    lm = fitted.landmarks
    # the whole face (with a margin) is inside the frame
    assert lm[:, 0].min() > 0 and lm[:, 0].max() < w - 1
    assert lm[:, 1].min() > 0.05 * h and lm[:, 1].max() < h - 1
    # landmarks were transformed with the image: the colours under them match the source
    src_vals = cv2.remap(
        avatar.image.astype(np.float32),
        avatar.landmarks[:, 0].reshape(1, -1),
        avatar.landmarks[:, 1].reshape(1, -1),
        cv2.INTER_LINEAR,
    )
    fit_vals = cv2.remap(
        fitted.image.astype(np.float32),
        lm[:, 0].reshape(1, -1),
        lm[:, 1].reshape(1, -1),
        cv2.INTER_LINEAR,
    )
    assert float(np.abs(src_vals - fit_vals).mean()) < 12.0
    # scale is uniform: the eye distance scales like the image
    scale = max(w / 512, h / 512)
    d_src = np.linalg.norm(avatar.landmarks[45] - avatar.landmarks[36])
    d_fit = np.linalg.norm(lm[45] - lm[36])
    assert d_fit == pytest.approx(d_src * scale, rel=0.01)


def _copy_default(tmp_path: Path) -> Path:
    d = tmp_path / "av"
    shutil.copytree(DEFAULT_AVATAR_DIR, d)
    return d


def test_load_errors(tmp_path: Path) -> None:
    assert issubclass(AvatarError, ValueError)
    with pytest.raises(AvatarError, match="does not exist"):
        load_avatar_dir(tmp_path / "nope", width=512, height=512)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AvatarError, match="avatar.json"):
        load_avatar_dir(empty, width=512, height=512)

    d = _copy_default(tmp_path)
    meta = json.loads((d / "avatar.json").read_text())

    (d / "avatar.json").write_text("{not json")
    with pytest.raises(AvatarError, match="bad avatar json"):
        load_avatar_dir(d, width=512, height=512)

    (d / "avatar.json").write_text(json.dumps([1, 2]))
    with pytest.raises(AvatarError, match="object"):
        load_avatar_dir(d, width=512, height=512)

    (d / "avatar.json").write_text(json.dumps({**meta, "landmarks": meta["landmarks"][:67]}))
    with pytest.raises(AvatarError, match="expected 68 landmarks, got 67"):
        load_avatar_dir(d, width=512, height=512)

    bad_pts = [list(p) for p in meta["landmarks"]]
    bad_pts[3] = [1.0, "x"]
    (d / "avatar.json").write_text(json.dumps({**meta, "landmarks": bad_pts}))
    with pytest.raises(AvatarError, match="landmarks"):
        load_avatar_dir(d, width=512, height=512)

    far = [[x + 1000.0, y] for x, y in meta["landmarks"]]
    (d / "avatar.json").write_text(json.dumps({**meta, "landmarks": far}))
    with pytest.raises(AvatarError, match="outside"):
        load_avatar_dir(d, width=512, height=512)

    (d / "avatar.json").write_text(json.dumps({**meta, "image": "missing.png"}))
    with pytest.raises(AvatarError, match="missing image"):
        load_avatar_dir(d, width=512, height=512)

    (d / "broken.png").write_bytes(b"not a png")
    (d / "avatar.json").write_text(json.dumps({**meta, "image": "broken.png"}))
    with pytest.raises(AvatarError, match="cannot decode image"):
        load_avatar_dir(d, width=512, height=512)

    (d / "avatar.json").write_text(json.dumps({**meta, "loop_video": "missing.mp4"}))
    with pytest.raises(AvatarError, match="missing loop video"):
        load_avatar_dir(d, width=512, height=512)

    (d / "avatar.json").write_text(json.dumps(meta))
    with pytest.raises(AvatarError, match="size"):
        load_avatar_dir(d, width=0, height=512)
    assert load_avatar_dir(d, width=512, height=512).avatar_id == "default"


# ---------------------------------------------------------------------------------------------
# timeline


@pytest.mark.parametrize("seed", range(8))
def test_blinks_every_3_to_6_s(seed: int) -> None:
    tl = IdleTimeline(seed=seed)
    starts = tl.blink_starts_ns(120 * NS)
    assert 120 / 6 - 1 <= len(starts) <= 120 / 3 + 1
    assert 3 * NS <= starts[0] <= 6 * NS
    gaps = np.diff(starts) / NS
    assert gaps.min() >= 3.0 and gaps.max() <= 6.0
    assert gaps.std() > 0.2  # randomised, not a metronome
    # the sampled pose agrees with the schedule: eyes open between blinks
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        mid = (a + b) // 2
        assert tl.pose_at(mid).blink == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_blink_shape_and_duration(seed: int) -> None:
    tl = IdleTimeline(seed=seed)
    for start in tl.blink_starts_ns(60 * NS):
        ts = np.arange(start - 50 * MS, start + 300 * MS, MS)
        b = np.array([tl.pose_at(int(t)).blink for t in ts])
        closed = ts[b > 0]
        dur_ms = (closed[-1] - closed[0]) / MS + 1
        assert 80 <= dur_ms <= 200
        assert tl.blink_duration_ns(start) == pytest.approx(dur_ms * MS, abs=2 * MS)
        assert b.max() == 1.0  # fully closed at the peak
        peak = int(np.argmax(b))
        # closes faster than it opens, and moves smoothly (no jumps > 0.1 per ms)
        assert ts[peak] - start < (closed[-1] - ts[peak])
        assert np.abs(np.diff(b)).max() < 0.1
        assert b[0] == 0.0 and b[-1] == 0.0


def test_blink_schedule_depends_on_seed() -> None:
    a = IdleTimeline(seed=1).blink_starts_ns(60 * NS)
    b = IdleTimeline(seed=2).blink_starts_ns(60 * NS)
    assert a != b
    assert IdleTimeline(seed=1).blink_starts_ns(60 * NS) == a


def test_pose_is_deterministic_pure_and_thread_safe() -> None:
    times = [int(t) for t in np.linspace(0, 300 * NS, 4001)]
    tl = IdleTimeline(seed=7)
    forward = [tl.pose_at(t) for t in times]
    backward = [tl.pose_at(t) for t in reversed(times)][::-1]
    assert forward == backward
    assert [IdleTimeline(seed=7).pose_at(t) for t in times[::50]] == forward[::50]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(tl.pose_at, times)) == forward
    assert IdleTimeline(seed=8).pose_at(times[1234]) != forward[1234]
    assert all(p.t_ns == t for p, t in zip(forward, times, strict=True))
    assert all(p.mouth_open == 0.0 for p in forward)


def test_idle_motion_is_subtle_and_smooth() -> None:
    tl = IdleTimeline(seed=3)
    ts = np.arange(0, 120 * NS, 40 * MS)  # 25 fps
    poses = [tl.pose_at(int(t)) for t in ts]
    dx = np.array([p.head_dx for p in poses])
    dy = np.array([p.head_dy for p in poses])
    roll = np.array([p.head_roll_deg for p in poses])
    scale = np.array([p.head_scale for p in poses])
    assert 0.8 < np.abs(dx).max() <= 2.0 and np.abs(dy).max() <= 2.0
    assert 0.2 < np.abs(roll).max() <= 0.6
    assert np.abs(scale - 1.0).max() <= 0.0031 and (scale - 1.0).std() > 0.001
    for sig in (dx, dy, roll, scale * 100):
        assert np.abs(np.diff(sig)).max() < 0.1  # low-frequency: tiny change per frame
    # breathing is 0.2-0.3 Hz: count the zero crossings of the scale signal
    crossings = np.count_nonzero(np.diff(np.sign(scale - 1.0)) != 0)
    assert 2 * 0.19 * 120 <= crossings <= 2 * 0.31 * 120


def test_glances() -> None:
    tl = IdleTimeline(seed=5)
    glances = tl.saccades(120 * NS)
    assert len(glances) >= 120 / 6  # now and then: every few seconds
    starts = [g[0] for g in glances]
    assert np.diff(starts).max() < 12 * NS
    for start, end, gx, gy in glances:
        assert 0.5 * NS <= end - start <= 2.2 * NS
        assert 0.4 <= abs(gx) <= 1.0 and abs(gy) <= 0.5
        # fast move (<= 50 ms), hold, return
        p = tl.pose_at(start + 50 * MS)
        assert (p.gaze_x, p.gaze_y) == pytest.approx((gx, gy))
        mid = tl.pose_at((start + end) // 2)
        assert (mid.gaze_x, mid.gaze_y) == pytest.approx((gx, gy))
        assert tl.pose_at(end).gaze_x == 0.0
        assert tl.pose_at(start - 1).gaze_x == 0.0
    assert {np.sign(g[2]) for g in glances} == {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------
# renderer


def test_neutral_pose_returns_the_source(avatar: Avatar, renderer: FaceRenderer) -> None:
    out = renderer.render(FacePose.neutral())
    np.testing.assert_array_equal(out, avatar.image)
    assert out.flags.writeable and not np.shares_memory(out, avatar.image)
    out[:] = 0  # the caller owns the frame
    np.testing.assert_array_equal(renderer.render(FacePose.neutral()), avatar.image)


def test_blink_closes_the_eyelids(avatar: Avatar, renderer: FaceRenderer) -> None:
    src = avatar.image
    closed = renderer.render(pose(blink=1.0))
    for which in (0, 1):
        aperture = poly_mask(src.shape, eye_pts(avatar, which), erode=1)
        assert aperture.sum() > 30
        skin = skin_above_eye(src, avatar, which)
        open_px = src[aperture].astype(np.float64)
        closed_px = closed[aperture].astype(np.float64)
        # the dark iris/pupil is covered
        assert (luma(open_px) < 90).mean() > 0.25
        assert (luma(closed_px) < 90).mean() < 0.08
        # the opening now looks like the skin above the eye, not like a darkened frame
        assert luma(closed_px).mean() > luma(open_px).mean() + 25
        d_open = np.linalg.norm(open_px.mean(axis=0) - skin)
        d_closed = np.linalg.norm(closed_px.mean(axis=0) - skin)
        assert d_closed < 0.6 * d_open
        assert luma(closed_px).mean() > 0.75 * luma(skin[None])[0]
        # a darker lash line runs along the closed lid edge (bottom of the opening)
        lo = eye_pts(avatar, which)[[4, 5]]
        lash_y = int(round(float(lo[:, 1].mean())))
        xs = slice(int(lo[:, 0].min()), int(lo[:, 0].max()) + 1)
        lash = luma(closed[lash_y - 2 : lash_y + 2, xs]).min(axis=0).mean()
        assert lash < luma(closed_px).mean() - 40
    # the rest of the face is unchanged
    changed = np.abs(closed.astype(int) - src).max(axis=2) > 0
    for which in (0, 1):
        x0, y0, x1, y1 = eye_region(avatar, which)
        changed[y0:y1, x0:x1] = False
    assert not changed.any()


def test_mid_blink_lid_descends_from_the_top(avatar: Avatar, renderer: FaceRenderer) -> None:
    src = avatar.image
    half = renderer.render(pose(blink=0.5))
    for which in (0, 1):
        pts = eye_pts(avatar, which)
        aperture = poly_mask(src.shape, pts, erode=1)
        top_y = float(pts[1:3, 1].mean())
        bot_y = float(pts[4:6, 1].mean())
        rows = np.arange(src.shape[0])[:, None]
        upper = aperture & (rows < top_y + 0.3 * (bot_y - top_y))
        lower = aperture & (rows > top_y + 0.75 * (bot_y - top_y))
        assert upper.any() and lower.any()
        diff = np.abs(half.astype(int) - src).max(axis=2)
        assert diff[upper].mean() > 20  # the lid covers the top of the eye ...
        assert diff[lower].mean() < 0.25 * diff[upper].mean()  # ... not (yet) the bottom
    # and closing is monotonic: more blink, more skin over the opening
    skin_l = luma(skin_above_eye(src, avatar, 0)[None])[0]
    ap = poly_mask(src.shape, eye_pts(avatar, 0), erode=1)
    dist = [abs(luma(renderer.render(pose(blink=b))[ap]).mean() - skin_l) for b in (0, 0.5, 0.8, 1)]
    assert dist == sorted(dist, reverse=True)


@pytest.mark.parametrize("gaze", [-1.0, 1.0])
def test_saccade_moves_only_the_irises(avatar: Avatar, renderer: FaceRenderer, gaze: float) -> None:
    src = avatar.image
    out = renderer.render(pose(gaze_x=gaze))
    diff = np.abs(out.astype(int) - src).max(axis=2)
    for which in (0, 1):
        pts = eye_pts(avatar, which)
        aperture = poly_mask(src.shape, pts, erode=0)
        grown = cv2.dilate(aperture.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        # pixels move only inside the eye opening (plus the 1 px feather)
        x0, y0, x1, y1 = eye_region(avatar, which)
        region = np.zeros_like(aperture)
        region[y0:y1, x0:x1] = True
        assert not (diff[region & ~grown] > 0).any()
        assert diff[aperture].max() > 60
        # the dark iris moved a few pixels the right way
        shift = dark_centroid_x(out, aperture) - dark_centroid_x(src, aperture)
        assert 1.0 < shift * gaze < 5.0
    outside = np.ones_like(diff, dtype=bool)
    for which in (0, 1):
        x0, y0, x1, y1 = eye_region(avatar, which)
        outside[y0:y1, x0:x1] = False
    assert not (diff[outside] > 0).any()
    # vertical gaze moves the iris vertically
    up = renderer.render(pose(gaze_y=-1.0))
    assert np.abs(up.astype(int) - src).max() > 30


def test_mouth_open_drops_the_jaw(avatar: Avatar, renderer: FaceRenderer) -> None:
    src = avatar.image
    lm = avatar.landmarks
    np.testing.assert_array_equal(renderer.render(pose(mouth_open=0.0)), src)
    mouth = poly_mask(src.shape, lm[48:60])
    x0, y0 = lm[48:68].min(axis=0).astype(int)
    x1, y1 = lm[48:68].max(axis=0).astype(int) + 1
    dark_counts = []
    for m in (0.25, 0.5, 1.0):
        out = renderer.render(pose(mouth_open=m))
        diff = np.abs(out.astype(int) - src).max(axis=2)
        # the upper half of the face (down to the nose tip) is untouched
        assert not diff[: int(lm[30, 1])].any()
        # the mouth region changed, and a dark cavity opened
        dark = (luma(out) < 60) & ~(luma(src) < 60)
        dark_counts.append(int(dark[y0 : y1 + 20, x0:x1].sum()))
        if m == 1.0:
            assert diff[mouth].mean() > 40
            # lower lip and chin moved down: the shadow line under the chin is lower
            col = int(lm[8, 0])
            cy = int(lm[8, 1])
            prof_src = luma(src[cy - 10 : cy + 30, col - 2 : col + 3]).mean(axis=1)
            prof_out = luma(out[cy - 10 : cy + 30, col - 2 : col + 3]).mean(axis=1)
            chin_src = int(np.argmin(prof_src[:25]))
            chin_out = int(np.argmin(prof_out[:35]))
            mouth_w = float(lm[54, 0] - lm[48, 0])
            assert 0.15 * mouth_w < chin_out - chin_src < 0.4 * mouth_w
            # same person: far from the mouth nothing changed, and no holes or colour cast
            assert not diff[:, : int(lm[0:17, 0].min()) - 5].any()
            assert abs(float(luma(out).mean()) - float(luma(src).mean())) < 2
    assert dark_counts[0] > 20
    assert dark_counts == sorted(dark_counts) and dark_counts[2] > 2 * dark_counts[0]


def test_head_motion_warps_the_whole_frame_without_black_edges(
    avatar: Avatar, renderer: FaceRenderer
) -> None:
    src = avatar.image
    out = renderer.render(pose(head_dx=2.0, head_dy=-1.5, head_roll_deg=0.5, head_scale=1.003))
    assert np.abs(out.astype(int) - src).mean() > 3
    # no black borders: edge rows/columns keep the image's colours
    for edge_out, edge_src in (
        (out[0], src[0]),
        (out[-1], src[-1]),
        (out[:, 0], src[:, 0]),
        (out[:, -1], src[:, -1]),
    ):
        assert np.abs(edge_out.astype(int) - edge_src).mean() < 25
    # a pure 2 px shift moves the content by 2 px
    shifted = renderer.render(pose(head_dx=2.0))
    np.testing.assert_array_equal(shifted[:, 2:], src[:, :-2])


def test_all_features_compose(avatar: Avatar, renderer: FaceRenderer) -> None:
    """Blink + glance + mouth + head motion in one frame: every effect shows up."""
    p = pose(blink=1.0, gaze_x=0.7, mouth_open=0.8, head_dx=0.6, head_roll_deg=0.3)
    out = renderer.render(p)
    back = renderer.render(replace(p, head_dx=0.0, head_roll_deg=0.0))
    m = renderer.head_matrix(p)
    assert m is not None
    expect = cv2.warpAffine(back, m, (512, 512), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    # the edited regions are warped exactly like the rest of the frame (up to the 1/32 px
    # fixed-point rounding of cv2's warp)
    err = np.abs(out.astype(int) - expect)
    assert err.max() <= 12 and (err > 3).mean() < 1e-3
    ap = poly_mask(back.shape, eye_pts(avatar, 0), erode=1)
    assert (luma(back[ap]) < 90).mean() < 0.08


def test_render_is_thread_safe(renderer: FaceRenderer) -> None:
    tl = IdleTimeline(seed=11)
    ts = [int(t) for t in np.arange(0, 30 * NS, 120 * MS)]
    poses = [replace(tl.pose_at(t), mouth_open=float(i % 5) / 4) for i, t in enumerate(ts)]
    poses += [pose(blink=b, gaze_x=-b) for b in np.linspace(0, 1, 9)]
    serial = [renderer.render(p) for p in poses]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(renderer.render, poses * 2))
    for a, b in zip(serial * 2, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(p.blink == 1.0 for p in poses)


# ---------------------------------------------------------------------------------------------
# loop-video avatars


def _loop_avatar(avatar: Avatar, n: int, fps: float) -> Avatar:
    frames = tuple(np.full_like(avatar.image, 20 * i + 10) for i in range(n))
    return Avatar("loop", "Loop", avatar.image, avatar.landmarks, frames, fps)


def test_loop_frames_ping_pong(avatar: Avatar) -> None:
    r = FaceRenderer(_loop_avatar(avatar, 4, 10.0))
    got = [int(r.render(FacePose.neutral(i * 100 * MS + 1))[0, 0, 0]) for i in range(13)]
    expect = [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert got == [20 * i + 10 for i in expect]
    assert [r.loop_index(i * 100 * MS + 50 * MS) for i in range(7)] == [0, 1, 2, 3, 2, 1, 0]
    # idle motion is not applied to loop videos (the video moves by itself) ...
    moving = replace(FacePose.neutral(150 * MS), blink=1.0, head_dx=2.0, gaze_x=1.0)
    np.testing.assert_array_equal(r.render(moving), np.full_like(avatar.image, 30))
    # ... but the jaw is, using the image's landmarks
    talk = r.render(FacePose.neutral(150 * MS, mouth_open=1.0))
    lm = avatar.landmarks
    assert (talk[int(lm[8, 1]) - 30 : int(lm[8, 1]), int(lm[48, 0]) : int(lm[54, 0])] < 30).any()
    assert (talk[: int(lm[30, 1])] == 30).all()
    single = FaceRenderer(_loop_avatar(avatar, 1, 25.0))
    assert int(single.render(FacePose.neutral(10 * NS))[0, 0, 0]) == 10


def test_avatar_validates_loop_frames(avatar: Avatar) -> None:
    with pytest.raises(AvatarError):
        Avatar("x", "x", avatar.image, avatar.landmarks, (avatar.image[:10],), 25.0)
    with pytest.raises(AvatarError):
        Avatar("x", "x", avatar.image, avatar.landmarks, (avatar.image,), 0.0)
    with pytest.raises(AvatarError):
        Avatar("x", "x", avatar.image, avatar.landmarks[:60])


def test_loop_video_is_decoded_and_fitted(tmp_path: Path, avatar: Avatar) -> None:
    av = pytest.importorskip("av")
    d = _copy_default(tmp_path)
    levels = [30, 90, 150, 210, 120]
    with av.open(str(d / "idle.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        stream.options = {"qscale": "2"}
        for level in levels:
            img = np.full((256, 256, 3), level, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    meta = json.loads((d / "avatar.json").read_text())
    (d / "avatar.json").write_text(json.dumps({**meta, "loop_video": "idle.mp4"}))

    loop = load_avatar_dir(d, width=320, height=240)
    assert loop.loop_fps == pytest.approx(10.0)
    assert len(loop.loop_frames) == len(levels)
    assert all(f.shape == (240, 320, 3) for f in loop.loop_frames)
    assert [int(np.median(f)) for f in loop.loop_frames] == pytest.approx(levels, abs=6)
    r = FaceRenderer(loop)
    seq = [int(np.median(r.render(FacePose.neutral(i * 100 * MS + 1)))) for i in range(10)]
    idx = [0, 1, 2, 3, 4, 3, 2, 1, 0, 1]
    assert seq == pytest.approx([levels[i] for i in idx], abs=6)

    (d / "bad.mp4").write_bytes(b"\x00" * 100)
    (d / "avatar.json").write_text(json.dumps({**meta, "loop_video": "bad.mp4"}))
    with pytest.raises(AvatarError, match="loop video"):
        load_avatar_dir(d, width=320, height=240)


# --- the head pose held for two frames (face.timeline.HEAD_STEP_NS) ---------------------------

FRAME = 40_000_000  # 25 fps


def test_head_pose_steps_every_80_ms_while_eyes_move_every_frame():
    held = IdleTimeline(seed=3)
    free = IdleTimeline(seed=3, head_step_ns=0)
    heads = [(p.head_dx, p.head_dy, p.head_roll_deg, p.head_scale)
             for p in (held.pose_at(k * FRAME) for k in range(200))]
    for k in range(0, 200, 2):
        assert heads[k] == heads[k + 1]  # the same head for frames 2j and 2j+1
        fp = free.pose_at(k * FRAME)  # ...and it is the continuous pose at 2j
        assert heads[k] == (fp.head_dx, fp.head_dy, fp.head_roll_deg, fp.head_scale)
    assert len(set(heads)) == 100
    # blinks and glances are not held
    t = next(t for t in held.blink_starts_ns(60 * NS)) + 20_000_000
    assert held.pose_at(t).blink != held.pose_at(t + FRAME).blink
    assert [held.pose_at(k * FRAME).blink for k in range(1500)] == [
        free.pose_at(k * FRAME).blink for k in range(1500)]


def test_held_frames_match_the_continuous_renderer_within_tolerance(avatar):
    """Frames on the 80 ms grid are what the renderer drew before the head was held; the
    frames between differ by the head's motion over one frame (< 0.1 px): measured PSNR
    >= 48.8 dB (luma and chroma, 500 frames), bound here at 45 dB."""
    held_r, free_r = FaceRenderer(avatar), FaceRenderer(avatar)
    held, free = IdleTimeline(seed=1), IdleTimeline(seed=1, head_step_ns=0)
    for k in range(60):
        a = held_r.frame_i420(held, k * FRAME)
        b = free_r.frame_i420(free, k * FRAME)
        if k % 2 == 0:
            assert np.array_equal(a, b)
        else:
            mse = float(np.mean((a.astype(np.float64) - b) ** 2))
            assert mse > 0 and 10 * np.log10(255**2 / mse) >= 45.0
    # every second frame reused the whole-frame warp of the one before
    assert held_r.warp_hits >= 29 and held_r.warp_misses <= 31
    assert free_r.warp_hits == 0


def test_i420_drawn_directly_equals_converting_the_rgb_frame(avatar):
    """``frame_i420`` keeps the warped base in I420 and converts only the eyes and mouth:
    equal to the last bit to ``rgb_to_i420(render(pose))``, at rest, speaking, blinking,
    glancing, with and without head motion."""
    from face.timeline import MouthShape
    from face.yuv import rgb_to_i420

    r = FaceRenderer(avatar)
    tl = IdleTimeline(seed=5)
    blink = next(t for t in tl.blink_starts_ns(60 * NS)) + 30_000_000
    times = [k * FRAME for k in range(40)] + [blink, blink + FRAME]
    for i, t in enumerate(times):
        p = tl.pose_at(t)
        if i % 3:
            p = replace(p, mouth=MouthShape(open=0.2 + 0.02 * i, width=0.3, teeth=0.2))
        assert np.array_equal(r.render_i420(p), rgb_to_i420(r.render(p))), t
    still = replace(tl.pose_at(0), head_dx=0.0, head_dy=0.0, head_roll_deg=0.0, head_scale=1.0,
                    gaze_x=0.4, blink=0.5)
    assert r.head_matrix(still) is None
    assert np.array_equal(r.render_i420(still), rgb_to_i420(r.render(still)))
