"""Piper's CPU per second of speech, with its vocoder on ONNX Runtime's 2-D kernels
(``pipeline/vocoder_2d.py``, the server's default) and as the voice ships it (1-D).

    .venv/bin/python -m bench.tts_cost [--rounds 3]

The bundled voice synthesises a paragraph (``PiperTTS.synthesize``, the whole path: phonemes,
text side, vocoder, resampling to 48 kHz) in rounds that alternate the two vocoders; CPU time
of the calling thread, per second of speech and per 40 ms video frame, median over rounds.
Then the vocoder alone on random latents of 40 and 200 frames (ms per latent frame of 256
samples) and the largest sample difference between the two (samples in -1..1).
Writes ``bench/results/tts_cost.json``."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from bench.common import print_table, write_result

TEXT = ("Hello there! I am the avatar of this server, and I can talk with you about anything "
        "you like. The weather today is mild, with a light breeze from the west. Shall we "
        "begin with a question, or would you rather hear a short story first?")


def _tts(two_d: bool) -> Any:
    """A loaded PiperTTS whose vocoder is the 2-D rewrite (``two_d``) or the plain graph."""
    import pipeline.vocoder_2d as vocoder_2d
    from pipeline.tts import PiperTTS

    tts = PiperTTS(release_after_s=None)
    original = vocoder_2d.as_2d
    if not two_d:
        vocoder_2d.as_2d = lambda model: None  # type: ignore[assignment]
    try:
        tts.load()
    finally:
        vocoder_2d.as_2d = original
    list(tts.synthesize("Warm up."))
    return tts


def synthesis_ms(tts: Any) -> float:
    """CPU-ms of the calling thread per second of speech for ``TEXT``."""
    t0 = time.thread_time()
    samples = sum(piece.pcm.size for piece in tts.synthesize(TEXT))
    return 1000 * (time.thread_time() - t0) / (samples / tts.sample_rate)


def vocoder_rows(plain: Any, wide: Any, rounds: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for frames in (40, 200):
        z = rng.normal(0, 1, (1, 192, frames)).astype(np.float32)
        ms: dict[str, list[float]] = {"1d": [], "2d": []}
        for r in range(rounds):
            for name, session in (("1d", plain), ("2d", wide))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.thread_time()
                session.run(None, {session.get_inputs()[0].name: z})
                ms[name].append(1000 * (time.thread_time() - t0) / frames)
        diff = float(np.max(np.abs(
            np.asarray(plain.run(None, {plain.get_inputs()[0].name: z})[0])
            - np.asarray(wide.run(None, {wide.get_inputs()[0].name: z})[0]))))
        rows.append({"latent_frames": frames,
                     "ms_per_latent_frame_1d": round(statistics.median(ms["1d"]), 3),
                     "ms_per_latent_frame_2d": round(statistics.median(ms["2d"]), 3),
                     "max_sample_diff": float(f"{diff:.3g}")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    voices = {"2d": _tts(True), "1d": _tts(False)}
    per_s: dict[str, list[float]] = {"1d": [], "2d": []}
    for r in range(args.rounds):
        for name in ("1d", "2d")[:: 1 if r % 2 == 0 else -1]:
            per_s[name].append(synthesis_ms(voices[name]))
    rows = [{"vocoder": name, "cpu_ms_per_s_of_speech": round(statistics.median(v), 2),
             "cpu_ms_per_video_frame": round(statistics.median(v) * 0.04, 3),
             "rounds": [round(x, 2) for x in v]} for name, v in per_s.items()]
    print_table(rows)
    split = {name: tts._split() for name, tts in voices.items()}
    vocoder = vocoder_rows(split["1d"]._vocoder, split["2d"]._vocoder, 5)
    print_table(vocoder)
    path = write_result("tts_cost", {"text_chars": len(TEXT), "synthesis": rows,
                                     "vocoder": vocoder})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
