"""The Wav2Lip engine: the production lip-sync, an ONNX Runtime session shared by every call.

Per speech segment (``analyse``): the audio is resampled to 16 kHz and turned into the mel
spectrogram Wav2Lip was trained on; video frame ``j`` of the segment gets the 16-column mel
window starting at column ``int(j * 80 / fps)``.

Per video frame (``Wav2LipRenderer.render``): the idle face is rendered (blinks, glances,
breathing stay alive), the square face box is cut out and resized to 96x96, its lower half is
blanked, and [masked, reference] (BGR, /255, as Wav2Lip was trained) goes with the mel window to
the device's one ``BatchWorker``, which runs frames from every live session in one batch. The
96x96 prediction is resized back to the box and blended in through a feathered lower-face mask
(times the cross-fade weight), so the eyes and everything outside the mask keep the idle
frame's exact pixels and no seam shows.

The generator runs where ``lipsync.device`` says (``pipeline.lipsync.backends``): a GPU
through ONNX Runtime (TensorRT, then CUDA) in float16, OpenVINO on the CPU (bf16 where the CPU
has it, int8 when asked), or plain ONNX Runtime on the CPU in fp32. What really runs is logged
and reported by ``info()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from common.errors import PipelineError
from face.yuv import flash_i420, rgb_to_i420
from media_tracks.frames import SameTurnJobs
from pipeline.lipsync.backends import Runner, load_runner
from pipeline.lipsync.base import Yuv
from pipeline.lipsync.batching import BatchWorker
from pipeline.lipsync.mel import MEL_STEP
from pipeline.lipsync.model_frames import ModelFrames
from pipeline.lipsync.rows import LOWER_ROWS, WHOLE_CROP, OutputRows
from pipeline.lipsync.wav2lip_io import (
    FACE_SIZE,
    AvatarFaces,
    FaceGeometry,
    MelTrack,
    crop_face,
    mel_track,
    model_input,
    paste,
)

if TYPE_CHECKING:
    from config.sections import LipsyncSettings
    from face import FaceRenderer, IdleTimeline
    from face.library import LoadedAvatar
    from media_tracks.compositor import FramePlan
    from pipeline.lipsync.quantize import Calibration
    from pipeline.tts import SpeechAudio

logger = logging.getLogger(__name__)

_GENERATOR_HINT = "point it at the Wav2Lip generator weights (wav2lip_gan.pth or their ONNX export)"

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

class Wav2LipModel:
    """The Wav2Lip generator on the backend ``device`` and ``precision`` select
    (``pipeline.lipsync.backends``): ``run(mel, face)`` on batches; ``backend``,
    ``providers``, ``gpu`` and ``precision`` say what really runs, ``rows`` which rows of the
    crop the file outputs (``pipeline.lipsync.rows``)."""

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        fp16: bool = True,
        intra_op_threads: int = 0,
        cache_dir: Path | None = None,
        calibration: Calibration | None = None,
        streams: int = 0,
        rows: OutputRows = WHOLE_CROP,
        runner: Runner | None = None,
    ) -> None:
        """``runner``: one already made (the inference pool's, ``pipeline.lipsync.remote``)
        instead of loading ``path``."""
        self.path = Path(path)
        self.rows = rows
        cache = cache_dir or self.path.parent
        int8_model = None
        if calibration is not None:
            from pipeline.lipsync.quantize import quantized_model

            def int8_model() -> Path:
                return quantized_model(self.path, cache, calibration)

        self.runner: Runner = runner or load_runner(
            self.path,
            device=device,
            precision=precision,
            fp16=fp16,
            intra_op_threads=intra_op_threads,
            cache_dir=cache,
            int8_model=int8_model,
            streams=streams,
        )
        self.backend = self.runner.backend
        self.providers: list[str] = list(self.runner.providers)
        self.gpu = self.runner.gpu
        self.precision = self.runner.precision
        names = self.runner.inputs
        if sorted(names) != ["face", "mel"]:
            raise PipelineError(
                f"lipsync.wav2lip_model: {self.path.name} has inputs {names}; expected 'mel' "
                "and 'face' (export .pth checkpoints through this server, which names them)"
            )
        logger.info(
            "Wav2Lip %s loaded: %s %s, %s",
            self.path.name,
            self.backend,
            self.providers,
            self.precision,
        )

    def run(self, mel: F32, face: F32) -> F32:
        """mel (B, 1, 80, 16), face (B, 6, 96, 96) -> (B, 3, rows.height, 96) BGR 0..1: the
        crop's rows ``rows.first`` .. 95 (all 96 for a whole-crop model)."""
        return self.runner.run(mel, face)

    def warm_up(self, batch: int = 1) -> float:
        """Run once (allocations, kernel selection); returns the seconds it took. Raises
        PipelineError when the output is not the shape ``rows`` says."""
        t0 = time.perf_counter()
        out = self.run(
            np.zeros((batch, 1, 80, MEL_STEP), np.float32),
            np.zeros((batch, 6, FACE_SIZE, FACE_SIZE), np.float32),
        )
        want = (batch, 3, self.rows.height, FACE_SIZE)
        if tuple(out.shape) != want:
            raise PipelineError(
                f"lipsync.wav2lip_model: {self.path.name} outputs {tuple(out.shape)} for a "
                f"batch of {batch}, expected {want}; {_GENERATOR_HINT}"
            )
        return time.perf_counter() - t0


FrameJob = tuple[F32, F32]  # (mel window (80, 16), face input (6, 96, 96))
_Paste = tuple[U8, FaceGeometry, float]  # (idle frame, face box and mask, cross-fade weight)


def run_batch(model: Wav2LipModel, jobs: Sequence[FrameJob]) -> list[F32]:
    mel = np.stack([m for m, _ in jobs])[:, None].astype(np.float32, copy=False)
    face = np.stack([f for _, f in jobs]).astype(np.float32, copy=False)
    out = model.run(mel, face)
    return [out[i] for i in range(len(jobs))]


# --------------------------------------------------------------------------- the engine


class Wav2LipEngine:
    """``LipSyncEngine`` running Wav2Lip: one model and one batching worker per server."""

    name = "wav2lip"

    def __init__(
        self,
        model: Wav2LipModel,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 4.0,
        frame_group: int = 1,
        render_lead_ms: int | None = None,
        schedule_lead_ms: int | None = None,
    ) -> None:
        self.model = model
        self.frame_group = max(1, frame_group)
        self.render_lead_ms = render_lead_ms
        self.schedule_lead_ms = schedule_lead_ms
        self.worker: BatchWorker[FrameJob, F32] = BatchWorker(
            lambda jobs: run_batch(model, jobs),
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            name="wav2lip-worker",
            workers=model.runner.streams,
        )
        # per avatar, while a call's renderer holds it: an avatar no call uses (and the library
        # unloaded) is not kept alive here
        self._faces: weakref.WeakValueDictionary[int, AvatarFaces] = weakref.WeakValueDictionary()
        self._faces_lock = threading.Lock()

    def info(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "model": self.model.path.name,
            "backend": self.model.backend,
            "providers": self.model.providers,
            "device": "gpu" if self.model.gpu else "cpu",
            "precision": self.model.precision,
            "rows": {"first": self.model.rows.first, "exact_from": self.model.rows.exact_from},
            "threads": self.model.runner.threads,
            "streams": self.model.runner.streams,
            "max_batch": self.worker.max_batch,
            "max_wait_ms": round(self.worker.max_wait_s * 1000, 3),
            "frame_group": self.frame_group,
            "render_lead_ms": self.render_lead_ms,
            "schedule_lead_ms": self.schedule_lead_ms,
            "batching": self.worker.stats.to_dict(),
            "queue_depth": self.worker.queue_depth,
        }

    def analyse(self, audio: SpeechAudio, *, fps: int) -> MelTrack:
        return mel_track(audio.pcm, audio.sample_rate, fps)

    def faces(self, face: FaceRenderer) -> AvatarFaces:
        with self._faces_lock:
            found = self._faces.get(id(face))
            if found is None or found._face is not face:
                found = AvatarFaces(face, self.model.rows.exact_from)
                self._faces[id(face)] = found
            return found

    def renderer(
        self,
        avatar: LoadedAvatar,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
    ) -> Wav2LipRenderer:
        return Wav2LipRenderer(
            self, avatar.face, timeline, width=width, height=height, executor=executor
        )

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.close)


