"""``python -m avatars``: register / list / delete in a subprocess over a temporary data dir
(face analysis replaced by the fake through ``main(prepare=...)``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.fakes.prepare import encode_image, encode_video, moving_frames, portrait_rgb

ROOT = Path(__file__).resolve().parent.parent
WITH_FAKE = (
    "import sys\n"
    "from avatars.__main__ import main\n"
    "from tests.fakes.prepare import FakeAnalyzer, FakePrepare\n"
    "sys.exit(main(sys.argv[1:], prepare=FakePrepare(), analyzer_factory=FakeAnalyzer))\n"
)


def run(*args: str, fake: bool = True, env: dict[str, str] | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AVATAR_")}
    clean.update(env or {})
    cmd = [sys.executable, "-c", WITH_FAKE] if fake else [sys.executable, "-m", "avatars"]
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120
    )


def test_register_list_delete(tmp_path):
    data_dir = tmp_path / "data"
    image = tmp_path / "portrait.png"
    image.write_bytes(encode_image(portrait_rgb((320, 240)), ".png"))
    video = tmp_path / "idle.mp4"
    video.write_bytes(encode_video(moving_frames(40, (160, 120)), 25))
    dd = ["--data-dir", str(data_dir)]

    res = run("register", str(image), "--name", "Alice", *dd)
    assert res.returncode == 0, res.stderr
    alice = json.loads(res.stdout)
    assert alice["id"].startswith("av_") and alice["created"] is True
    assert (alice["name"], alice["frames"], alice["width"], alice["height"]) == (
        "Alice", 1, 320, 240,
    )
    assert (data_dir / "avatars" / alice["id"] / "avatar.json").is_file()

    res = run("register", str(video), "--name", "Bob", *dd)
    assert res.returncode == 0, res.stderr
    bob = json.loads(res.stdout)
    assert (bob["frames"], bob["fps"]) == (40, 25.0)
    assert "analysing [" in res.stderr and "100%" in res.stderr  # the progress bar
    assert "storing" in res.stderr

    res = run("register", str(image), "--name", "Someone else", *dd)
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)
    assert again["id"] == alice["id"] and again["created"] is False
    assert "already registered" in res.stderr

    # list needs no face analysis: the real entry point
    res = run("list", *dd, fake=False)
    assert res.returncode == 0, res.stderr
    assert [a["id"] for a in json.loads(res.stdout)] == [alice["id"], bob["id"]]

    res = run("delete", alice["id"], *dd, fake=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"id": alice["id"], "deleted": True}
    assert not (data_dir / "avatars" / alice["id"]).exists()
    res = run("list", *dd, fake=False)
    assert [a["id"] for a in json.loads(res.stdout)] == [bob["id"]]

    for bad in (alice["id"], "../etc", "default"):
        res = run("delete", bad, *dd, fake=False)
        assert res.returncode == 1
        assert "refused" in res.stderr
    assert "builtin_avatar" in res.stderr


def test_refusals_exit_1_with_the_reason(tmp_path):
    data_dir = tmp_path / "data"
    dd = ["--data-dir", str(data_dir)]
    text = tmp_path / "portrait.jpg"
    text.write_text("this is not a picture\n")
    flat = tmp_path / "flat.png"
    flat.write_bytes(encode_image(np.full((200, 200, 3), 90, np.uint8), ".png"))
    big = tmp_path / "big.png"
    big.write_bytes(encode_image(portrait_rgb((200, 200)), ".png"))
    long_video = tmp_path / "long.webm"
    long_video.write_bytes(
        encode_video(moving_frames(60, (64, 48)), 25, container="webm", codec="libvpx")
    )
    cases = [
        ((str(text), "--name", "x"), {}, "unsupported_media", "text"),
        ((str(flat), "--name", "x"), {}, "no_face", "no face"),
        ((str(long_video), "--name", "x"), {"AVATAR_AVATARS__MAX_VIDEO_S": "1"},
         "video_too_long", "2.4 s"),
        ((str(big), "--name", "x"), {"AVATAR_AVATARS__MAX_UPLOAD_BYTES": "1024"},
         "too_large", "1024"),
        ((str(flat), "--name", "   "), {}, "bad_request", "name"),
        ((str(tmp_path / "missing.png"), "--name", "x"), {}, None, "cannot read"),
    ]
    for args, env, code, needle in cases:
        res = run("register", *args, *dd, env=env)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stdout == ""
        if code is not None:
            assert f"refused ({code})" in res.stderr
        assert needle in res.stderr
    res = run("list", *dd, fake=False)
    assert json.loads(res.stdout) == []
    assert not (data_dir / "avatars").exists() or not list((data_dir / "avatars").iterdir())


def test_bad_config_exits_2_and_help_works(tmp_path):
    res = run("list", fake=False, env={"AVATAR_AVATARS__ANALYZER": "nope"})
    assert res.returncode == 2 and "avatars.analyzer" in res.stderr
    res = run("--help", fake=False)
    assert res.returncode == 0 and "register" in res.stdout
    res = run("register", "x.png", fake=False)  # --name is required
    assert res.returncode == 2 and "--name" in res.stderr


def test_real_analysis_from_the_command_line(tmp_path):
    dd = ["--data-dir", str(tmp_path / "data")]
    portrait = ROOT / "avatars" / "default" / "astronaut.png"
    res = run("register", str(portrait), "--name", "Astronaut", *dd, fake=False)
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["created"] is True and body["quality"]["backend"] == "dlib"
    assert "analysing [" in res.stderr
    flat = tmp_path / "flat.png"
    flat.write_bytes(encode_image(np.full((200, 200, 3), 120, np.uint8), ".png"))
    res = run("register", str(flat), "--name", "Nobody", *dd, fake=False)
    assert res.returncode == 1 and "refused (no_face)" in res.stderr
    res = run("list", *dd, fake=False)
    assert [a["id"] for a in json.loads(res.stdout)] == [body["id"]]
