"""Lip-sync engines: audio in, mouth motion per video frame out (see ``base.py``).

``create_lipsync_engine`` picks the configured engine: the embedded viseme engine (no weights,
real time on a CPU) or Wav2Lip (weights at ``lipsync.wav2lip_model``; a GPU in production)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.lipsync.base import VISEMES, FrameRenderer, LipSyncEngine, LipTrack

if TYPE_CHECKING:
    from config import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "VISEMES",
    "FrameRenderer",
    "LipSyncEngine",
    "LipTrack",
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

    ``auto``: Wav2Lip when ``wav2lip_model`` is set and a GPU execution provider is really
    active (``InferenceSession.get_providers()``), else the viseme engine. ``wav2lip`` without a
    model, or a model that does not load, is a ``PipelineError`` naming the setting."""
    from pipeline.errors import PipelineError
    from pipeline.lipsync.viseme_engine import VisemeEngine

    cfg = settings.lipsync
    if cfg.engine == "viseme":
        return VisemeEngine()
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
    from pipeline.lipsync.wav2lip import load_wav2lip_engine

    engine = load_wav2lip_engine(
        path,
        cache_dir=model_cache_dir(settings),
        device=cfg.device,
        fp16=cfg.fp16,
        intra_op_threads=cfg.intra_op_threads,
        max_batch=cfg.max_batch,
        max_wait_ms=cfg.max_wait_ms,
    )
    if cfg.engine == "auto" and not engine.model.gpu:
        engine.worker.close()
        logger.warning(
            "lip-sync: Wav2Lip weights are configured but no GPU provider is active "
            "(onnxruntime uses %s); using the viseme engine. Set lipsync.engine: wav2lip to "
            "run Wav2Lip on the CPU anyway.",
            engine.model.providers,
        )
        return VisemeEngine()
    logger.info("lip-sync: %s", engine.info())
    return engine
