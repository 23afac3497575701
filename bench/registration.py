"""Benchmark avatar registration's analysis half: ``prepare_avatar`` on an image and a video.

    .venv/bin/python -m bench.registration        # or: .venv/bin/python bench/registration.py

* analyzer load: ``create_analyzer(backend)`` (dlib: HOG detector + the 100 MB shape
  predictor; Haar: cascade + the same predictor), timed separately from preparation;
* image: the default avatar (512x512), best and first of 5 ``prepare_avatar`` runs
  (target: at most 2 s);
* video: 10 s at 25 fps, 1280x720, synthesised from the default face drifting, bobbing and
  zooming (about 200-260 px face box), analysed frames per second (target: at least 15).

Peak RSS is measured around each preparation (``/proc/self/clear_refs`` resets the
high-water mark); the video's decoded frames themselves (about 690 MB, the decoder's output,
not prepare's) are reported separately. Writes ``bench/results/registration.json``.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars import DEFAULT_AVATAR_DIR  # noqa: E402
from avatars.analysis import create_analyzer  # noqa: E402
from avatars.prepare import prepare_avatar  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from tests.fakes.prepare import FrameMedia  # noqa: E402

IMAGE_TARGET_S = 2.0
VIDEO_TARGET_FPS = 15.0
FACE_CENTRE = (225.0, 132.0)


def _portrait() -> np.ndarray:
    bgr = cv2.imread(str(DEFAULT_AVATAR_DIR / "astronaut.png"))
    assert bgr is not None
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _video(face: np.ndarray, seconds: float, fps: float, size: tuple[int, int]) -> list[np.ndarray]:
    w, h = size
    frames = []
    for i in range(int(round(seconds * fps))):
        t = i / fps
        s = 2.0 + 0.25 * math.sin(2 * math.pi * t / 7.0)
        cx = w / 2 + 140 * math.sin(2 * math.pi * t / 5.0)
        cy = h / 2 + 30 * math.sin(2 * math.pi * t / 3.1)
        m = np.array([[s, 0, cx - s * FACE_CENTRE[0]], [0, s, cy - s * FACE_CENTRE[1]]])
        frames.append(
            np.asarray(
                cv2.warpAffine(
                    face, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                )
            )
        )
    return frames


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(case: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(
        ("case", "seconds", "frames_per_s", "rss_growth_mb", "target", "ok"), ""
    )
    row.update(case=case, **values)
    return row


def _timed(fn: Any) -> tuple[Any, float, float]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    face = _portrait()
    rows: list[dict[str, Any]] = []
    loads: dict[str, dict[str, float]] = {}
    analyzers = {}
    for backend in ("dlib", "haar"):
        before = _rss_mb()
        analyzers[backend], load_s, _ = _timed(lambda b=backend: create_analyzer(b))
        grown = _rss_mb() - before
        loads[backend] = {"seconds": round(load_s, 3), "rss_increase_mb": round(grown, 1)}
        rows.append(
            _row(
                f"{backend} analyzer load", seconds=round(load_s, 3), rss_growth_mb=round(grown, 1)
            )
        )

    image = FrameMedia("image", [face])
    image_results = {}
    for backend, analyzer in analyzers.items():
        times = []
        peak = float("nan")
        for k in range(5):
            reset = _reset_peak()
            before = _rss_mb()
            _, wall, _ = _timed(lambda a=analyzer: prepare_avatar(image, a))
            times.append(wall)
            if k == 0 and reset:
                peak = _peak_mb() - before
        image_results[backend] = {
            "first_s": round(times[0], 4),
            "best_s": round(min(times), 4),
            "peak_rss_increase_mb": round(peak, 1),
            "target_s": IMAGE_TARGET_S,
            "meets_target": max(times) <= IMAGE_TARGET_S,
        }
        rows.append(
            _row(
                f"{backend} image 512x512 (best/first of 5)",
                seconds=f"{min(times):.3f}/{times[0]:.3f}",
                rss_growth_mb=round(peak, 1),
                target=f"<= {IMAGE_TARGET_S} s",
                ok=max(times) <= IMAGE_TARGET_S,
            )
        )

    frames = _video(face, 10.0, 25.0, (1280, 720))
    rss_with_frames = _rss_mb()
    reset = _reset_peak()
    before = _rss_mb()
    progress: list[float] = []
    prepared, wall, cpu = _timed(
        lambda: prepare_avatar(
            FrameMedia("video", frames, 25.0), analyzers["dlib"], progress=progress.append
        )
    )
    peak = _peak_mb() - before if reset else float("nan")
    fps = len(frames) / wall
    video = {
        "frames": len(frames),
        "size": "1280x720",
        "fps_in": 25.0,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "frames_per_second": round(fps, 1),
        "target_frames_per_second": VIDEO_TARGET_FPS,
        "meets_target": fps >= VIDEO_TARGET_FPS,
        "loop_frames": prepared.frame_count,
        "detections": prepared.quality["video"]["detections"],
        "jitter_px": prepared.quality["video"]["jitter_px"],
        "face_size_px": prepared.quality["face_size_px"],
        "progress_calls": len(progress),
        "input_frames_mb": round(sum(f.nbytes for f in frames) / 2**20, 1),
        "rss_with_input_frames_mb": round(rss_with_frames, 1),
        "peak_rss_increase_mb": round(peak, 1),
    }
    rows.append(
        _row(
            "dlib video 10 s 1280x720 25 fps",
            seconds=round(wall, 3),
            frames_per_s=round(fps, 1),
            rss_growth_mb=round(peak, 1),
            target=f">= {VIDEO_TARGET_FPS} frames/s",
            ok=fps >= VIDEO_TARGET_FPS,
        )
    )
    print_table(rows)
    path = write_result(
        "registration",
        {
            "note": "prepare_avatar wall time on this machine (cv2 default threads); analyzer "
            "load timed separately; peak_rss_increase_mb = VmHWM during the call minus VmRSS "
            "before it (the input frames, already decoded, are not counted); "
            "process_max_rss_mb includes the synthesised input frames",
            "loadavg_1min": round(os.getloadavg()[0], 2),
            "analyzer_load": loads,
            "image_512": image_results,
            "video_720p": video,
            "process_max_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