class Wav2LipRenderer:
    """One session's frames: idle face, then (while speaking) Wav2Lip's mouth pasted in."""

    def __init__(
        self,
        engine: Wav2LipEngine,
        face: FaceRenderer,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
    ) -> None:
        self._engine = engine
        self._face = face
        self._timeline = timeline
        self._flash = flash_i420(width, height)
        self._faces = engine.faces(face)
        # a group's frames (``frame_group``) hand over together: an idle group is one job on
        # one thread (``SameTurnJobs``); a speaking group goes through its preparation, the
        # model and the paste off the loop, which is woken once for it (``ModelFrames``)
        self._idle_jobs: SameTurnJobs[FramePlan, Yuv] = SameTurnJobs(self.idle_i420, executor)
        self._speaking: ModelFrames[FramePlan, _Paste, FrameJob, F32, Yuv] = ModelFrames(
            self._prepare, self._finish, engine.worker, executor)

    def idle_rgb(self, plan: FramePlan) -> U8:
        return self._face.render(self._timeline.pose_at(plan.t_ns))

    def idle_i420(self, plan: FramePlan) -> Yuv:
        """``rgb_to_i420(idle_rgb(plan))``, drawn without a whole RGB frame."""
        return self._face.render_i420(self._timeline.pose_at(plan.t_ns))

    def _prepare(self, plan: FramePlan) -> tuple[_Paste, FrameJob]:
        """The idle frame, its face box and the cross-fade weight (for the paste), and the
        model's item: the frame's mel window and face input."""
        rgb = self.idle_rgb(plan)
        geo = self._faces.at(plan.t_ns)
        mel = np.asarray(plan.lips, dtype=np.float32)
        return (rgb, geo, float(plan.blend)), (mel, model_input(crop_face(rgb, geo)))

    @staticmethod
    def _finish(job: _Paste, pred: F32) -> Yuv:
        rgb, geo, blend = job
        return rgb_to_i420(paste(rgb, pred, geo, blend, copy=False))  # rgb is ours alone

    async def render(self, plan: FramePlan) -> Yuv:
        if plan.flash:
            return self._flash
        if plan.lips is None or plan.blend <= 0.0:
            return await self._idle_jobs(plan)
        return await self._speaking(plan)


