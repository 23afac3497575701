"""What the expression layer (issue 23) costs a frame: the pose, and the frame drawn from it.

A scripted minute of a call on one media clock (``media_tracks.expressive``): the person
speaks with pauses (nods), the avatar thinks, then answers (the head following its stress),
again and again; after an hour's worth of cues, so a long call's cue lists are in the
numbers. For every frame of the minute: ``pose_at`` on the idle timeline and on the
expressive one, and ``render_i420`` of each pose (the default avatar, 512x512), each timed
alone, in turns. Also the warp a video-loop avatar's frame takes while the layer moves it.
Writes ``bench/results/expression.json``.

Run: ``.venv/bin/python -m bench.expression``"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import cv2
import numpy as np

from bench.common import print_table, write_result

MS = 1_000_000
S = 1_000_000_000
FPS = 25
FRAME_NS = S // FPS


async def script(minutes: int) -> tuple[Any, Any, int, int]:
    """A call of ``minutes``: (idle timeline, expressive timeline, t0, t1 of the last one)."""
    from face.timeline import IdleTimeline
    from media_tracks.clock import ManualClock
    from media_tracks.compositor import Compositor, Segment
    from media_tracks.expressive import CallExpression

    clock = ManualClock()
    comp = Compositor(clock=clock, fps=FPS, sample_rate=48000, schedule_lead_ms=120,
                      crossfade_frames=3)
    ce = CallExpression(comp, strength=1.0, lead_ns=200 * MS)
    idle = IdleTimeline(seed=1)
    tl = ce.timeline(IdleTimeline(seed=1))
    k = np.arange(4 * FPS)
    mouth = (0.5 + 0.5 * np.sin(2 * np.pi * 4.3 * k / FPS)).astype(np.float32)

    async def to(t: int) -> None:
        await clock.advance(t - clock.now_ns())

    t = 0
    t0 = 0
    for minute in range(minutes):
        t = minute * 60 * S
        if minute == minutes - 1:
            t0 = t
        while t < (minute + 1) * 60 * S - 12 * S:  # turns of ~12 s
            await to(t)
            ce.cue("user_start")
            for p in range(1, 5):
                await to(t + p * 900 * MS)
                ce.cue("user_pause")
            await to(t + 4 * S)
            ce.cue("user_end")
            ce.state("thinking")
            await to(t + 5 * S)
            comp.schedule(Segment(pcm=np.zeros(4 * 48000, np.int16), mouth=mouth))
            t += 12 * S
    return idle, tl, t0, t0 + 60 * S


def timed(fn: Any, items: list[Any]) -> list[float]:
    out = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    from avatars import DEFAULT_AVATAR_DIR, load_avatar_dir
    from face import FaceRenderer

    cv2.setNumThreads(1)  # as in the server
    idle, tl, t0, t1 = asyncio.run(script(minutes=60))
    times = list(range(t0, t1, FRAME_NS))
    renderer = FaceRenderer(load_avatar_dir(DEFAULT_AVATAR_DIR, width=512, height=512))
    rows = []
    for rounds in range(2):  # the first round warms caches; the second is kept
        pose_idle = timed(idle.pose_at, times)
        pose_expr = timed(tl.pose_at, times)
        poses_idle = [idle.pose_at(t) for t in times]
        poses_expr = [tl.pose_at(t) for t in times]
        draw_idle = timed(renderer.render_i420, poses_idle)
        draw_expr = timed(renderer.render_i420, poses_expr)
        if rounds == 1:
            rows = [{"what": name, "frames": len(v), "mean_ms": round(statistics.mean(v) * 1e3, 4),
                     "p99_ms": round(float(np.percentile(v, 99)) * 1e3, 4)}
                    for name, v in (("pose, idle", pose_idle), ("pose, expressive", pose_expr),
                                    ("pose + frame, idle",
                                     [a + b for a, b in zip(pose_idle, draw_idle, strict=True)]),
                                    ("pose + frame, expressive",
                                     [a + b for a, b in zip(pose_expr, draw_expr, strict=True)]))]
    moving = sum(1 for p in poses_expr if p.expr_dy or p.expr_roll_deg) / len(poses_expr)
    frame = np.zeros((512, 512, 3), np.uint8)
    m = cv2.getRotationMatrix2D((256.0, 400.0), 0.2, 1.0)
    warp = timed(lambda _: cv2.warpAffine(frame, m, (512, 512), flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REPLICATE), list(range(300)))
    rows.append({"what": "video-loop frame warp (while the layer moves it)", "frames": 300,
                 "mean_ms": round(statistics.mean(warp) * 1e3, 4),
                 "p99_ms": round(float(np.percentile(warp, 99)) * 1e3, 4)})
    print_table(rows)
    added = rows[3]["mean_ms"] - rows[2]["mean_ms"]
    summary = {"added_ms_per_frame": round(added, 4), "frames_moved_share": round(moving, 3),
               "loop_avatar_added_ms_while_moving": rows[4]["mean_ms"],
               "target_ms": 0.3, "cues_before": "59 minutes of turns (5 cues and a speech each)"}
    print(summary)
    print(write_result("expression", {"rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
