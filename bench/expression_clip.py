"""The side-by-side clip of the expression layer in docs/: idle, listening, thinking, speaking.

    .venv/bin/python -m bench.expression_clip [-o docs/expression.webm]

The speaking panel is a clip of the render API (``python -m pipeline.render``: the Piper
voice, the viseme engine, the head following the voice's stress), decoded. The other three
cannot come from the render API (it renders speech only): they are drawn by the renderer a
call uses, on an expressive timeline driven by scripted cues on one media clock:

* idle: no cue (the idle face: blinks, glances, breathing, sway);
* listening: the person speaks from 0 s, pausing every 1.3 s (nods; glances and blinks
  rarer);
* thinking: a turn starts at 0.5 s (the look up and aside), and ends at 4.5 s.

Each panel is the head (cropped), 256x256, with its name; 6 s at 25 fps; VP9 in WebM (no
audio), under 2 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import cv2
import numpy as np

from bench.common import ROOT

MS = 1_000_000
S = 1_000_000_000
FPS = 25
SECONDS = 6
PANEL = 256
SAY = "Hello! I was listening. Here is what I think about your question."


def speaking_frames(work: Path) -> list[np.ndarray]:
    out = work / "speaking.mp4"
    subprocess.run([sys.executable, "-m", "pipeline.render", "--text", SAY, "-o", str(out)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    frames = []
    with av.open(str(out)) as f:
        for frame in f.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def scripted_frames(kind: str) -> list[np.ndarray]:
    import asyncio

    from avatars import DEFAULT_AVATAR_DIR, load_avatar_dir
    from face import FaceRenderer, IdleTimeline
    from media_tracks.clock import ManualClock
    from media_tracks.compositor import Compositor
    from media_tracks.expressive import CallExpression

    renderer = FaceRenderer(load_avatar_dir(DEFAULT_AVATAR_DIR, width=512, height=512))
    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=48000, schedule_lead_ms=120,
                      crossfade_frames=3)
    ce = CallExpression(comp, strength=1.0, lead_ns=0)
    seed = 4242  # a seed whose idle minute shows a glance and a blink early on
    timeline = IdleTimeline(seed=seed) if kind == "idle" else ce.timeline(IdleTimeline(seed=seed))

    async def cues() -> None:
        async def to(t: int) -> None:
            await clock.advance(t - clock.now_ns())

        if kind == "listening":
            ce.cue("user_start")
            for k in range(1, 5):
                await to(k * 1300 * MS)
                ce.cue("user_pause")
        elif kind == "thinking":
            await to(500 * MS)
            ce.state("thinking")
            await to(4500 * MS)
            ce.state("listening")

    asyncio.run(cues())
    frames = []
    for j in range(SECONDS * FPS):
        yuv = renderer.render_i420(timeline.pose_at(j * S // FPS))
        frames.append(cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420))
    return frames


# the head and shoulders of the default avatar (x0, y0, x1, y1 at 512x512): the eyes and the
# nods must be visible in a small panel
CROP = (120, 10, 340, 230)


def label(frame: np.ndarray, text: str) -> np.ndarray:
    x0, y0, x1, y1 = CROP
    small = cv2.resize(frame[y0:y1, x0:x1], (PANEL, PANEL), interpolation=cv2.INTER_AREA)
    cv2.putText(small, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(small, text, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1,
                cv2.LINE_AA)
    return small


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-o", "--output", default=str(ROOT / "docs" / "expression.webm"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        panels = {k: scripted_frames(k) for k in ("idle", "listening", "thinking")}
        panels["speaking"] = speaking_frames(Path(tmp))
    n = SECONDS * FPS
    with av.open(args.output, "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=FPS)
        stream.width, stream.height = 4 * PANEL, PANEL
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "40", "b": "0", "row-mt": "1", "deadline": "good"}
        for j in range(n):
            row = [label(frames[min(j, len(frames) - 1)], name)
                   for name, frames in panels.items()]
            frame = av.VideoFrame.from_ndarray(np.hstack(row), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    size = Path(args.output).stat().st_size
    print(f"{args.output}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
