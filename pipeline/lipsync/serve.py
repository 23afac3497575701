"""The shared lip-sync inference pool: Wav2Lip on a Ray Serve deployment that every media node
sends its batches to (``lipsync.device: remote`` on the nodes; docs/scale-out.md).

``python -m pipeline.lipsync.serve [--config FILE] [--host H] [--port N] [--replicas N]
[--address RAY_ADDRESS]`` starts a local Ray instance (or joins the one at ``--address``),
deploys ``--replicas`` copies of the model that ``lipsync.wav2lip_model`` names (on
``lipsync.device``: CUDA when there, OpenVINO on a CPU), and serves it at
``http://H:N/wav2lip`` until SIGTERM. With ``serve run``:
``serve run pipeline.lipsync.serve:app_builder config=my.yaml replicas=2``.

Each replica batches the requests of every node together (``@serve.batch``, counted in frames
up to ``lipsync.max_batch``, waiting at most ``lipsync.max_wait_ms``) and runs the batch on a
thread, so the replica keeps reading requests meanwhile. The wire format is
``pipeline.lipsync.remote``'s. ``GET /wav2lip`` answers what runs (backend, precision, output
rows) and the counters (batches, frames, busy seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from config import ConfigError, Settings, load_settings
from pipeline.lipsync.remote import decode_batch, encode_answer

ROUTE = "/wav2lip"


def _frames(batches: list[tuple[np.ndarray, np.ndarray]]) -> int:
    return sum(int(mel.shape[0]) for mel, _ in batches)


@serve.deployment(name="wav2lip", max_ongoing_requests=64)
class Wav2LipPool:
    """One replica: the model, loaded once, and the batching across every node's requests."""

    def __init__(self, options: dict[str, Any]) -> None:
        from pipeline.lipsync.wav2lip import load_wav2lip_model

        self.model = load_wav2lip_model(
            Path(options["model"]), cache_dir=Path(options["cache_dir"]),
            device=options["device"], precision=options["precision"], fp16=options["fp16"],
            intra_op_threads=options["intra_op_threads"], max_batch=options["max_batch"],
            streams=options["streams"], lower_face_only=options["lower_face_only"])
        batching: Any = self.infer  # serve.batch's handler: its limits from the config
        batching.set_max_batch_size(options["max_batch"])
        batching.set_batch_wait_timeout_s(options["max_wait_ms"] / 1000.0)
        self.batches = self.frames = 0
        self.busy_s = 0.0

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"model": m.path.name, "backend": m.backend, "providers": m.providers,
                "gpu": m.gpu, "precision": m.precision,
                "rows": {"first": m.rows.first, "exact_from": m.rows.exact_from},
                "batches": self.batches, "frames": self.frames,
                "busy_s": round(self.busy_s, 3)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004, batch_size_fn=_frames)
    async def infer(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        mel = np.concatenate([m for m, _ in batches])
        face = np.concatenate([f for _, f in batches])
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self.model.run, mel, face)
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.frames += int(mel.shape[0])
        split = np.cumsum([m.shape[0] for m, _ in batches])[:-1]
        return list(np.split(out, split))

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.describe())
        body = await request.body()
        try:
            mel, face = decode_batch(body)
        except ValueError as exc:
            return JSONResponse({"error": "bad_batch", "detail": str(exc)}, status_code=400)
        return Response(encode_answer(await self.infer((mel, face))),
                        media_type="application/octet-stream")


def pool_options(settings: Settings) -> dict[str, Any]:
    """What a replica loads, from the ``lipsync`` section (the pool's own config)."""
    from pipeline.lipsync import model_cache_dir

    cfg = settings.lipsync
    if cfg.wav2lip_path is None:
        raise ConfigError("lipsync.wav2lip_model", "the pool needs the Wav2Lip generator "
                          "weights (.onnx or .pth)")
    if cfg.device == "remote":
        raise ConfigError("lipsync.device", "the pool itself runs the model; set auto, "
                          "cuda, openvino or cpu in its config")
    return {"model": str(cfg.wav2lip_path), "cache_dir": str(model_cache_dir(settings)),
            "device": cfg.device, "precision": cfg.precision, "fp16": cfg.fp16,
            "intra_op_threads": cfg.intra_op_threads, "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms, "streams": cfg.streams,
            "lower_face_only": cfg.lower_face_only}


def build(settings: Settings, *, replicas: int = 1, gpus: float = 0.0) -> Any:
    """The Serve application: ``replicas`` copies of the model (each on ``gpus`` GPUs)."""
    return Wav2LipPool.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_gpus": gpus},
    ).bind(pool_options(settings))


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run pipeline.lipsync.serve:app_builder config=FILE replicas=N gpus=G``."""
    config = args.get("config")
    settings = load_settings(config_file=Path(config) if config else None)
    return build(settings, replicas=int(args.get("replicas", 1)),
                 gpus=float(args.get("gpus", 0)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.lipsync.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a YAML file overriding config/defaults.yaml")
    p.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    args = p.parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        app = build(settings, replicas=args.replicas, gpus=args.gpus)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:  # its own node, on the listening address (no route to the outside needed)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address=args.host if args.host != "0.0.0.0" else None)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="wav2lip", route_prefix=ROUTE)
    print(f"wav2lip pool on http://{args.host}:{args.port}{ROUTE}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
