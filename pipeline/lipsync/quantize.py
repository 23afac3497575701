"""Static int8 Wav2Lip for OpenVINO (``lipsync.precision: int8``, opt-in).

The generator is quantized once with ONNX Runtime's static quantizer (QDQ format: int8
weights per output channel, uint8 activations, min/max calibration); OpenVINO reads the QDQ
model and runs its quantized convolutions in int8. The activation ranges come from real
inputs: crops of the default avatar's face through its idle motion (blinks, glances, head
movement) and mel windows of the bundled voice speaking a few sentences, paired frame by
frame as a session pairs them. The result is cached in ``lipsync.model_cache_dir`` under a
name that hashes the model file and the calibration source, so it is made on the first
start only (about 10-20 s on 2 cores).

WARNING (also in the README): published work on compressed Wav2Lip reports a clear quality
drop for a fully int8 generator, and without real weights it cannot be judged here; the
random-weight tests only bound the numerical difference from fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pipeline.lipsync.backends import derived_model_path
from pipeline.lipsync.wav2lip_io import AvatarFaces, crop_face, mel_track, model_input

if TYPE_CHECKING:
    from config.settings import Settings
    from face import FaceRenderer
    from pipeline.tts import SpeechAudio

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Sample = tuple[F32, F32]  # (mel window (80, 16), face input (6, 96, 96))

CALIBRATION_TEXT = (
    "Hello, and thank you for calling. How can I help you today? "
    "The quick brown fox jumps over the lazy dog. "
    "Please check the weather forecast before you leave for the airport on Thursday. "
    "We measured seven hundred and forty frames a second, which is very good news. "
    "Oh, really? I would love to hear more about your journey through Japan!"
)
VERSION = 1  # bump when the recipe changes: cached int8 models are remade


@dataclass(frozen=True, slots=True)
class Calibration:
    """Where the calibration data comes from (``key``, part of the cache name) and how to
    make it (``samples``, called only when the cached model is missing)."""

    key: str
    samples: Callable[[], list[Sample]]


def calibration_samples(
    face: FaceRenderer,
    speech: Sequence[SpeechAudio],
    *,
    count: int = 64,
    fps: int = 25,
) -> list[Sample]:
    """``count`` (mel, face) pairs: mel windows of ``speech`` taken evenly over its voiced
    frames, each with the avatar's face crop at that frame's time in its idle motion."""
    windows: list[F32] = []
    for audio in speech:
        track = mel_track(audio.pcm, audio.sample_rate, fps)
        voiced = np.flatnonzero(track.level > 0.05)
        windows.extend(track.windows[int(j)] for j in voiced)
    if not windows:
        raise ValueError("no voiced frames in the calibration speech")
    from face import IdleTimeline

    timeline = IdleTimeline(seed=0)  # deterministic: the same avatar gives the same set
    faces = AvatarFaces(face)
    picks = np.linspace(0, len(windows) - 1, count).round().astype(int)
    out: list[Sample] = []
    for k, j in enumerate(picks):
        t_ns = k * 1_000_000_000 // fps * 7  # spread over ~18 s of idle motion
        rgb = face.render(timeline.pose_at(t_ns))
        out.append((windows[j].astype(np.float32), model_input(crop_face(rgb, faces.at(t_ns)))))
    return out


def default_calibration(settings: Settings, *, count: int = 64) -> Calibration:
    """Calibration on the configured default avatar and Piper voice (both loaded lazily)."""
    avatar_name = settings.avatars.default
    voice = settings.engines.piper_voice or "bundled"
    size = f"{settings.media.video_width}x{settings.media.video_height}"
    key = f"{avatar_name}|{voice}|{size}|{count}"

    def samples() -> list[Sample]:
        from face.library import AvatarLibrary
        from pipeline.tts import PiperTTS

        library = AvatarLibrary(
            data_dir=Path(settings.avatars.data_dir),
            width=settings.media.video_width,
            height=settings.media.video_height,
        )
        avatar = library.get(avatar_name)
        voice_path = Path(settings.engines.piper_voice) if settings.engines.piper_voice else None
        tts = PiperTTS(voice_path=voice_path, sample_rate=16_000)
        tts.load()
        speech = list(tts.synthesize(CALIBRATION_TEXT))
        return calibration_samples(avatar.face, speech, count=count, fps=settings.media.fps)

    return Calibration(key=key, samples=samples)


def int8_path(model: Path, cache_dir: Path, calibration_key: str) -> Path:
    return derived_model_path(model, cache_dir, "int8", f"{calibration_key}|v{VERSION}")


def quantized_model(model: Path, cache_dir: Path, calibration: Calibration) -> Path:
    """The int8 QDQ copy of ``model`` for ``calibration``: cached, or made now (blocking)."""
    out = int8_path(model, cache_dir, calibration.key)
    if out.is_file():
        return out
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    samples = calibration.samples()
    logger.info("quantizing %s to int8 on %d calibration frames", model.name, len(samples))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[Sample] = iter(samples)

        def get_next(self) -> dict[str, F32] | None:
            item = next(self._it, None)
            if item is None:
                return None
            mel, face = item
            return {"mel": mel[None, None], "face": face[None]}

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.onnx")
    quantize_static(
        str(model),
        str(tmp),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    tmp.replace(out)
    return out
