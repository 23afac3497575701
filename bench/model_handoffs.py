"""What a Wav2Lip speaking frame's hand-offs between threads cost the event loop, in one
process, without WebRTC (whose packets make a call's numbers swing by more than this).

Two renderers of one session run the same frames, paced like a call's producer (a group of
``lipsync.frame_group`` = 2 frames every 80 ms, a group's frames handed over together):

* ``awaits``: the chain as it was until ModelFrames: the loop awaits the preparation (one
  executor job per group), then the worker (per frame), then the paste (one job per group);
* ``chained``: ``Wav2LipRenderer`` as it is: ``pipeline.lipsync.model_frames.ModelFrames``
  hands the frame from thread to thread and wakes the loop once per group.

Both use the real renderer steps and one batching worker; rounds alternate the order. The
model is a one-node graph with Wav2Lip's inputs and output (``--model`` takes a real one):
what is measured is everything but the model. Reported: CPU-ms per frame of the whole
process and of the event loop's thread.

    .venv/bin/python -m bench.model_handoffs [--frames 250] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from face.library import AvatarLibrary
from media_tracks.compositor import FramePlan
from media_tracks.frames import SameTurnJobs
from pipeline.lipsync.wav2lip import Wav2LipEngine, Wav2LipRenderer, load_wav2lip_engine
from pipeline.tts import SpeechAudio

GROUP = 2
FPS = 25


class AwaitingRenderer(Wav2LipRenderer):
    """The speaking frame's three steps, each awaited from the loop (the code before)."""

    def __init__(self, engine: Wav2LipEngine, *args: Any, executor: Executor, **kw: Any) -> None:
        super().__init__(engine, *args, executor=executor, **kw)
        self._prepare_jobs: SameTurnJobs[FramePlan, Any] = SameTurnJobs(self._prepare, executor)
        self._finish_jobs: SameTurnJobs[Any, Any] = SameTurnJobs(
            lambda job: self._finish(*job), executor)

    async def render(self, plan: FramePlan) -> Any:
        worker = self._engine.worker
        worker.announce()
        try:
            paste, item = await self._prepare_jobs(plan)
        except BaseException:
            worker.withdraw()
            raise
        pred = await worker.run(item, announced=True)
        return await self._finish_jobs((paste, pred))


def tiny_model(path: Path) -> Path:
    """A graph with Wav2Lip's inputs and output that costs nothing: sigmoid(face[:, :3])."""
    import onnx
    from onnx import TensorProto, helper

    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
            for n, v in (("start", 0), ("end", 3), ("axis", 1))]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["face", "start", "end", "axis"], ["rgb"]),
         helper.make_node("Sigmoid", ["rgb"], ["frames"])],
        "tiny",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["b", 1, 80, 16]),
         helper.make_tensor_value_info("face", TensorProto.FLOAT, ["b", 6, 96, 96])],
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["b", 3, 96, 96])],
        initializer=ints,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def thread_cpu_s(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def paced(renderer: Wav2LipRenderer, lips: Any, n: int, loop_tid: int) -> tuple[float, float]:
    """CPU-ms per frame (process, loop thread) for ``n`` frames handed over as a call does."""
    c0, l0, t0 = time.process_time(), thread_cpu_s(loop_tid), time.monotonic()
    frames: list[asyncio.Future[Any]] = []
    for g in range(0, n, GROUP):
        await asyncio.sleep(max(0.0, t0 + g / FPS - time.monotonic()))
        for k in range(g, g + GROUP):
            plan = FramePlan(index=k, t_ns=k * 1_000_000_000 // FPS, blend=1.0, mouth=1.0,
                             lips=lips.at(k % lips.n_frames))
            frames.append(asyncio.ensure_future(renderer.render(plan)))
    await asyncio.gather(*frames)
    return (1e3 * (time.process_time() - c0) / n, 1e3 * (thread_cpu_s(loop_tid) - l0) / n)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="", help="a Wav2Lip ONNX file (default: the tiny graph)")
    ap.add_argument("--device", default="openvino")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    model = Path(args.model) if args.model else tiny_model(work / "tiny.onnx")
    engine = load_wav2lip_engine(model, cache_dir=work / "cache", device=args.device,
                                 precision="auto", frame_group=GROUP)
    avatar = AvatarLibrary(data_dir=work / "data", width=512, height=512).get("default")
    pcm = (np.sin(np.arange(48_000 * 4) * (2 * np.pi * 220 / 48_000)) * 8000).astype(np.int16)
    lips = engine.analyse(SpeechAudio(text="", pcm=pcm, sample_rate=48_000), fps=FPS)
    pool = ThreadPoolExecutor(2, thread_name_prefix="render")
    loop_tid = threading.get_native_id()
    renderers: dict[str, Wav2LipRenderer] = {
        "awaits": AwaitingRenderer(engine, avatar.face, avatar.new_timeline(), width=512,
                                   height=512, executor=pool),
        "chained": Wav2LipRenderer(engine, avatar.face, avatar.new_timeline(), width=512,
                                   height=512, executor=pool),
    }
    try:
        for r in renderers.values():  # warm up
            await paced(r, lips, 50, loop_tid)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in renderers}
        for rnd in range(args.rounds):
            order = list(renderers) if rnd % 2 == 0 else list(renderers)[::-1]
            for name in order:
                runs[name].append(await paced(renderers[name], lips, args.frames, loop_tid))
                print(f"round {rnd} {name}: process {runs[name][-1][0]:.3f}, loop "
                      f"{runs[name][-1][1]:.3f} CPU-ms a frame", flush=True)
    finally:
        engine.worker.close()
        pool.shutdown()
    rows = [{"chain": name,
             "process_cpu_ms_per_frame": round(float(np.median([p for p, _ in v])), 3),
             "loop_cpu_ms_per_frame": round(float(np.median([lp for _, lp in v])), 3),
             "loop_each_round": [round(lp, 3) for _, lp in v]}
            for name, v in runs.items()]
    print_table([{k: v for k, v in r.items() if k != "loop_each_round"} for r in rows])
    write_result("model_handoffs", {"frames": args.frames, "rounds": args.rounds,
                                    "model": model.name, "device": args.device,
                                    "medians": rows})


if __name__ == "__main__":
    asyncio.run(main())
