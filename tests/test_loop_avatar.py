"""Registered video avatars: a seamless (cycle) loop whose frames carry their own landmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from avatars.model import DEFAULT_AVATAR_DIR, AvatarError, load_avatar_dir
from face import FacePose, FaceRenderer

N = 6
SHIFT = 12  # px per frame, to the right


def shifted(img: np.ndarray, dx: int) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, 0]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def loop_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loopav")
    meta = json.loads((DEFAULT_AVATAR_DIR / "avatar.json").read_text())
    base = cv2.cvtColor(cv2.imread(str(DEFAULT_AVATAR_DIR / meta["image"])), cv2.COLOR_BGR2RGB)
    lm0 = np.array(meta["landmarks"], np.float32)
    frames = [shifted(base, SHIFT * i) for i in range(N)]
    lms = np.stack([lm0 + np.float32([SHIFT * i, 0]) for i in range(N)])
    with av.open(str(d / "loop.mkv"), "w") as out:
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "bgr0"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode(None))
    shutil.copy(DEFAULT_AVATAR_DIR / meta["image"], d / "frame0.png")
    np.savez_compressed(d / "face_data.npz", landmarks=lms,
                        boxes=np.zeros((N, 4), np.float32))
    (d / "avatar.json").write_text(json.dumps({
        "id": "av_0123456789ab", "name": "loop", "image": "frame0.png",
        "landmarks": lm0.tolist(), "loop_video": "loop.mkv", "loop_mode": "cycle"}))
    return d


def test_cycle_loop_plays_frames_in_order_and_wraps(loop_dir):
    avatar = load_avatar_dir(loop_dir, width=512, height=512)
    assert avatar.loop_mode == "cycle" and len(avatar.loop_frames) == N
    r = FaceRenderer(avatar)
    frame_ns = 40_000_000
    assert [r.loop_index(k * frame_ns) for k in range(N + 2)] == [0, 1, 2, 3, 4, 5, 0, 1]


def test_mouth_follows_each_loop_frames_own_landmarks(loop_dir):
    avatar = load_avatar_dir(loop_dir, width=512, height=512)
    r = FaceRenderer(avatar)
    k = 4
    t = k * 40_000_000
    still = r.render(FacePose.neutral(t))
    talking = r.render(FacePose.neutral(t, mouth_open=1.0))
    changed = np.abs(talking.astype(int) - still.astype(int)).sum(axis=2) > 30
    ys, xs = np.nonzero(changed)
    assert xs.size > 200, "the mouth did not open"
    mouth = avatar.loop_landmarks[k][48:68]
    # the opened region is centred on frame k's mouth, not on frame 0's (48 px to the left)
    assert abs(xs.mean() - mouth[:, 0].mean()) < 8
    assert abs(xs.mean() - avatar.landmarks[48:68, 0].mean() - SHIFT * k) < 8


def test_face_data_must_match_the_loop(loop_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(loop_dir, bad)
    np.savez_compressed(bad / "face_data.npz", landmarks=np.zeros((N - 1, 68, 2), np.float32))
    with pytest.raises(AvatarError, match="loop frames"):
        load_avatar_dir(bad, width=512, height=512)


def test_the_expression_layer_moves_a_loop_frame_and_only_its_share(loop_dir):
    """A video loop has its own head motion (the idle sway is not applied to it); the
    expression layer's nods move the loop's frame by their share alone (issue 23)."""
    from dataclasses import replace

    avatar = load_avatar_dir(loop_dir, width=512, height=512)
    r = FaceRenderer(avatar)
    t = 2 * 40_000_000
    base = FacePose.neutral(t)
    swayed = replace(base, head_dx=3.0, head_dy=2.0)  # idle sway: a loop ignores it
    assert np.array_equal(r.render(swayed), r.render(base))
    nodded = r.render(replace(base, head_dy=2.0, expr_dy=2.0))
    still = r.render(base)
    # the nodded frame is the still one moved 2 px down
    down = cv2.warpAffine(still, np.float32([[1, 0, 0], [0, 1, 2]]), (512, 512),
                          borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(nodded.astype(int) - down.astype(int)).mean() < 0.5
    assert np.abs(nodded.astype(int) - still.astype(int)).mean() > 2.0
