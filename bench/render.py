"""Rendering clips: real-time factor of ``ClipRenderer.render`` for ~10 s of speech.

    .venv/bin/python -m bench.render [--repeats N]

A paragraph of text (about 10 s with the bundled Piper voice) rendered on the default avatar
at 512x512, 25 fps, with the viseme engine, as MP4 (H.264 veryfast crf 23 + AAC) and as WebM
(VP9 crf 33, realtime deadline, cpu-used 6 + Opus): the configured defaults. Per format, the
median over the repeats of the stage times the renderer reports:

* ``tts``: Piper synthesis, sentence by sentence;
* ``analysis``: viseme cues per sentence (and the timeline's);
* ``render``: time the encoder waited for frames (the frames render on a thread pool ahead
  of the encoder, so most of their cost is hidden; ``render_cpu`` is their cost from one
  thread, measured apart);
* ``encode``: the video encoder (frames and audio into the container), then audio.ogg,
  audio.wav and timeline.json;
* ``total``; ``rtf`` = audio seconds / wall seconds (2 = twice as fast as real time).

Then VP9 settings on the same frames, encoder alone (frames/s, bitrate and luma PSNR against
the frames it was given), which is how the WebM defaults were chosen.
Writes ``bench/results/render.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from config import load_settings  # noqa: E402
from face import IdleTimeline  # noqa: E402
from pipeline.lipsync.visemes import track_for  # noqa: E402
from pipeline.render.core import ClipRenderer  # noqa: E402
from pipeline.render.media import ClipEncoder, decode_audio, video_options  # noqa: E402
from pipeline.render.spec import RenderSpec  # noqa: E402
from pipeline.tts import SpeechAudio  # noqa: E402

FPS = 25
SIZE = 512
TEN_SECONDS = (
    "Hello there! My name is Joe, and I will be your guide today. "
    "Would you like some coffee, or perhaps a cup of tea? "
    "The quick brown fox jumps over the lazy dog."
)
VP9_VARIANTS: list[tuple[str, dict[str, str]]] = [
    ("realtime cpu-used 8", {"cpu-used": "8"}),
    ("realtime cpu-used 6 (default)", {}),
    ("good cpu-used 5", {"deadline": "good", "cpu-used": "5"}),
    ("good cpu-used 2", {"deadline": "good", "cpu-used": "2"}),
]


def render_once(renderer: ClipRenderer, fmt: str, out: Path, key: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    spec = RenderSpec(
        avatar_id="default", text=TEN_SECONDS, audio_path=None, voice="default", speed=1.0,
        format=fmt, fps=FPS, cache_key=key,
    )
    t0 = time.perf_counter()
    manifest = renderer.render(spec, out, lambda p, s: None, threading.Event())
    manifest["wall_s"] = time.perf_counter() - t0
    files: Any = manifest["files"]
    manifest["video_bytes"] = (out / str(files["video"])).stat().st_size
    return manifest


def render_cpu_s(renderer: ClipRenderer, out: Path) -> float:
    """Seconds to render the clip's frames one after another in one thread (no encoding)."""
    pcm = decode_audio(out / "audio.wav", sample_rate=48000, max_seconds=60)
    track = track_for(SpeechAudio(text="", pcm=pcm, sample_rate=48000), FPS)
    avatar = renderer.library.get("default")
    r: Any = renderer.lipsync.renderer(avatar, IdleTimeline(seed=1), width=SIZE, height=SIZE,
                                       executor=None)
    from media_tracks.compositor import FramePlan

    t0 = time.perf_counter()
    for k in range(track.n_frames):
        r.render_sync(FramePlan(index=k, t_ns=k * 10**9 // FPS, blend=1.0, lips=track.at(k)))
    return time.perf_counter() - t0


def vp9_variants(renderer: ClipRenderer, out: Path, work: Path) -> list[dict[str, Any]]:
    """The clip's frames (decoded from the MP4) re-encoded with each VP9 setting."""
    import av

    with av.open(str(out / "video.mp4")) as c:
        frames = [np.asarray(f.to_ndarray(format="yuv420p"), dtype=np.uint8)
                  for f in c.decode(video=0)]
    pcm = np.zeros(len(frames) * 48000 // FPS, np.int16)
    rows = []
    base = video_options("webm", h264_preset="veryfast", h264_crf=23,
                         vp9_crf=renderer.settings.render.vp9_crf)
    for name, change in VP9_VARIANTS:
        path = work / "variant.webm"
        enc = ClipEncoder(path, fmt="webm", width=SIZE, height=SIZE, fps=FPS, pcm=pcm,
                          sample_rate=48000, options={**base, **change})
        t0 = time.perf_counter()
        for f in frames:
            enc.add_frame(f)
        enc.close()
        dt = time.perf_counter() - t0
        with av.open(str(path)) as c:
            got = [f.to_ndarray(format="yuv420p")[:SIZE] for f in c.decode(video=0)]
        mse = np.mean([np.mean((a[:SIZE].astype(np.float64) - b) ** 2)
                       for a, b in zip(frames, got, strict=True)])
        rows.append({"vp9": name, "encode_fps": round(len(frames) / dt, 1),
                     "kbit_s": round(path.stat().st_size * 8 / 1000 / (len(frames) / FPS), 1),
                     "luma_psnr_db": round(10 * np.log10(255**2 / max(mse, 1e-9)), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-render-"))
    settings = load_settings(env={}, overrides={
        "media.video_width": SIZE, "media.video_height": SIZE, "media.fps": FPS,
        "avatars.data_dir": str(work / "data"), "lipsync.engine": "viseme",
    })
    renderer = ClipRenderer.from_settings(settings)
    load0 = os.getloadavg()[0]
    try:
        render_once(renderer, "mp4", work / "warm", "00" * 32)  # Piper and caches warm
        rows, runs = [], {}
        for fmt in ("mp4", "webm"):
            results = [render_once(renderer, fmt, work / f"{fmt}{i}", f"{i:02x}" * 32)
                       for i in range(args.repeats)]
            runs[fmt] = results

            def med(key: str, results: list[dict[str, Any]] = results) -> float:
                return statistics.median(float(r["timings_s"][key]) for r in results)

            audio_s = statistics.median(float(r["duration_s"]) for r in results)
            total = med("total")
            rows.append({
                "format": fmt, "audio_s": round(audio_s, 2), "frames": results[0]["frames"],
                "tts_s": round(med("speech"), 3), "analysis_s": round(med("analysis"), 3),
                "render_s": round(med("render"), 3), "encode_s": round(med("encode"), 3),
                "total_s": round(total, 3),
                "rtf": round(statistics.median(
                    float(r["duration_s"]) / float(r["timings_s"]["total"]) for r in results
                ), 2),
                "video_kbit_s": round(statistics.median(
                    r["video_bytes"] * 8 / 1000 / float(r["duration_s"]) for r in results
                ), 1),
            })
        cpu = render_cpu_s(renderer, work / "mp40")
        print(f"renders of ~10 s of speech, {SIZE}x{SIZE} {FPS} fps, viseme engine, "
              f"{os.cpu_count()} CPUs, median of {args.repeats}")
        print_table(rows)
        print(f"\nrender_cpu: {cpu:.3f} s for {rows[0]['frames']} frames from one thread "
              f"({1000 * cpu / rows[0]['frames']:.2f} ms/frame), hidden behind the encoder")
        variants = vp9_variants(renderer, work / "mp40", work)
        print("\nVP9 settings, encoder alone on the same frames")
        print_table(variants)
        load1 = os.getloadavg()[0]
        path = write_result("render", {
            "note": "ClipRenderer.render of a ~10 s paragraph (Piper, bundled voice), default "
                    "avatar, viseme engine; stage times from the renderer, median of the "
                    "repeats; rtf = audio seconds / wall seconds. render_s is the encoder's "
                    "wait for frames (frames render ahead on a pool); render_cpu_s their cost "
                    "from one thread. The machine may be shared: see loadavg.",
            "loadavg_1min": [round(load0, 2), round(load1, 2)],
            "repeats": args.repeats,
            "size": f"{SIZE}x{SIZE}",
            "fps": FPS,
            "settings": {
                "h264": [settings.render.h264_preset, settings.render.h264_crf],
                "vp9": video_options("webm", h264_preset="", h264_crf=0,
                                     vp9_crf=settings.render.vp9_crf),
            },
            "results": rows,
            "render_cpu_s": round(cpu, 3),
            "vp9_variants": variants,
        })
        print(f"\nwrote {path}")
    finally:
        renderer.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
