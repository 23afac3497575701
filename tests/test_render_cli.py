"""``python -m pipeline.render``: a real subprocess renders a short clip at a low resolution;
bad input exits with status 2 and one line saying why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path):
    out = {k: v for k, v in os.environ.items() if not k.startswith("AVATAR_")}
    out.update(
        {
            "AVATAR_AVATARS__DATA_DIR": str(tmp_path / "data"),
            "AVATAR_MEDIA__VIDEO_WIDTH": "128",
            "AVATAR_MEDIA__VIDEO_HEIGHT": "128",
            "AVATAR_LIPSYNC__ENGINE": "viseme",
        }
    )
    return out


def cli(env, *args, timeout=120):
    """The finished process; stdout and stderr decoded without newline translation (the
    progress bar redraws with carriage returns)."""
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.render", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        run.args, run.returncode, run.stdout.decode(), run.stderr.decode()
    )


def test_text_to_mp4_with_a_progress_bar_and_a_timeline(env, tmp_path):
    out, timeline = tmp_path / "out.mp4", tmp_path / "out.json"
    run = cli(env, "--avatar", "default", "--text", "Hello from the command line.",
              "-o", out, "--timeline", timeline, "--fps", 20)
    assert run.returncode == 0, run.stderr
    assert "\r" in run.stderr and "rendering" in run.stderr and "100%" in run.stderr
    assert "[" + "#" * 30 + "]" in run.stderr  # the bar reaches the end
    assert run.stderr.isascii() and run.stderr.count("\n") == 1  # one line, redrawn
    manifest = json.loads(run.stdout)
    assert manifest["output"] == str(out) and manifest["fps"] == 20
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"
        assert (c.streams.video[0].width, c.streams.video[0].height) == (128, 128)
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == manifest["frames"] > 10
    data = json.loads(timeline.read_text())
    assert data["fps"] == 20 and any(c["viseme"] != "REST" for c in data["mouth_cues"])
    # only the requested files are left next to the output
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "data")
    assert left == ["out.json", "out.mp4"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--avatar", "av_0123456789ab", "--text", "Hi."], "no avatar"),
        (["--avatar", "../etc", "--text", "Hi."], "no avatar"),
        (["--text", "Hi.", "--speed", "3"], "--speed"),
        (["--text", "Hi.", "--fps", "500"], "--fps"),
        (["--audio", "missing.wav"], "no such audio file"),
        (["--text", "   "], "empty"),
    ],
)
def test_bad_input_exits_2_with_one_line(env, tmp_path, args, words):
    run = cli(env, *args, "-o", tmp_path / "out.mp4", timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], run.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_wrong_suffix_and_not_audio_exit_2(env, tmp_path):
    run = cli(env, "--text", "Hi.", "-o", tmp_path / "out.gif", timeout=60)
    assert run.returncode == 2 and ".mp4 or .webm" in run.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio at all\n" * 100)
    run = cli(env, "--audio", notes, "-o", tmp_path / "out.webm", "--quiet")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: the file given as audio")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
