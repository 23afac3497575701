"""Wav2Lip alone, whole crop against the lower-rows copy (``pipeline.lipsync.rows``), per backend
and precision, on one thread (the server's OpenVINO default: streams of one thread each).
A third model, ``cut24``, is the lower-rows rewrite without its 12x12 cut (``start_12=0``: the
24x24 stage runs whole), to show what that cut adds.

The models are compiled side by side and timed in alternating rounds (``--rounds`` of
``--calls`` calls per batch size), so a slower minute of the shared machine hits all alike.
Reports the median ms per frame over the rounds, the saving, and the largest difference of
the rows from ``exact_from`` down against the whole model's (0 for fp32: the same
computation). Writes ``bench/results/wav2lip_rows.json``.

    .venv/bin/python -m bench.wav2lip_rows [--quick] [--configs ov-bf16,ov-fp32,ort-fp32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.common import print_table, write_result
from bench.wav2lip import random_model
from pipeline.lipsync.rows import (
    LOWER_ROWS,
    WHOLE_CROP,
    OutputRows,
    lower_rows_model,
    slice_graph,
)
from pipeline.lipsync.wav2lip import Wav2LipModel

CONFIGS = {"ov-bf16": ("openvino", "bf16"), "ov-fp32": ("openvino", "fp32"),
           "ort-fp32": ("cpu", "fp32")}
BATCHES = (1, 2, 4)


def load(path: Path, device: str, precision: str, cache: Path, rows: OutputRows) -> Wav2LipModel:
    model = Wav2LipModel(path, device=device, precision=precision, intra_op_threads=1,
                         cache_dir=cache, streams=1, rows=rows)
    for b in BATCHES:
        model.warm_up(b)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=12)
    args = ap.parse_args()
    rounds, calls = (2, 4) if args.quick else (args.rounds, args.calls)
    work = Path(tempfile.gettempdir()) / "avatar-bench-wav2lip"
    work.mkdir(exist_ok=True)
    whole_path = random_model(work)
    lower_path = lower_rows_model(whole_path, work / "cache")
    assert lower_path is not None
    proto = onnx.load(str(whole_path))
    assert slice_graph(proto, start_12=0)
    cut24_path = work / "cache" / "wav2lip-cut24-only.onnx"
    onnx.save(proto, str(cut24_path))
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((max(BATCHES), 1, 80, 16)).astype(np.float32)
    face = rng.random((max(BATCHES), 6, 96, 96)).astype(np.float32)
    rows: list[dict[str, Any]] = []
    for name in args.configs.split(","):
        device, precision = CONFIGS[name]
        whole = load(whole_path, device, precision, work / "cache", WHOLE_CROP)
        lower = load(lower_path, device, precision, work / "cache", LOWER_ROWS)
        cut24 = load(cut24_path, device, precision, work / "cache", LOWER_ROWS)
        skip = LOWER_ROWS.exact_from - LOWER_ROWS.first
        exact = whole.run(mel, face)[:, :, LOWER_ROWS.exact_from:]
        diff = max(float(np.abs(m.run(mel, face)[:, :, skip:] - exact).max())
                   for m in (lower, cut24))
        for b in BATCHES:
            times: dict[str, list[float]] = {"whole": [], "cut24": [], "lower": []}
            for _ in range(rounds):
                for label, model in (("whole", whole), ("cut24", cut24), ("lower", lower)):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        model.run(mel[:b], face[:b])
                    times[label].append(1000 * (time.perf_counter() - t0) / calls / b)
            w, lo = statistics.median(times["whole"]), statistics.median(times["lower"])
            c24 = statistics.median(times["cut24"])
            rows.append({
                "config": name, "precision_ran": whole.precision, "batch": b,
                "whole_ms_per_frame": round(w, 2), "cut24_ms_per_frame": round(c24, 2),
                "lower_ms_per_frame": round(lo, 2),
                "saving_pct": round(100 * (1 - lo / w), 1),
                "cut12_saving_pct": round(100 * (1 - lo / c24), 1),
                "whole_range_ms": [round(min(times["whole"]), 2), round(max(times["whole"]), 2)],
                "lower_range_ms": [round(min(times["lower"]), 2), round(max(times["lower"]), 2)],
                "max_abs_diff_exact_rows": round(diff, 6),
            })
            print_table([rows[-1]])
    print(f"\nWav2Lip alone, one thread: whole 96 rows vs rows {LOWER_ROWS.first}-95 "
          f"(exact from {LOWER_ROWS.exact_from})")
    print_table(rows)
    write_result("wav2lip_rows", {
        "rounds": rounds, "calls_per_round": calls, "rows": rows,
        "lower_rows": {"first": LOWER_ROWS.first, "exact_from": LOWER_ROWS.exact_from},
        "note": "random-weight Wav2Lip (real architecture); one thread, one stream; whole, "
        "cut24 (the 24x24 stage whole) and lower compiled side by side, timed in alternating "
        "rounds; saving_pct: lower against whole, cut12_saving_pct: lower against cut24",
    })


if __name__ == "__main__":
    main()