def wav2lip_engine_from_settings(
    lipsync: LipsyncSettings, *, cache_dir: Path, calibration: Calibration | None = None
) -> Wav2LipEngine:
    """The engine the ``lipsync`` section describes (``wav2lip_model`` must be set)."""
    if lipsync.wav2lip_path is None:
        raise ValueError("lipsync.wav2lip_model is not set")
    return load_wav2lip_engine(
        lipsync.wav2lip_path, cache_dir=cache_dir, device=lipsync.device,
        precision=lipsync.precision, fp16=lipsync.fp16,
        intra_op_threads=lipsync.intra_op_threads, max_batch=lipsync.max_batch,
        max_wait_ms=lipsync.max_wait_ms, calibration=calibration, streams=lipsync.streams,
        frame_group=lipsync.frame_group, render_lead_ms=lipsync.render_lead_ms,
        schedule_lead_ms=lipsync.schedule_lead_ms, lower_face_only=lipsync.lower_face_only,
    )


def load_wav2lip_model(
    model_path: Path,
    *,
    cache_dir: Path,
    device: str = "auto",
    precision: str = "auto",
    fp16: bool = True,
    intra_op_threads: int = 0,
    max_batch: int = 16,
    calibration: Calibration | None = None,
    streams: int = 0,
    lower_face_only: bool = True,
) -> Wav2LipModel:
    """Resolve (``.pth`` -> cached ONNX), load and warm up the model. Blocking.

    ``lower_face_only``: run the cached lower-rows copy (``pipeline.lipsync.rows``) when the
    graph is Wav2Lip's; else, or when it cannot be made, the whole crop."""
    from pipeline.lipsync.rows import lower_rows_model
    from pipeline.lipsync.wav2lip_model import resolve_wav2lip_model

    onnx_path = resolve_wav2lip_model(Path(model_path), Path(cache_dir))
    rows = WHOLE_CROP
    if lower_face_only:
        try:
            lower = lower_rows_model(onnx_path, Path(cache_dir))
        except Exception as exc:  # noqa: BLE001 - the whole crop still works; say so
            logger.warning(
                "cannot make the lower-rows copy of %s (%s); running the whole crop "
                "(check lipsync.model_cache_dir)",
                onnx_path.name,
                exc,
            )
            lower = None
        if lower is not None:
            onnx_path, rows = lower, LOWER_ROWS
    model = Wav2LipModel(
        onnx_path,
        device=device,
        precision=precision,
        fp16=fp16,
        intra_op_threads=intra_op_threads,
        cache_dir=Path(cache_dir),
        calibration=calibration,
        streams=streams,
        rows=rows,
    )
    model.warm_up()
    if model.backend == "openvino":
        # OpenVINO prepares each new batch size on first use (+20-40 ms on 2 cores): do it
        # now for every size the worker can make, not inside a call
        for batch in range(2, max_batch + 1):
            model.warm_up(batch)
    return model


def load_wav2lip_engine(
    model_path: Path,
    *,
    cache_dir: Path,
    device: str = "auto",
    precision: str = "auto",
    fp16: bool = True,
    intra_op_threads: int = 0,
    max_batch: int = 16,
    max_wait_ms: float = 4.0,
    calibration: Calibration | None = None,
    streams: int = 0,
    frame_group: int = 1,
    render_lead_ms: int | None = None,
    schedule_lead_ms: int | None = None,
    lower_face_only: bool = True,
) -> Wav2LipEngine:
    """Resolve (``.pth`` -> cached ONNX), load and warm up the model (``load_wav2lip_model``),
    and the engine around it. Blocking."""
    model = load_wav2lip_model(
        model_path, cache_dir=cache_dir, device=device, precision=precision, fp16=fp16,
        intra_op_threads=intra_op_threads, max_batch=max_batch, calibration=calibration,
        streams=streams, lower_face_only=lower_face_only)
    return Wav2LipEngine(
        model,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        frame_group=frame_group,
        render_lead_ms=render_lead_ms,
        schedule_lead_ms=schedule_lead_ms,
    )
