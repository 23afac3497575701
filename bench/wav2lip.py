"""Wav2Lip on this CPU: model frames/s against batch size and threads, fp32 and dynamic int8,
the whole per-frame cost, first-frame latency after audio arrives, and cross-session batching
(N sessions through the one shared worker) against unbatched model calls.

The network is the real Wav2Lip generator architecture with random weights (no weights can be
installed here): speed and shapes are real, only the lips are noise.

    .venv/bin/python -m bench.wav2lip [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from face.library import AvatarLibrary
from media_tracks.compositor import FramePlan
from pipeline.lipsync.wav2lip import Wav2LipEngine, Wav2LipModel
from pipeline.lipsync.wav2lip_io import FACE_SIZE, crop_face, model_input, paste
from pipeline.tts import SpeechAudio

SR, FPS = 48000, 25


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def random_model(directory: Path) -> Path:
    from pipeline.lipsync.wav2lip_model import write_random_wav2lip_onnx

    path = directory / "wav2lip-random.onnx"
    if not path.exists():
        write_random_wav2lip_onnx(path, seed=0)
    return path


def quantized(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("wav2lip-random-int8dyn.onnx")
    if not out.exists():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def model_fps(model: Wav2LipModel, batch: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((batch, 1, 80, 16)).astype(np.float32)
    face = rng.random((batch, 6, FACE_SIZE, FACE_SIZE), dtype=np.float32)
    model.run(mel, face)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.run(mel, face)
        n += batch
    return n / (time.perf_counter() - t0)


def speech(seconds: float) -> SpeechAudio:
    rng = np.random.default_rng(1)
    t = np.arange(int(SR * seconds)) / SR
    x = (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 180 * t)
    x = x + 0.05 * rng.standard_normal(t.size)
    return SpeechAudio(text="bench", pcm=(x * 9000).astype(np.int16), sample_rate=SR)


async def sessions_run(
    engine: Wav2LipEngine, avatar: Any, n_sessions: int, frames: int
) -> dict[str, Any]:
    """``n_sessions`` renderers each render ``frames`` speaking frames as fast as the engine
    allows (each session keeps 5 frames in flight, as the 200 ms lead does)."""
    track = engine.analyse(speech(frames / FPS + 0.5), fps=FPS)
    renderers = [
        engine.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=None)
        for _ in range(n_sessions)
    ]

    async def one(r: Any) -> None:
        sem = asyncio.Semaphore(5)

        async def frame(k: int) -> None:
            async with sem:
                await r.render(
                    FramePlan(index=k, t_ns=k * 40_000_000, mouth=1.0, blend=1.0, lips=track.at(k))
                )

        await asyncio.gather(*(frame(k) for k in range(frames)))

    stats0 = engine.worker.stats.batches, engine.worker.stats.items
    c0, t0 = cpu_s(), time.perf_counter()
    await asyncio.gather(*(one(r) for r in renderers))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    batches = engine.worker.stats.batches - stats0[0]
    items = engine.worker.stats.items - stats0[1]
    total = n_sessions * frames
    return {
        "fps_total": round(total / wall, 1),
        "fps_per_session": round(total / wall / n_sessions, 1),
        "cpu_ms_per_frame": round(1000 * cpu / total, 1),
        "mean_batch": round(items / max(batches, 1), 2),
    }


async def first_frame_latency(engine: Any, avatar: Any, runs: int) -> list[float]:
    """Audio of a sentence in hand -> mel windows -> first frame rendered (ms)."""
    out = []
    r = engine.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=None)
    audio = speech(2.0)
    loop = asyncio.get_running_loop()
    for _ in range(runs):
        t0 = time.perf_counter()
        track = await loop.run_in_executor(None, lambda: engine.analyse(audio, fps=FPS))
        await r.render(FramePlan(index=0, t_ns=0, mouth=1.0, blend=1.0, lips=track.at(0)))
        out.append(1000 * (time.perf_counter() - t0))
    return out


def stage_costs(engine: Wav2LipEngine, avatar: Any, n: int) -> dict[str, float]:
    """ms per frame of each stage of one speaking frame, single-threaded stages."""
    from face.yuv import rgb_to_i420

    r = engine.renderer(avatar, avatar.new_timeline(), width=512, height=512, executor=None)
    track = engine.analyse(speech(4.0), fps=FPS)
    t = {"idle_render": 0.0, "crop_input": 0.0, "model_b1": 0.0, "paste": 0.0, "i420": 0.0}
    for k in range(n):
        plan = FramePlan(index=k, t_ns=k * 40_000_000, mouth=1.0, blend=1.0, lips=track.at(k))
        t0 = time.perf_counter()
        rgb = r.idle_rgb(plan)
        t1 = time.perf_counter()
        geo = engine.faces(avatar.face).at(plan.t_ns)
        x = model_input(crop_face(rgb, geo))
        t2 = time.perf_counter()
        pred = engine.model.run(track.at(k)[None, None], x[None])[0]
        t3 = time.perf_counter()
        out = paste(rgb, pred, geo, 1.0)
        t4 = time.perf_counter()
        rgb_to_i420(out)
        t5 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            t[key] += dt
    a = time.perf_counter()
    for _ in range(10):
        engine.analyse(speech(10.0), fps=FPS)
    mel_10s = (time.perf_counter() - a) / 10
    res = {k: round(1000 * v / n, 2) for k, v in t.items()}
    res["mel_for_10s_audio_ms"] = round(1000 * mel_10s, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timings (smoke run)")
    args = ap.parse_args()
    secs = 1.0 if args.quick else 4.0
    import cv2

    cv2.setNumThreads(1)
    work = Path(tempfile.gettempdir()) / "avatar-bench-wav2lip"
    work.mkdir(exist_ok=True)
    path = random_model(work)
    int8 = quantized(path)
    cores = os.cpu_count() or 2

    rows: list[dict[str, Any]] = []
    for precision, p in (("fp32", path), ("int8-dynamic", int8)):
        for threads in (1, 2):
            model = Wav2LipModel(p, device="cpu", intra_op_threads=threads)
            for batch in (1, 2, 4, 8, 16, 32):
                if precision == "int8-dynamic" and batch not in (1, 8):
                    continue
                rows.append(
                    {
                        "precision": precision,
                        "threads": threads,
                        "batch": batch,
                        "model_fps": round(model_fps(model, batch, secs), 1),
                    }
                )
    print("Wav2Lip model alone (ONNX Runtime CPU, random weights)")
    print_table(rows)

    lib = AvatarLibrary(data_dir=work / "data", width=512, height=512)
    avatar = lib.get("default")
    model = Wav2LipModel(path, device="cpu", intra_op_threads=cores)
    model.warm_up()
    stages = stage_costs(
        Wav2LipEngine(model, max_batch=1, max_wait_ms=0), avatar, 20 if args.quick else 60
    )
    print("\nPer speaking frame, ms (model at batch 1, all cores)")
    print_table([stages])

    frames = 25 if args.quick else 75
    batch_rows = []
    for n in (1, 2, 4, 8):
        row: dict[str, Any] = {"sessions": n}
        for label, max_batch, wait in (("unbatched", 1, 0.0), ("batched", 16, 4.0)):
            engine = Wav2LipEngine(model, max_batch=max_batch, max_wait_ms=wait)
            res = asyncio.run(sessions_run(engine, avatar, n, frames))
            engine.worker.close()
            for k, v in res.items():
                row[f"{label}_{k}"] = v
        row["cost_ratio"] = round(
            row["batched_cpu_ms_per_frame"] / row["unbatched_cpu_ms_per_frame"], 2
        )
        batch_rows.append(row)
    print("\nN sessions through the shared worker: batched (max 16, 4 ms) vs one call per frame")
    print_table(batch_rows)

    engine = Wav2LipEngine(model, max_batch=16, max_wait_ms=4.0)
    lat = asyncio.run(first_frame_latency(engine, avatar, 5 if args.quick else 15))
    engine.worker.close()
    from pipeline.lipsync.viseme_engine import VisemeEngine

    vis = asyncio.run(first_frame_latency(VisemeEngine(), avatar, 5 if args.quick else 15))
    latency = [
        {
            "engine": name,
            "median_ms": round(float(np.median(v)), 1),
            "max_ms": round(float(np.max(v)), 1),
            "audio_s": 2.0,
        }
        for name, v in (("wav2lip", lat), ("viseme (from audio)", vis))
    ]
    print("\nFirst frame after a 2 s sentence's audio arrives (analysis + first frame, I420)")
    print_table(latency)
    write_result(
        "wav2lip",
        {
            "note": "random-weight Wav2Lip generator of the real architecture; ONNX Runtime "
            "CPUExecutionProvider; 512x512 output, default avatar",
            "quick": args.quick,
            "model": rows,
            "stages_ms": stages,
            "sessions": batch_rows,
            "first_frame": latency,
        },
    )


if __name__ == "__main__":
    main()
