"""Lip-sync engines: audio in, mouth motion per video frame out (see ``base.py``).

``create_lipsync_engine`` picks the configured engine: the embedded viseme engine (no weights,
real time on a CPU) or Wav2Lip (weights at ``lipsync.wav2lip_model``; a GPU in production).
``SessionLipSync`` is one call's view of it: the configured engine until it fails once, then
a fallback engine (the viseme engine) for the rest of that call; other calls are untouched."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import LipSyncUnavailable
from pipeline.lipsync.base import VISEMES, FrameRenderer, LipSyncEngine, LipTrack, Yuv
from pipeline.lipsync.degrade import DeadlineGuard

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from config import Settings
    from face import IdleTimeline
    from face.library import LoadedAvatar
    from media_tracks.compositor import FramePlan
    from pipeline.tts import SpeechAudio

logger = logging.getLogger(__name__)

__all__ = [
    "VISEMES",
    "FrameRenderer",
    "LipSyncEngine",
    "LipTrack",
    "SessionLipSync",
    "create_lipsync_engine",
    "model_cache_dir",
]


def model_cache_dir(settings: Settings) -> Path:
    cfg = settings.lipsync
    if cfg.model_cache_dir:
        return Path(cfg.model_cache_dir).expanduser()
    return Path(settings.avatars.data_dir) / "models"


def create_lipsync_engine(settings: Settings) -> LipSyncEngine:
    """The engine ``lipsync.engine`` asks for (blocking: loads models).

    ``auto``: Wav2Lip when ``wav2lip_model`` is set and it runs accelerated: on a GPU
    execution provider that is really active (``InferenceSession.get_providers()``), or on
    OpenVINO in bf16 or int8 (several sessions in real time on 2 cores); else (plain ONNX
    Runtime or OpenVINO fp32 on the CPU, about one session at most) the viseme engine.
    ``wav2lip`` without a model, or a model that does not load, is a ``PipelineError`` naming
    the setting."""
    from common.errors import PipelineError
    from pipeline.lipsync.viseme_engine import VisemeEngine

    cfg = settings.lipsync
    if cfg.engine == "viseme":
        return VisemeEngine()
    if cfg.device == "remote":  # the shared inference pool runs the model
        from pipeline.lipsync.remote import remote_wav2lip_engine

        return remote_wav2lip_engine(cfg)
    path = cfg.wav2lip_path
    if path is None:
        if cfg.engine == "wav2lip":
            raise PipelineError(
                "lipsync.engine is wav2lip but lipsync.wav2lip_model is not set: point it at "
                "the Wav2Lip generator weights (.onnx, or a .pth checkpoint such as "
                "wav2lip_gan.pth), or use lipsync.engine: viseme"
            )
        logger.info("lip-sync: viseme engine (no Wav2Lip weights configured)")
        return VisemeEngine()
    from pipeline.lipsync.wav2lip import wav2lip_engine_from_settings

    calibration = None
    if cfg.precision == "int8":
        from pipeline.lipsync.quantize import default_calibration

        calibration = default_calibration(settings)
    engine = wav2lip_engine_from_settings(
        cfg, cache_dir=model_cache_dir(settings), calibration=calibration
    )
    model = engine.model
    fast_cpu = model.backend == "openvino" and model.precision in ("bf16", "int8")
    if cfg.engine == "auto" and not (model.gpu or fast_cpu):
        engine.worker.close()
        logger.warning(
            "lip-sync: Wav2Lip weights are configured but neither a GPU nor OpenVINO in "
            "bf16/int8 is available (%s %s, %s); using the viseme engine. Set "
            "lipsync.engine: wav2lip to run Wav2Lip on the CPU anyway.",
            model.backend,
            model.providers,
            model.precision,
        )
        return VisemeEngine()
    logger.info("lip-sync: %s", engine.info())
    return engine


class SessionLipSync:
    """One session's lip-sync: ``primary`` until it raises once (in ``analyse`` or in a
    renderer's ``render``), then ``fallback`` for the rest of the call. ``on_failure(where,
    exc)`` is called once, at the switch, possibly from a worker thread. Without a fallback
    the primary's errors propagate as before. The engines belong to the caller."""

    def __init__(
        self,
        primary: LipSyncEngine,
        fallback: LipSyncEngine | None,
        *,
        on_failure: Callable[[str, BaseException], None],
        on_degrade: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_degrade(degraded)``: the primary missed its frame deadlines and the fallback
        draws the rest of the utterance (True), or the primary is back (False); see
        ``pipeline.lipsync.degrade``. Only with a fallback, and only for a renderer given a
        count of missed frames."""
        self.primary = primary
        self.fallback = fallback if fallback is not primary else None
        self._on_failure = on_failure
        self._on_degrade = on_degrade
        self._lock = threading.Lock()
        self.failed = False
        self.guard: DeadlineGuard | None = None

    @property
    def engine(self) -> LipSyncEngine:
        """The engine in use now. (While degraded for missed deadlines the primary still
        analyses speech: the fallback draws its plans from their voice level, and the primary
        can take the next utterance back.)"""
        if self.failed and self.fallback is not None:
            return self.fallback
        return self.primary

    @property
    def degraded(self) -> bool:
        """The fallback draws this call for now because the primary missed its deadlines."""
        return self.guard is not None and self.guard.degraded

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def frame_group(self) -> int:
        return self.primary.frame_group  # a call's frame pipeline is set up for the primary

    @property
    def render_lead_ms(self) -> int | None:
        return self.primary.render_lead_ms

    @property
    def schedule_lead_ms(self) -> int | None:
        return self.primary.schedule_lead_ms

    def info(self) -> dict[str, object]:
        return self.engine.info()

    def fail(self, where: str, exc: BaseException) -> None:
        """Switch to the fallback (once; later failures of the primary are ignored)."""
        with self._lock:
            if self.failed:
                return
            self.failed = True
        self._on_failure(where, exc)

    def analyse(self, audio: SpeechAudio, *, fps: int) -> LipTrack:
        engine = self.engine
        if engine is self.fallback or self.fallback is None:
            return engine.analyse(audio, fps=fps)
        try:
            return engine.analyse(audio, fps=fps)
        except Exception as exc:  # noqa: BLE001 - any engine failure: fall back, say so
            self.fail("analyse", exc)
            return self.fallback.analyse(audio, fps=fps)

    def renderer(
        self,
        avatar: LoadedAvatar,
        timeline: IdleTimeline,
        *,
        width: int,
        height: int,
        executor: Executor | None,
        misses: Callable[[], int] | None = None,
    ) -> FrameRenderer:
        """``misses()``: the call's missed frames so far (late or skipped); with it and a
        fallback, a primary that keeps missing deadlines is relieved (``DeadlineGuard``)."""
        primary = self.primary.renderer(
            avatar, timeline, width=width, height=height, executor=executor
        )
        if self.fallback is None:
            return primary
        fallback = self.fallback.renderer(
            avatar, timeline, width=width, height=height, executor=executor
        )
        if misses is not None and self._on_degrade is not None:
            self.guard = DeadlineGuard(misses, self._on_degrade)
        return _FallbackRenderer(self, primary, fallback)

    async def aclose(self) -> None:
        return None  # the engines are shared and closed by their owner


class _FallbackRenderer:
    """Renders with the primary engine's renderer until the session's lip-sync failed; a
    frame whose render raised is rendered by the fallback for the same plan (same idle
    timeline, so the face does not jump), and so is every later frame."""

    def __init__(
        self, guard: SessionLipSync, primary: FrameRenderer, fallback: FrameRenderer
    ) -> None:
        self._guard = guard
        self._primary = primary
        self._fallback = fallback

    async def render(self, plan: FramePlan) -> Yuv:
        deadlines = self._guard.guard
        if not self._guard.failed and (deadlines is None or not deadlines.use_fallback(plan)):
            try:
                return await self._primary.render(plan)
            except asyncio.CancelledError:
                raise
            except LipSyncUnavailable as exc:
                if deadlines is None:
                    self._guard.fail("render", exc)
                else:  # its pool is away for now: degraded, tried again at a later utterance
                    deadlines.unavailable(plan)
                    deadlines.use_fallback(plan)
            except Exception as exc:  # noqa: BLE001 - any engine failure: fall back, say so
                self._guard.fail("render", exc)
        return await self._fallback.render(plan)
