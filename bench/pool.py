"""The shared inference pool against the in-process engine: Wav2Lip (the random-weight network of
the real architecture, OpenVINO on this CPU) behind Ray Serve (``python -m
pipeline.lipsync.serve``, one replica) or in the server's own process.

1. Round trip per batch: one batch of B frames through the pool (encode, HTTP, Serve's proxy,
   the replica's batcher, the model, the answer) against ``model.run`` in process, alternately,
   medians over ``--rounds``.
2. Throughput: frames/s of one replica fed by two node processes (each ``--senders`` threads
   sending frame groups of 2 in a closed loop, as calls do) against the in-process batcher
   (``BatchWorker``, the same settings) fed by the same number of senders, on the same cores.

Run: ``unshare --net bash -c 'ip link set lo up; .venv/bin/python -m bench.pool'``"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, free_port, print_table, write_result

GROUP = 2  # frames a call hands over at once (lipsync.frame_group)


def inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.lipsync.wav2lip_io import model_input

    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((n, 1, 80, 16)).astype(np.float32)
    crops = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    return mel, np.stack([model_input(c) for c in crops])


def model_file() -> tuple[Path, Path]:
    from pipeline.lipsync.wav2lip_model import write_random_wav2lip_onnx

    work = Path(tempfile.gettempdir()) / "avatar-bench-wav2lip"
    work.mkdir(exist_ok=True)
    model = work / "wav2lip-random.onnx"
    if not model.exists():
        write_random_wav2lip_onnx(model, seed=0)
    return model, work / "cache"


def cpu_flags() -> list[str]:
    """The CPU's bf16 and AMX flags (what OpenVINO can use)."""
    text = Path("/proc/cpuinfo").read_text()
    return sorted({f for f in text.split() if f.startswith(("amx", "avx512_bf16"))})


def senders_loop(run: Any, senders: int, seconds: float) -> int:
    """Frames done by ``senders`` threads each calling ``run(mel, face)`` with groups of 2
    for ``seconds``."""
    mel, face = inputs(GROUP)
    done = [0] * senders
    stop = time.monotonic() + seconds

    def go(i: int) -> None:
        while time.monotonic() < stop:
            run(mel, face)
            done[i] += GROUP

    threads = [threading.Thread(target=go, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def client(url: str, senders: int, seconds: float) -> None:
    from pipeline.lipsync.remote import RemoteRunner

    runner = RemoteRunner(url, timeout_s=30, streams=senders)
    print(json.dumps({"frames": senders_loop(runner.run, senders, seconds)}), flush=True)


def start_pool(model: Path, cache: Path, max_batch: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AVATAR_LIPSYNC__WAV2LIP_MODEL": str(model),
           "AVATAR_LIPSYNC__MODEL_CACHE_DIR": str(cache), "AVATAR_LIPSYNC__DEVICE": "openvino",
           "AVATAR_LIPSYNC__MAX_BATCH": str(max_batch), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.lipsync.serve", "--port",
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/wav2lip"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the pool did not start")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--senders", type=int, default=4, help="sending threads per node")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args()
    if args.client:
        client(args.client, args.senders, args.seconds)
        return
    from pipeline.lipsync.batching import BatchWorker
    from pipeline.lipsync.remote import RemoteRunner
    from pipeline.lipsync.wav2lip import load_wav2lip_model, run_batch

    model_path, cache = model_file()
    model = load_wav2lip_model(model_path, cache_dir=cache, device="openvino",
                               max_batch=args.max_batch)
    proc, url = start_pool(model_path, cache, args.max_batch)
    try:
        runner = RemoteRunner(url, timeout_s=30)
        trips = []
        for b in (1, 2, 4, 8):
            mel, face = inputs(b, seed=b)
            runner.run(mel, face)
            model.run(mel, face)
            there, here = [], []
            for _ in range(args.rounds):
                t = time.perf_counter()
                runner.run(mel, face)
                there.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.run(mel, face)
                here.append(time.perf_counter() - t)
            trips.append({"batch": b, "pool_ms": round(statistics.median(there) * 1000, 1),
                          "in_process_ms": round(statistics.median(here) * 1000, 1),
                          "added_ms": round((statistics.median(there)
                                             - statistics.median(here)) * 1000, 1)})
        print_table(trips)
        # throughput: two node processes on the pool, then the in-process batcher
        before = json.loads(urllib.request.urlopen(url, timeout=5).read())
        nodes = [subprocess.Popen([sys.executable, "-m", "bench.pool", "--client", url,
                                   "--senders", str(args.senders), "--seconds",
                                   str(args.seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        frames_pool = sum(json.loads(n.communicate(timeout=args.seconds + 120)[0]
                                     .strip().splitlines()[-1])["frames"] for n in nodes)
        info = json.loads(urllib.request.urlopen(url, timeout=5).read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    worker: BatchWorker[Any, Any] = BatchWorker(lambda jobs: run_batch(model, jobs),
                                                max_batch=args.max_batch, max_wait_s=0.004,
                                                name="bench-batcher",
                                                workers=model.runner.streams)

    def in_process(mel: np.ndarray, face: np.ndarray) -> None:
        futures = [worker.submit((mel[i, 0], face[i])) for i in range(mel.shape[0])]
        for f in futures:
            f.result()

    frames_local = senders_loop(in_process, 2 * args.senders, args.seconds)
    worker.close()
    row = {"senders": 2 * args.senders, "seconds": args.seconds,
           "pool_fps": round(frames_pool / args.seconds, 1),
           "in_process_fps": round(frames_local / args.seconds, 1),
           "pool_vs_in_process": round(frames_pool / max(1, frames_local), 3),
           # the replica's model batches while the nodes sent (frames per run, share of time)
           "pool_mean_batch": round((info["frames"] - before["frames"])
                                    / max(1, info["batches"] - before["batches"]), 2),
           "pool_busy_share": round((info["busy_s"] - before["busy_s"]) / args.seconds, 2)}
    print_table([row])
    path = write_result("pool", {"round_trip": trips, "throughput": row,
                                 "backend": f"{model.backend} {model.precision}",
                                 "cpu_flags": cpu_flags(),
                                 "note": "pool, nodes and batcher share the same cores"})
    print(path)


if __name__ == "__main__":
    main()
