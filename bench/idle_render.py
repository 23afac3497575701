"""Benchmark ``FaceRenderer.render`` and write a contact sheet of the idle face.

    .venv/bin/python bench/idle_render.py            # or: python -m bench.idle_render

Times ``render()`` over 500 frames (25 fps media time) for the default avatar at 512x512 and
fitted to 1280x720, in three scenarios:

* ``idle``    the ``IdleTimeline`` poses (blinks, glances, breathing, head sway), mouth shut
* ``talking`` the same plus an energy-like ``mouth_open`` envelope on every frame
* ``worst``   every effect at once on every frame (blink, glance, jaw, head warp)

with OpenCV limited to one thread (the server's setting: sessions render in parallel on a
thread pool) and with OpenCV's default threading, plus the throughput of a 2-thread pool.
Writes ``bench/results/idle_render.json`` and ``bench/results/idle_frames/contact_sheet.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars import DEFAULT_AVATAR_DIR, load_avatar_dir  # noqa: E402
from face import FacePose, FaceRenderer, IdleTimeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRAME_NS = 40_000_000  # 25 fps
SIZES = ((512, 512), (1280, 720))


def _speech_envelope(i: int) -> float:
    """A syllable-like 0..1 mouth opening (4-5 Hz) with pauses, deterministic."""
    t = i * FRAME_NS / 1e9
    syll = max(0.0, math.sin(2 * math.pi * 4.3 * t)) ** 0.7
    phrase = 0.5 + 0.5 * math.sin(2 * math.pi * 0.35 * t)
    return min(1.0, syll * (0.3 + 0.7 * phrase))


def _poses(scenario: str, n: int) -> list[FacePose]:
    tl = IdleTimeline(seed=1)
    poses = [tl.pose_at(i * FRAME_NS) for i in range(n)]
    if scenario == "talking":
        poses = [replace(p, mouth_open=_speech_envelope(i)) for i, p in enumerate(poses)]
    elif scenario == "worst":
        poses = [
            replace(p, blink=0.5 + 0.5 * (i % 2), gaze_x=0.8, gaze_y=0.3, mouth_open=0.9)
            for i, p in enumerate(poses)
        ]
    return poses


def _time_serial(renderer: FaceRenderer, poses: list[FacePose], repeats: int) -> dict[str, float]:
    """Per-frame wall and CPU (this thread) times of the best of ``repeats`` passes (lowest
    median wall time: least disturbed by other jobs on the machine)."""
    for p in poses[:10]:  # warm up
        renderer.render(p)
    best: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        wall, cpu = [], []
        for p in poses:
            t0 = time.perf_counter_ns()
            c0 = time.thread_time_ns()
            renderer.render(p)
            cpu.append((time.thread_time_ns() - c0) / 1e6)
            wall.append((time.perf_counter_ns() - t0) / 1e6)
        wall.sort()
        cpu.sort()
        if not best[0] or statistics.median(wall) < statistics.median(best[0]):
            best = (wall, cpu)
    wall, cpu = best
    return {
        "mean_ms": round(statistics.fmean(wall), 3),
        "median_ms": round(statistics.median(wall), 3),
        "p95_ms": round(wall[int(0.95 * (len(wall) - 1))], 3),
        "max_ms": round(wall[-1], 3),
        "cpu_mean_ms": round(statistics.fmean(cpu), 3),
        "cpu_median_ms": round(statistics.median(cpu), 3),
    }


def _time_pool(renderer: FaceRenderer, poses: list[FacePose], workers: int, repeats: int) -> float:
    best = 0.0
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(renderer.render, poses[:20]))
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(renderer.render, poses))
            best = max(best, len(poses) / (time.perf_counter() - t0))
    return best


def run_bench(n_frames: int, repeats: int) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    default_threads = cv2.getNumThreads()
    rows: list[dict[str, Any]] = []
    for w, h in SIZES:
        avatar = load_avatar_dir(DEFAULT_AVATAR_DIR, width=w, height=h)
        t0 = time.perf_counter()
        renderer = FaceRenderer(avatar)
        init_ms = (time.perf_counter() - t0) * 1e3
        for threads in (1, default_threads):
            cv2.setNumThreads(threads)
            for scenario in ("idle", "talking", "worst"):
                poses = _poses(scenario, n_frames)
                row: dict[str, Any] = {
                    "size": f"{w}x{h}",
                    "scenario": scenario,
                    "cv2_threads": threads,
                    "frames": n_frames,
                    "init_ms": round(init_ms, 1),
                }
                row.update(_time_serial(renderer, poses, repeats))
                if threads != 1:
                    del row["cpu_mean_ms"], row["cpu_median_ms"]
                else:
                    row["pool2_fps"] = round(_time_pool(renderer, poses, 2, repeats), 1)
                rows.append(row)
            if threads == default_threads:
                break
    cv2.setNumThreads(default_threads)
    return {
        "bench": "idle_render",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "loadavg_1min_at_start": load_start,
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "note": "ms per render() call from one thread, best of `repeats` passes (lowest "
        "median); cpu_* = CPU time of the calling thread (meaningful with cv2_threads=1); "
        "pool2_fps = frames/s rendered by a 2-thread pool with cv2 single-threaded. "
        "The machine may have been shared with other jobs: see loadavg.",
        "repeats": repeats,
        "results": rows,
    }


def _print_table(report: dict[str, Any]) -> None:
    head = (
        f"{'size':>9} {'scenario':>8} {'cv2thr':>6} {'mean':>7} {'median':>7} {'p95':>7} "
        f"{'max':>7} {'cpu mean':>8} {'pool2 fps':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        fps = f"{r['pool2_fps']:.0f}" if "pool2_fps" in r else "-"
        cpu = f"{r['cpu_mean_ms']:.2f}" if r["cv2_threads"] == 1 else "-"
        print(
            f"{r['size']:>9} {r['scenario']:>8} {r['cv2_threads']:>6} {r['mean_ms']:>7.2f} "
            f"{r['median_ms']:>7.2f} {r['p95_ms']:>7.2f} {r['max_ms']:>7.2f} {cpu:>8} {fps:>9}"
        )
    m = report["machine"]
    print(
        f"(wall ms per frame, cpu = this thread's CPU ms; loadavg {m['loadavg_1min_at_start']} "
        f"-> {m['loadavg_1min_at_end']} on {m['cpus']} cpus)"
    )


def _crop(frame: np.ndarray, pts: np.ndarray, pad_x: float, pad_top: float, pad_bot: float,
          width: int) -> np.ndarray:  # fmt: skip
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    w = float(x1 - x0)
    crop = frame[
        int(y0 - pad_top * w) : int(y1 + pad_bot * w), int(x0 - pad_x * w) : int(x1 + pad_x * w)
    ]
    h = round(crop.shape[0] * width / crop.shape[1])
    return np.asarray(cv2.resize(crop, (width, h), interpolation=cv2.INTER_CUBIC))


def contact_sheet(path: Path) -> None:
    """The key poses of the default avatar at 512x512: face (x1.5), eyes and mouth zoomed."""
    avatar = load_avatar_dir(DEFAULT_AVATAR_DIR, width=512, height=512)
    renderer = FaceRenderer(avatar)
    n = FacePose.neutral()
    shots = [
        ("open", n),
        ("blink 0.5", replace(n, blink=0.5)),
        ("closed", replace(n, blink=1.0)),
        ("glance L", replace(n, gaze_x=-1.0)),
        ("glance R", replace(n, gaze_x=1.0)),
        ("mouth 0.5", replace(n, mouth_open=0.5)),
        ("mouth 1.0", replace(n, mouth_open=1.0)),
    ]
    lm = avatar.landmarks
    columns = []
    for label, p in shots:
        frame = renderer.render(p)
        face = _crop(frame, lm, 0.12, 0.25, 0.2, 172)
        eyes = _crop(frame, lm[36:48], 0.12, 0.45, 0.35, 172)
        mouth = _crop(frame, np.vstack([lm[48:68], lm[8:9]]), 0.25, 0.15, 0.15, 172)
        band = np.full((22, 172, 3), 255, np.uint8)
        cv2.putText(band, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        gap = np.full((2, 172, 3), 255, np.uint8)
        columns.append(np.vstack([band, face, gap, eyes, gap, mouth]))
        columns.append(np.full((columns[-1].shape[0], 2, 3), 255, np.uint8))
    sheet = np.hstack(columns[:-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise RuntimeError(f"could not write {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "idle_render.json")
    parser.add_argument("--sheet", type=Path, default=RESULTS / "idle_frames" / "contact_sheet.png")
    args = parser.parse_args()
    contact_sheet(args.sheet)
    report = run_bench(args.frames, args.repeats)
    _print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.sheet}")


if __name__ == "__main__":
    main()
