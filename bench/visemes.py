"""The viseme lip-sync engine on this CPU, and what it looks like.

    .venv/bin/python -m bench.visemes [--quick] [--no-media]

Speed, with real Piper speech (the bundled voice) on the default avatar at 512x512:

* ``analyse``: phonemes -> cues -> per-frame weights for ~10 s of speech, ms per video frame
  (also from the audio alone, for speech without alignments);
* ``render``: ``render_sync`` (idle pose at the frame's time + viseme mouth + RGB -> I420) in
  frames/s from 1 thread and from a 2-thread pool, cv2 single-threaded as in the server
  (sessions render in parallel on a thread pool); analysis time included in ``total_fps``;
* idle vs speaking ms per frame from one thread.

Media (``bench/results/visemes/``): ``visemes.png`` (every viseme at full weight beside the
idle mouth: face and zoomed mouth), ``before_after.png`` (moments of real speech: the idle
face, then the rendered frame), ``speech.mp4`` (~5 s, 25 fps, 512x512, H.264 + AAC, speech
audio with the engine's frames as the server plans them: idle lead-in, cross-fades).
Writes ``bench/results/visemes.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars import DEFAULT_AVATAR_DIR, load_avatar_dir  # noqa: E402
from bench.common import RESULTS, print_table, write_result  # noqa: E402
from face import FacePose, FaceRenderer, IdleTimeline  # noqa: E402
from face.library import LoadedAvatar  # noqa: E402
from media_tracks.clock import ManualClock  # noqa: E402
from media_tracks.compositor import Compositor, FramePlan, Segment  # noqa: E402
from pipeline.lipsync.base import VISEMES  # noqa: E402
from pipeline.lipsync.viseme_engine import VisemeEngine  # noqa: E402
from pipeline.lipsync.visemes import (  # noqa: E402
    BOUNDARIES,
    VISEME_SHAPES,
    VisemeTrack,
    is_modifier,
    track_for,
    viseme_for,
)
from pipeline.tts import PiperTTS, SpeechAudio  # noqa: E402

FPS = 25
SIZE = 512
MEDIA = RESULTS / "visemes"
TEN_SECONDS = (
    "Hello there! My name is Joe, and I will be your guide today. "
    "Would you like some coffee, or perhaps a cup of tea? "
    "The quick brown fox jumps over the lazy dog, and we measured the thickness of the ozone "
    "layer with a spectrometer in June."
)
CLIP = "Hi! Would you like a cup of coffee? We flew over the moon, five times."


def synthesise(tts: PiperTTS, text: str) -> list[SpeechAudio]:
    return list(tts._iter_sentences(text))


def loaded_avatar() -> LoadedAvatar:
    avatar = load_avatar_dir(DEFAULT_AVATAR_DIR, width=SIZE, height=SIZE)
    return LoadedAvatar("default", avatar, FaceRenderer(avatar))


# ---------------------------------------------------------------------------------------------
# speed


def _plans(tracks: list[VisemeTrack]) -> list[FramePlan]:
    """Speaking plans, segments back to back from frame 0 (media time moves on, so blinks,
    glances and head sway are rendered too)."""
    out: list[FramePlan] = []
    for track in tracks:
        for j in range(track.n_frames):
            k = len(out)
            out.append(
                FramePlan(
                    index=k,
                    t_ns=k * 1_000_000_000 // FPS,
                    lips=track.at(j),
                    blend=1.0,
                    segment_id=1,
                )
            )
    return out


def _per_frame_ms(fn: Any, plans: list[FramePlan], repeats: int) -> dict[str, float]:
    for p in plans[:10]:
        fn(p)
    best: list[float] = []
    for _ in range(repeats):
        ms = []
        for p in plans:
            t0 = time.perf_counter_ns()
            fn(p)
            ms.append((time.perf_counter_ns() - t0) / 1e6)
        ms.sort()
        if not best or statistics.median(ms) < statistics.median(best):
            best = ms
    return {
        "mean_ms": round(statistics.fmean(best), 3),
        "median_ms": round(statistics.median(best), 3),
        "p95_ms": round(best[int(0.95 * (len(best) - 1))], 3),
        "max_ms": round(best[-1], 3),
    }


def _throughput(fn: Any, plans: list[FramePlan], threads: int, repeats: int) -> float:
    """Frames/s: the calling thread alone (threads=1), else a pool of ``threads``."""
    best = 0.0
    if threads == 1:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for p in plans:
                fn(p)
            best = max(best, len(plans) / (time.perf_counter() - t0))
        return best
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, plans[:20]))
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(fn, plans))
            best = max(best, len(plans) / (time.perf_counter() - t0))
    return best


def run_speed(segments: list[SpeechAudio], repeats: int) -> dict[str, Any]:
    engine = VisemeEngine()
    loaded = loaded_avatar()
    cv2.setNumThreads(1)
    n_frames = sum(track_for(s, FPS).n_frames for s in segments)
    seconds = sum(len(s.pcm) / s.sample_rate for s in segments)

    def analyse_all(bare: bool) -> tuple[list[VisemeTrack], float]:
        best = float("inf")
        tracks: list[VisemeTrack] = []
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            if bare:
                tracks = [
                    engine.analyse(SpeechAudio(s.text, s.pcm, s.sample_rate), fps=FPS)
                    for s in segments
                ]
            else:
                tracks = [engine.analyse(s, fps=FPS) for s in segments]
            best = min(best, time.perf_counter() - t0)
        return tracks, best

    tracks, analyse_s = analyse_all(bare=False)
    _, analyse_audio_s = analyse_all(bare=True)
    plans = _plans(tracks)
    renderer = engine.renderer(loaded, IdleTimeline(seed=7), width=SIZE, height=SIZE, executor=None)
    idle_plans = [FramePlan(index=p.index, t_ns=p.t_ns) for p in plans]
    speaking = _per_frame_ms(renderer.render_sync, plans, repeats)
    idle = _per_frame_ms(renderer.render_sync, idle_plans, repeats)
    rows = []
    for threads in (1, 2):
        fps = _throughput(renderer.render_sync, plans, threads, repeats)
        frame_s = 1.0 / fps + analyse_s / n_frames
        rows.append(
            {
                "threads": threads,
                "render_fps": round(fps, 1),
                "total_fps": round(1.0 / frame_s, 1),
                "sessions_at_25fps": int((1.0 / frame_s) // FPS),
            }
        )
    return {
        "size": f"{SIZE}x{SIZE}",
        "speech_s": round(seconds, 2),
        "frames": n_frames,
        "analyse_phonemes_ms_per_frame": round(analyse_s * 1e3 / n_frames, 4),
        "analyse_audio_ms_per_frame": round(analyse_audio_s * 1e3 / n_frames, 4),
        "analyse_phonemes_ms_per_10s": round(analyse_s * 1e3 * 10 / seconds, 2),
        "render_ms_speaking": speaking,
        "render_ms_idle": idle,
        "throughput": rows,
    }


# ---------------------------------------------------------------------------------------------
# media


def _label(img: np.ndarray, text: str, scale: float = 0.5) -> np.ndarray:
    band = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, img])


def _crop(
    frame: np.ndarray, centre: tuple[float, float], half: float, width: int, aspect: float = 1.0
) -> np.ndarray:
    cx, cy = centre
    x0, x1 = int(cx - half), int(cx + half)
    y0, y1 = int(cy - half * aspect), int(cy + half * aspect)
    crop = frame[y0:y1, x0:x1]
    h = round(crop.shape[0] * width / crop.shape[1])
    return np.asarray(cv2.resize(crop, (width, h), interpolation=cv2.INTER_CUBIC))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(
        str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ):
        raise RuntimeError(f"could not write {path}")


def viseme_sheet(path: Path, loaded: LoadedAvatar) -> None:
    """Every viseme at full weight beside the idle mouth: the face (x1.6) and the mouth (x5)."""
    face, lm = loaded.face, loaded.avatar.landmarks
    mouth_c = tuple(lm[48:68].mean(axis=0))
    face_c = (float(lm[:, 0].mean()), float(lm[:, 1].mean()) + 4)
    shots = [("idle (no speech)", FacePose.neutral())]
    shots += [(v, FacePose.neutral(mouth=VISEME_SHAPES[v])) for v in VISEMES]
    tiles = []
    for label, pose in shots:
        frame = face.render(pose)
        top = _crop(frame, face_c, 62, 184)
        zoom = _crop(frame, mouth_c, 36, 184, aspect=0.7)
        gap = np.full((2, 184, 3), 255, np.uint8)
        tiles.append(_label(np.vstack([top, gap, zoom]), label))

    def row(items: list[np.ndarray]) -> np.ndarray:
        spacer = np.full((items[0].shape[0], 2, 3), 255, np.uint8)
        return np.hstack([x for t in items for x in (t, spacer)][:-1])

    rows = [row(tiles[:4]), row(tiles[4:])]
    _write_png(
        path, np.vstack([rows[0], np.full((4, rows[0].shape[1], 3), 255, np.uint8), rows[1]])
    )


# ASCII names (ARPAbet) for the phoneme labels (cv2 draws no IPA)
_ASCII = {
    "ɑ": "AA",
    "æ": "AE",
    "ʌ": "AH",
    "ɔ": "AO",
    "ə": "AX",
    "ɚ": "ER",
    "ɜ": "ER",
    "ɛ": "EH",
    "ɪ": "IH",
    "i": "IY",
    "ʊ": "UH",
    "u": "UW",
    "θ": "TH",
    "ð": "DH",
    "ʃ": "SH",
    "ʒ": "ZH",
    "ŋ": "NG",
    "ɹ": "R",
    "ɾ": "DX",
    "ɡ": "G",
    "ɐ": "AX",
    "ᵻ": "IX",
    "ʔ": "Q",
}


def _frame_phonemes(s: SpeechAudio, n_frames: int) -> list[str]:
    """The phoneme sounding in the middle of each video frame ('' for stress/length marks,
    spaces and boundaries)."""
    starts = np.cumsum([0] + [n for _, n in s.phonemes])
    out = []
    for j in range(n_frames):
        mid = (2 * j + 1) * s.sample_rate // (2 * FPS)
        i = int(np.searchsorted(starts, mid, side="right")) - 1
        ph = s.phonemes[i][0] if 0 <= i < len(s.phonemes) else ""
        out.append("" if is_modifier(ph) or ph in BOUNDARIES else ph)
    return out


def before_after(path: Path, loaded: LoadedAvatar, segments: list[SpeechAudio]) -> None:
    """For each viseme, the moment of real speech where it is strongest while one of its
    phonemes sounds: the idle mouth above, the rendered one below."""
    face, lm = loaded.face, loaded.avatar.landmarks
    mouth_c = tuple(lm[48:68].mean(axis=0))
    idle = _crop(face.render(FacePose.neutral()), mouth_c, 36, 160, aspect=0.7)
    picks: dict[str, tuple[float, VisemeTrack, int, str]] = {}
    for s in segments:
        track = track_for(s, FPS)
        for j, ph in enumerate(_frame_phonemes(s, track.n_frames)):
            if not ph:
                continue
            v = viseme_for(ph)[0]
            w = float(track.weights[j, VISEMES.index(v)])
            if v not in picks or w > picks[v][0]:
                picks[v] = (w, track, j, ph)
    cols = []
    for v in VISEMES:
        if v not in picks:
            continue
        w, track, j, ph = picks[v]
        frame = face.render(FacePose.neutral(mouth=track.shape_at(j)))
        after = _crop(frame, mouth_c, 36, 160, aspect=0.7)
        name = _ASCII.get(ph, ph if ph.isascii() else f"U+{ord(ph[0]):04X}")
        col = np.vstack(
            [_label(idle, "before: idle", 0.45), _label(after, f"{v} {w:.2f} /{name}/", 0.45)]
        )
        cols += [col, np.full((col.shape[0], 2, 3), 255, np.uint8)]
    _write_png(path, np.hstack(cols[:-1]))


def speech_clip(path: Path, loaded: LoadedAvatar, segments: list[SpeechAudio]) -> float:
    """An MP4 of the engine's frames and the speech, planned by the real compositor: 0.4 s
    idle, the sentences back to back, 0.6 s idle. Returns its duration in seconds."""
    sr = segments[0].sample_rate
    clock = ManualClock()
    comp = Compositor(
        clock=clock, fps=FPS, sample_rate=sr, schedule_lead_ms=400, crossfade_frames=5
    )
    engine = VisemeEngine()
    for s in segments:
        track = engine.analyse(s, fps=FPS)
        comp.schedule(Segment(pcm=s.pcm, mouth=track.openness(), lips=track, text=s.text))
    end = comp._segments[-1]
    n_frames = end.first_frame + end.n_frames + int(0.6 * FPS)
    renderer = engine.renderer(
        loaded, IdleTimeline(seed=11), width=SIZE, height=SIZE, executor=None
    )
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE, SIZE, "yuv420p"
        video.options = {"crf": "25", "preset": "slow", "tune": "film"}
        audio = out.add_stream("aac", rate=sr)
        audio.layout = "mono"
        audio.bit_rate = 64_000
        spf = sr // FPS
        for k in range(n_frames):
            yuv = renderer.render_sync(comp.frame_plan(k))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(yuv), format="yuv420p")
            frame.pts = k
            frame.time_base = Fraction(1, FPS)
            out.mux(video.encode(frame))
            pcm = comp.audio_at(k * spf, spf)
            af = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            af.sample_rate = sr
            af.pts = k * spf
            af.time_base = Fraction(1, sr)
            out.mux(audio.encode(af))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    return n_frames / FPS


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best is kept")
    parser.add_argument("--quick", action="store_true", help="one pass")
    parser.add_argument("--no-media", action="store_true", help="skip the PNGs and the clip")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    load_start = round(os.getloadavg()[0], 2)
    tts = PiperTTS()
    tts.load()
    segments = synthesise(tts, TEN_SECONDS)
    media: dict[str, Any] = {}
    if not args.no_media:
        loaded = loaded_avatar()
        viseme_sheet(MEDIA / "visemes.png", loaded)
        before_after(MEDIA / "before_after.png", loaded, segments)
        clip_s = speech_clip(MEDIA / "speech.mp4", loaded, synthesise(tts, CLIP))
        media = {
            "dir": str(MEDIA.relative_to(RESULTS.parent.parent)),
            "clip_s": clip_s,
            "files": sorted(p.name for p in MEDIA.iterdir()),
        }
    speed = run_speed(segments, repeats)
    print_table(speed["throughput"])
    sp, idle = speed["render_ms_speaking"], speed["render_ms_idle"]
    print(
        f"render_sync ms/frame (1 thread, 512x512, incl. I420): speaking {sp['mean_ms']:.3f} "
        f"(p95 {sp['p95_ms']:.3f}), idle {idle['mean_ms']:.3f} (p95 {idle['p95_ms']:.3f})"
    )
    print(
        f"analyse: {speed['analyse_phonemes_ms_per_frame']:.4f} ms/frame from phonemes, "
        f"{speed['analyse_audio_ms_per_frame']:.4f} from audio "
        f"({speed['analyse_phonemes_ms_per_10s']:.1f} ms per 10 s of speech)"
    )
    path = write_result(
        "visemes",
        {
            "note": "render_sync = idle pose + viseme mouth + RGB->I420, cv2 single-threaded; "
            "render_fps from the calling thread (threads=1) or a pool of `threads`; total_fps "
            "adds the analysis per frame. The machine may be shared: see loadavg.",
            "loadavg_1min": [load_start, round(os.getloadavg()[0], 2)],
            "repeats": repeats,
            **speed,
            "media": media,
        },
    )
    print(f"wrote {path}" + (f" and {MEDIA}/" if media else ""))


if __name__ == "__main__":
    main()
