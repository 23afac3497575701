"""Whole Wav2Lip sessions on this CPU, per backend and precision, at 512x512 and 1280x720.

Each speaking frame takes the session's full path: the mel analysis of the reply's audio
(``engine.analyse``, once per segment), then per frame the idle render, the face crop, the
model (through the one shared batching worker), the paste-back, RGB -> I420 and the encode
(the session's VP8 encoder from ``media_tracks.encoders``, one encode at a time per session on
the loop's default executor, as aiortc runs it). Renders go to a render pool as in the server
(5 frames in flight per session, unthrottled; a real call renders
lipsync.render_lead_ms, 600 ms, ahead), so the two cores work in parallel: the
model on the worker thread, rendering and encoding on the pools.

Rows: for each (backend, precision, rows, size), ``fps_1`` is one session unthrottled (frames/s
through the whole path); ``fps_total_N`` is N sessions at once, unthrottled (all frames / s),
and ``sessions_at_25`` = that total / 25 (how many real-time sessions that throughput could
carry; ``bench.capacity --engine wav2lip`` measures it for real, over WebRTC). Stage costs
(ms per frame, single-threaded, one session) show where the time goes.

The network is the real Wav2Lip architecture with random weights (speed and shapes are real,
only the lips are noise).

``rows``: ``lower`` runs the model's lower-rows copy (``lipsync.lower_face_only``, the
default: ``pipeline.lipsync.rows``), ``whole`` the whole 96x96 crop.

    .venv/bin/python -m bench.wav2lip_session [--quick] [--configs ort-fp32,ov-bf16]
        [--rows lower,whole]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from av import VideoFrame

from bench.common import print_table, write_result
from bench.wav2lip import cpu_s, random_model
from face.library import AvatarLibrary
from face.yuv import rgb_to_i420
from media_tracks.compositor import FramePlan
from media_tracks.encoders import VideoEncoding, make_video_encoder
from pipeline.lipsync.wav2lip import Wav2LipEngine, load_wav2lip_engine
from pipeline.lipsync.wav2lip_io import crop_face, model_input, paste
from pipeline.tts import PiperTTS, SpeechAudio

FPS = 25
LEAD = 5  # frames in flight per session (the compositor's 200 ms lead)
CONFIGS = {
    "ort-fp32": ("cpu", "fp32"),
    "ov-fp32": ("openvino", "fp32"),
    "ov-bf16": ("openvino", "bf16"),
    "ov-int8": ("openvino", "int8"),
}
SIZES = {"512x512": (512, 512), "1280x720": (1280, 720)}
TEXT = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp, and ships "
    "passed in the night while the sea was calm or rough as the weather chose."
)


def voice_audio(seconds: float) -> SpeechAudio:
    """The bundled voice reading ``TEXT`` (looped to ``seconds``), 48 kHz as in a call."""
    tts = PiperTTS(sample_rate=48_000)
    tts.load()
    pcm = np.concatenate([a.pcm for a in tts.synthesize(TEXT)])
    reps = int(np.ceil(seconds * 48_000 / len(pcm)))
    return SpeechAudio(
        text=TEXT, pcm=np.tile(pcm, reps)[: int(seconds * 48_000)], sample_rate=48_000
    )


async def session(
    engine: Wav2LipEngine,
    avatar: Any,
    audio: SpeechAudio,
    frames: int,
    size: tuple[int, int],
    pool: ThreadPoolExecutor,
) -> None:
    """One session's reply: mel analysis, then ``frames`` speaking frames rendered and
    encoded in order."""
    loop = asyncio.get_running_loop()
    width, height = size
    track = await loop.run_in_executor(pool, lambda: engine.analyse(audio, fps=FPS))
    renderer = engine.renderer(
        avatar, avatar.new_timeline(), width=width, height=height, executor=pool
    )
    encoder = make_video_encoder("VP8", VideoEncoding(width=width, height=height, fps=FPS))
    assert encoder is not None
    sem = asyncio.Semaphore(LEAD)
    done: dict[int, asyncio.Future[Any]] = {k: loop.create_future() for k in range(frames)}

    async def render(k: int) -> None:
        async with sem:
            plan = FramePlan(
                index=k, t_ns=k * 1_000_000_000 // FPS, mouth=1.0, blend=1.0, lips=track.at(k)
            )
            done[k].set_result(await renderer.render(plan))

    async def encode() -> None:
        for k in range(frames):
            yuv = await done[k]
            frame = VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts, frame.time_base = k * 3600, Fraction(1, 90_000)
            await loop.run_in_executor(None, encoder.encode, frame, k == 0)

    await asyncio.gather(encode(), *(render(k) for k in range(frames)))


async def run_sessions(
    engine: Wav2LipEngine,
    avatar: Any,
    audio: SpeechAudio,
    n: int,
    frames: int,
    size: tuple[int, int],
    pool: ThreadPoolExecutor,
) -> dict[str, float]:
    c0, t0 = cpu_s(), time.perf_counter()
    await asyncio.gather(*(session(engine, avatar, audio, frames, size, pool) for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {"fps_total": n * frames / wall, "cpu_ms_per_frame": 1000 * cpu / (n * frames)}


def stage_costs(
    engine: Wav2LipEngine, avatar: Any, audio: SpeechAudio, size: tuple[int, int], n: int
) -> dict[str, float]:
    """ms per frame of each stage, one after the other on one thread."""
    width, height = size
    r = engine.renderer(avatar, avatar.new_timeline(), width=width, height=height, executor=None)
    t = time.perf_counter()
    track = engine.analyse(audio, fps=FPS)
    mel_ms = 1000 * (time.perf_counter() - t) / track.n_frames
    encoder = make_video_encoder("VP8", VideoEncoding(width=width, height=height, fps=FPS))
    assert encoder is not None
    keys = ("idle_render", "crop_input", "model", "paste", "i420", "encode_vp8")
    acc = dict.fromkeys(keys, 0.0)
    faces = engine.faces(avatar.face)
    for k in range(n + 3):
        plan = FramePlan(index=k, t_ns=k * 40_000_000, mouth=1.0, blend=1.0, lips=track.at(k))
        t0 = time.perf_counter()
        rgb = r.idle_rgb(plan)
        t1 = time.perf_counter()
        geo = faces.at(plan.t_ns)
        x = model_input(crop_face(rgb, geo))
        t2 = time.perf_counter()
        pred = engine.model.run(track.at(k)[None, None], x[None])[0]
        t3 = time.perf_counter()
        out = paste(rgb, pred, geo, 1.0, copy=False)
        t4 = time.perf_counter()
        yuv = rgb_to_i420(out)
        t5 = time.perf_counter()
        frame = VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts, frame.time_base = k * 3600, Fraction(1, 90_000)
        encoder.encode(frame, k == 0)
        t6 = time.perf_counter()
        if k >= 3:  # warm
            for key, dt in zip(
                keys, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True
            ):
                acc[key] += dt
    res = {f"{k}_ms": round(1000 * v / n, 2) for k, v in acc.items()}
    res["mel_ms"] = round(mel_ms, 3)
    res["total_ms"] = round(sum(res.values()), 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer frames (smoke run)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--sessions", default="1,2,3")
    ap.add_argument(
        "--rows",
        default="lower,whole",
        help="lower: the model's lower-rows copy (lipsync.lower_face_only, the default); "
        "whole: the whole 96x96 crop",
    )
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)  # as the server does
    frames = 50 if args.quick else 150
    work = Path(tempfile.gettempdir()) / "avatar-bench-wav2lip"
    work.mkdir(exist_ok=True)
    model = random_model(work)
    audio = voice_audio(frames / FPS + 1.0)
    cores = os.cpu_count() or 2
    rows: list[dict[str, Any]] = []
    stages: list[dict[str, Any]] = []
    for name, rows_name in [(c, r) for c in args.configs.split(",") for r in args.rows.split(",")]:
        device, precision = CONFIGS[name]
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            lib = AvatarLibrary(data_dir=work / "data", width=size[0], height=size[1])
            avatar = lib.get("default")
            calibration = None
            if precision == "int8":
                from config import load_settings
                from pipeline.lipsync.quantize import default_calibration

                settings = load_settings(
                    env={},
                    overrides={
                        "avatars.data_dir": str(work / "data"),
                        "media.video_width": size[0],
                        "media.video_height": size[1],
                    },
                )
                calibration = default_calibration(settings)
            engine = load_wav2lip_engine(
                model,
                cache_dir=work / "cache",
                device=device,
                precision=precision,
                max_batch=8,
                max_wait_ms=4,
                calibration=calibration,
                lower_face_only=rows_name == "lower",
            )
            info = engine.info()
            pool = ThreadPoolExecutor(max(2, cores), thread_name_prefix="render")
            row: dict[str, Any] = {
                "config": name,
                "rows": rows_name,
                "size": size_name,
                "backend": info["backend"],
                "precision_ran": info["precision"],
            }
            try:
                asyncio.run(run_sessions(engine, avatar, audio, 1, 10, size, pool))  # warm
                for n in [int(x) for x in args.sessions.split(",")]:
                    res = asyncio.run(run_sessions(engine, avatar, audio, n, frames, size, pool))
                    row[f"fps_total_{n}"] = round(res["fps_total"], 1)
                    if n == 1:
                        row["fps_1"] = row.pop("fps_total_1")
                        row["cpu_ms_per_frame"] = round(res["cpu_ms_per_frame"], 1)
                best = max(v for k, v in row.items() if k.startswith(("fps_total", "fps_1")))
                row["sessions_at_25"] = round(best / FPS, 2)
                st = stage_costs(engine, avatar, audio, size, 30 if args.quick else 60)
                stages.append({"config": name, "rows": rows_name, "size": size_name, **st})
            finally:
                engine.worker.close()
                pool.shutdown()
            rows.append(row)
            print_table([row])
    print("\nWhole Wav2Lip sessions (mel, idle render, model, paste-back, I420, VP8 encode)")
    print_table(rows)
    print("\nStage costs, ms per frame, one thread")
    print_table(stages)
    write_result(
        "wav2lip_session",
        {
            "frames_per_session": frames,
            "cores": cores,
            "lead_frames": LEAD,
            "sessions": rows,
            "stages": stages,
            "note": "random-weight Wav2Lip (real architecture); VP8 encoder at the session's "
            "start bitrate; unthrottled: sessions_at_25 = best total fps / 25",
        },
    )


if __name__ == "__main__":
    main()
