"""Listening: Silero voice activity (ONNX Runtime) and endpointing of the microphone stream.

Audio here is float32 mono at 16 kHz in -1..1. Times are ms of audio fed to the stream (the
mic's media clock, not wall clock). ``Listener`` is pure CPU (well under 0.5 ms per 32 ms
chunk); the caller runs it off the event loop, in an executor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from common.errors import PipelineError

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 512  # Silero's window at 16 kHz: 32 ms
CONTEXT_SAMPLES = 64  # tail of the previous chunk the model sees before each chunk
# Quiet chunks skip the model only after this many in a row (320 ms): by then the
# endpointer has seen the end of the speech through Silero itself (its own hangover, the
# pause and the short turn end), so no decision about a word's end rests on a skipped chunk
QUIET_AFTER_CHUNKS = 10


def default_vad_model_path() -> Path:
    """The Silero VAD v6 ONNX model shipped inside the faster-whisper package."""
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"


class SileroVad:
    """One shared ONNX Runtime session (CPU, 1 intra-op and 1 inter-op thread); per-session
    recurrent state lives in the ``VadStream``s it hands out."""

    def __init__(self, model_path: Path | None = None) -> None:
        import onnxruntime as ort

        path = model_path or default_vad_model_path()
        if not path.is_file():
            raise PipelineError(
                f"Silero VAD model not found: {path} (is faster-whisper installed?)"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        self.model_path = path
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        names = {i.name for i in self.session.get_inputs()}
        # faster-whisper's export: input [n, 576], h and c [1, 1, 128] -> speech_probs, hn, cn.
        # The upstream silero export: input [1, 576], state [2, 1, 128], sr -> output, stateN.
        if {"input", "h", "c"} <= names:
            self.state_layout = "hc"
        elif {"input", "state", "sr"} <= names:
            self.state_layout = "state"
        else:
            raise PipelineError(f"{path.name}: unexpected Silero VAD inputs {sorted(names)}")

    def new_stream(self) -> VadStream:
        return VadStream(self)


class VadStream:
    """Speech probability per 32 ms chunk of one audio stream (holds the recurrent state)."""

    def __init__(self, vad: SileroVad) -> None:
        self._vad = vad
        self.reset()

    def reset(self) -> None:
        """Forget the stream's past (state and context), as at the start of a new stream."""
        self._context = np.zeros((1, CONTEXT_SAMPLES), np.float32)
        if self._vad.state_layout == "hc":
            self._h = np.zeros((1, 1, 128), np.float32)
            self._c = np.zeros((1, 1, 128), np.float32)
        else:
            self._state = np.zeros((2, 1, 128), np.float32)

    def prob(self, chunk: np.ndarray) -> float:
        """Speech probability (0..1) of ``chunk``: float32 [512] at 16 kHz."""
        if chunk.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"VAD chunk must be {CHUNK_SAMPLES} samples, got {chunk.shape}")
        x = np.concatenate([self._context, chunk.reshape(1, -1).astype(np.float32, copy=False)], 1)
        self._context = x[:, -CONTEXT_SAMPLES:]
        if self._vad.state_layout == "hc":
            out, self._h, self._c = self._vad.session.run(
                None, {"input": x, "h": self._h, "c": self._c}
            )
        else:
            out, self._state = self._vad.session.run(
                None, {"input": x, "state": self._state, "sr": np.array(SAMPLE_RATE, np.int64)}
            )
        return float(np.asarray(out).reshape(-1)[0])

    def skip(self, chunk: np.ndarray) -> None:
        """Let ``chunk`` pass without the model: it becomes the next chunk's context, and the
        recurrent state stays as it is."""
        self._context = chunk[-CONTEXT_SAMPLES:].reshape(1, -1).astype(np.float32)


# --- 48 kHz WebRTC audio -> 16 kHz mono -------------------------------------------------------


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """float32 mono in -1..1 from an ``av.AudioFrame`` (packed or planar; channels averaged)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        samples = data.reshape(channels, -1).T
    else:
        samples = data.reshape(-1, channels)
    if samples.dtype.kind in "iu":  # s16, s32; u8 is offset binary
        scale = float(2 ** (8 * samples.dtype.itemsize - 1))
        offset = scale if samples.dtype.kind == "u" else 0.0
        mono = (samples.astype(np.float32).mean(axis=1) - offset) / scale
    else:
        mono = samples.astype(np.float32, copy=False).mean(axis=1)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _downmix_int16(frame_pcm: np.ndarray, layout_channels: int) -> np.ndarray:
    pcm = np.asarray(frame_pcm).reshape(-1, layout_channels)
    return (pcm.astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32)


class Resampler16k:
    """Stateful resampler for one incoming audio track: ``av.AudioFrame``s (aiortc delivers
    48 kHz s16, mono or stereo, packed) -> float32 16 kHz mono in -1..1.

    The libswresample filter state carries across frames, so there are no clicks at frame
    edges; its delay (a few samples) is released by ``flush()`` at the end of the stream.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._in_rate = 0

    def push(self, frame: av.AudioFrame) -> np.ndarray:
        """Resample one frame; returns the 16 kHz samples ready so far (may be a few short)."""
        return self.push_mono(_frame_to_mono(frame), int(frame.sample_rate))

    def push_mono(self, mono: np.ndarray, sample_rate: int) -> np.ndarray:
        """Resample float32 mono samples at ``sample_rate`` Hz."""
        if sample_rate == SAMPLE_RATE and self._resampler is None:
            return mono.astype(np.float32, copy=False)
        out: list[np.ndarray] = []
        if self._resampler is None or sample_rate != self._in_rate:
            out.append(self.flush())
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._in_rate = sample_rate
        frame = av.AudioFrame.from_ndarray(
            mono.reshape(1, -1).astype(np.float32, copy=False), format="flt", layout="mono"
        )
        frame.sample_rate = sample_rate
        out += [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return _concat(out)

    def close(self) -> None:
        """Let the filter go now: FFmpeg runs a resampler's filter graph on threads of its own
        (one per core), which would otherwise live until the garbage collector finds the
        closed session that held it."""
        self._resampler = None

    def flush(self) -> np.ndarray:
        """The samples still held in the filter; the next push starts a fresh stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        self._resampler = None
        return _concat(out)


def to_16k_mono(frame_pcm: np.ndarray, sample_rate: int, layout_channels: int) -> np.ndarray:
    """A whole signal at once: interleaved int16 PCM (``layout_channels`` channels at
    ``sample_rate`` Hz) -> float32 16 kHz mono. Streams use ``Resampler16k`` instead."""
    resampler = Resampler16k()
    mono = _downmix_int16(frame_pcm, layout_channels)
    return _concat([resampler.push_mono(mono, sample_rate), resampler.flush()])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros(0, np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


# --- Endpointing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Speech has lasted ``min_speech_ms``. onset_ms: where it began; confirmed_ms: when that
    became sure (ms of audio fed to the endpointer)."""

    onset_ms: int
    confirmed_ms: int


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    """One utterance. audio: float32 16 kHz mono, from ``pre_roll_ms`` before the onset up to
    ``detected_ms``. end_ms: where the last speech chunk ended; detected_ms: when the end was
    declared (``end_ms + end_silence_ms``, or the ``max_utterance_s`` cut, where end_ms equals
    detected_ms; 0 where a producer does not know it). All times in ms of audio fed to the
    endpointer."""

    audio: np.ndarray
    onset_ms: int
    end_ms: int
    detected_ms: int = 0


@dataclass(frozen=True, slots=True)
class SpeechPause:
    """The speaker has been silent for ``pause_ms`` inside an utterance: it may be its end.
    audio: the utterance so far (as ``SpeechEnd`` would give it); end_ms: where the last speech
    chunk ended. A ``SpeechEnd`` with the same ``end_ms`` follows unless speech resumes, so a
    listener may start transcribing now and keep the result if the end is confirmed."""

    audio: np.ndarray
    onset_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class SpeechResume:
    """Speech came back after a ``SpeechPause``: that pause was not the end of the utterance.
    at_ms: where the resumed speech chunk ended."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class SpeechOnset:
    """Speech has lasted ``onset_ms`` (shorter than ``min_speech_ms``): perhaps the person is
    starting to talk. A ``SpeechStart`` with the same ``onset_ms`` follows, or a ``SpeechBlip``
    when the sound stops first. at_ms: ms of audio fed when it was told."""

    onset_ms: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class SpeechBlip:
    """The sound a ``SpeechOnset`` told of stopped before ``min_speech_ms``: not speech."""

    onset_ms: int
    at_ms: int


ListenEvent = SpeechStart | SpeechEnd | SpeechPause | SpeechResume | SpeechOnset | SpeechBlip


class Endpointer:
    """Turns per-chunk speech probabilities into utterances.

    A chunk is speech at or above ``threshold``, silence below ``neg_threshold``, and keeps
    the previous chunk's state in between (hysteresis). A run of speech becomes an utterance
    (``SpeechStart``) once it has lasted ``min_speech_ms``; a silent chunk before that drops
    it (blips give no events, unless ``onset_ms`` is set: then a run that lasts that long is
    told at once, ``SpeechOnset``, and its end before ``min_speech_ms`` too, ``SpeechBlip``,
    so a caller can act on a likely start sooner and take it back). An utterance ends
    (``SpeechEnd``) after ``end_silence_ms`` of silence, or when it has lasted
    ``max_utterance_s``.
    """

    def __init__(
        self,
        *,
        chunk_ms: int = 32,
        threshold: float = 0.5,
        neg_threshold: float = 0.35,
        min_speech_ms: int = 250,
        end_silence_ms: int = 600,
        pre_roll_ms: int = 300,
        max_utterance_s: float = 30.0,
        pause_ms: int | None = None,
        onset_ms: int | None = None,
    ) -> None:
        if not 0.0 <= neg_threshold <= threshold <= 1.0:
            raise ValueError("need 0 <= neg_threshold <= threshold <= 1")
        # a likely start is told only when it comes before the sure one
        self._onset_told_at = (None if not onset_ms or onset_ms >= min_speech_ms
                               else onset_ms * SAMPLE_RATE // 1000)
        self.chunk_ms = chunk_ms
        self.threshold = threshold
        self.neg_threshold = neg_threshold
        self._chunk_samples = chunk_ms * SAMPLE_RATE // 1000
        self._min_speech = min_speech_ms * SAMPLE_RATE // 1000
        self._end_silence = end_silence_ms * SAMPLE_RATE // 1000
        self._pre_roll = pre_roll_ms * SAMPLE_RATE // 1000
        self._max_utterance = int(max_utterance_s * SAMPLE_RATE)
        self._pause = None if pause_ms is None else pause_ms * SAMPLE_RATE // 1000
        self._pos = 0  # samples fed so far
        self.reset()

    def reset(self) -> None:
        """Drop any utterance in progress; the clock keeps running."""
        self._is_speech = False
        self._confirmed = False
        self._onset = -1  # sample where the current speech run began; -1: none
        self._onset_told = False  # a SpeechOnset was emitted for it
        self._last_speech_end = 0
        self._paused_at = -1  # the speech end a SpeechPause was emitted for
        self._pause_open = False  # a SpeechPause was emitted and no speech came since
        # (speech end in ms, silence in samples): the end silence a turn detector chose for
        # that pause (``end_after``); a later speech end makes it stale
        self._end_override: tuple[int, int] | None = None
        self._idle: deque[np.ndarray] = deque()  # pre-roll ring (whole chunks)
        self._idle_samples = 0
        self._utterance: list[np.ndarray] = []

    @property
    def time_ms(self) -> int:
        """ms of audio fed so far."""
        return self._pos * 1000 // SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        """True between a ``SpeechStart`` and its ``SpeechEnd``."""
        return self._confirmed

    def feed(self, prob: float, chunk: np.ndarray | None = None) -> list[ListenEvent]:
        """One chunk: its speech probability and its float32 16 kHz samples (``None``: silence
        of ``chunk_ms``, for probability-only use). Returns the events it completes."""
        if chunk is None:
            chunk = np.zeros(self._chunk_samples, np.float32)
        else:
            chunk = np.array(chunk, np.float32).reshape(-1)
        start, self._pos = self._pos, self._pos + len(chunk)
        if prob >= self.threshold:
            self._is_speech = True
        elif prob < self.neg_threshold:
            self._is_speech = False

        if self._onset < 0:  # idle: waiting for speech, keeping the pre-roll
            if not self._is_speech:
                self._keep_pre_roll(chunk)
                return []
            self._onset = start
            pre_roll = _concat(list(self._idle))
            self._utterance = [pre_roll[max(0, len(pre_roll) - self._pre_roll) :], chunk]
            self._idle.clear()
            self._idle_samples = 0
        else:
            self._utterance.append(chunk)

        if self._is_speech:
            self._last_speech_end = self._pos

        if not self._confirmed:
            if not self._is_speech:  # a blip: back to idle, its audio becomes pre-roll
                onset, told = self._onset, self._onset_told
                audio, self._utterance, self._onset = self._utterance, [], -1
                self._onset_told = False
                for c in audio:
                    self._keep_pre_roll(c)
                return [SpeechBlip(self._ms(onset), self._ms(self._pos))] if told else []
            if self._pos - self._onset >= self._min_speech:
                self._confirmed = True
                self._onset_told = False
                return [SpeechStart(self._ms(self._onset), self._ms(self._pos))]
            if (self._onset_told_at is not None and not self._onset_told
                    and self._pos - self._onset >= self._onset_told_at):
                self._onset_told = True
                return [SpeechOnset(self._ms(self._onset), self._ms(self._pos))]
            return []

        if self._is_speech and self._pause_open:
            self._pause_open = False
            return [SpeechResume(self._ms(self._pos))]
        if self._pos - self._onset >= self._max_utterance:
            return [self._end(self._pos)]
        silent_for = self._pos - self._last_speech_end
        end_silence = self._end_silence
        override = self._end_override
        if override is not None and override[0] == self._ms(self._last_speech_end):
            end_silence = override[1]
        if not self._is_speech and silent_for >= end_silence:
            return [self._end(self._last_speech_end)]
        if (
            self._pause is not None
            and not self._is_speech
            and silent_for >= self._pause
            and self._paused_at != self._last_speech_end
        ):
            self._paused_at = self._last_speech_end
            self._pause_open = True
            return [
                SpeechPause(
                    _concat(self._utterance), self._ms(self._onset), self._ms(self._last_speech_end)
                )
            ]
        return []

    def end_after(self, end_ms: int, silence_ms: int) -> None:
        """The utterance whose speech ended at ``end_ms`` (a ``SpeechPause``'s) ends after
        ``silence_ms`` of silence instead of ``end_silence_ms`` (sooner or later), unless
        speech resumes. May be called from another thread than ``feed``'s; a call for an
        older pause changes nothing."""
        self._end_override = (int(end_ms), int(silence_ms) * SAMPLE_RATE // 1000)

    def _end(self, end: int) -> SpeechEnd:
        audio = _concat(self._utterance)
        event = SpeechEnd(audio, self._ms(self._onset), self._ms(end), self._ms(self._pos))
        self._utterance, self._onset, self._confirmed = [], -1, False
        self._is_speech = False
        self._pause_open = False
        return event

    def _keep_pre_roll(self, chunk: np.ndarray) -> None:
        self._idle.append(chunk)
        self._idle_samples += len(chunk)
        while self._idle and self._idle_samples - len(self._idle[0]) >= self._pre_roll:
            self._idle_samples -= len(self._idle.popleft())

    @staticmethod
    def _ms(samples: int) -> int:
        return samples * 1000 // SAMPLE_RATE


class Listener:
    """VAD + endpointer for one microphone stream: ``feed`` float32 16 kHz mono of any length,
    get the ``SpeechStart``/``SpeechEnd`` events it completes. Blocking CPU work (~0.1-0.3 ms
    per 32 ms chunk): call it from an executor, never on the event loop.

    A quiet microphone skips the model (``quiet_dbfs``: a chunk whose power is under it, once
    ``QUIET_AFTER_CHUNKS`` such chunks came in a row, counts as silence, probability 0, and
    the model's state waits as it is). That is digital silence, or a noise-suppressed browser
    microphone in a quiet room: most of a call while the avatar speaks. Speech after such a
    stretch is scored from the state the model had when the stretch began; measured on
    synthesized questions after 2 s of quiet, Silero then marks their onsets in the same
    chunk as when run throughout, or one chunk sooner, and their ends in the same chunk
    (``tests/test_vad_quiet.py``). None: the model scores every chunk."""

    def __init__(
        self,
        vad: SileroVad,
        *,
        chunk_ms: int = 32,
        threshold: float = 0.5,
        neg_threshold: float = 0.35,
        min_speech_ms: int = 250,
        end_silence_ms: int = 600,
        pre_roll_ms: int = 300,
        max_utterance_s: float = 30.0,
        pause_ms: int | None = None,
        onset_ms: int | None = None,
        quiet_dbfs: float | None = None,
    ) -> None:
        if chunk_ms * SAMPLE_RATE // 1000 != CHUNK_SAMPLES:
            raise ValueError(f"Silero VAD chunks are {CHUNK_SAMPLES} samples (32 ms) at 16 kHz")
        self.stream = vad.new_stream()
        self.endpointer = Endpointer(
            chunk_ms=chunk_ms,
            threshold=threshold,
            neg_threshold=neg_threshold,
            min_speech_ms=min_speech_ms,
            end_silence_ms=end_silence_ms,
            pre_roll_ms=pre_roll_ms,
            max_utterance_s=max_utterance_s,
            pause_ms=pause_ms,
            onset_ms=onset_ms,
        )
        self._pending = np.zeros(0, np.float32)
        self.last_prob = 0.0
        # mean square (of samples in -1..1) under which a chunk is quiet
        self._quiet_power = None if quiet_dbfs is None else 10.0 ** (quiet_dbfs / 10.0)
        self._quiet_run = 0
        self.skipped_chunks = 0  # chunks counted as silence without the model

    @property
    def time_ms(self) -> int:
        """ms of audio run through the VAD so far."""
        return self.endpointer.time_ms

    def feed(self, pcm16k: np.ndarray) -> list[ListenEvent]:
        """float32 16 kHz mono in -1..1; samples short of a whole chunk wait for the next call."""
        data = np.concatenate([self._pending, pcm16k.astype(np.float32, copy=False)])
        n = len(data) // CHUNK_SAMPLES * CHUNK_SAMPLES
        self._pending = data[n:].copy()
        events: list[ListenEvent] = []
        for i in range(0, n, CHUNK_SAMPLES):
            chunk = data[i : i + CHUNK_SAMPLES]
            if self._quiet(chunk):
                self.stream.skip(chunk)
                self.skipped_chunks += 1
                self.last_prob = 0.0
            else:
                self.last_prob = self.stream.prob(chunk)
            events += self.endpointer.feed(self.last_prob, chunk)
        return events

    def _quiet(self, chunk: np.ndarray) -> bool:
        """Whether ``chunk`` is skipped: under ``quiet_dbfs``, after enough quiet ones."""
        if self._quiet_power is None:
            return False
        if float(np.dot(chunk, chunk)) >= self._quiet_power * CHUNK_SAMPLES:
            self._quiet_run = 0
            return False
        self._quiet_run += 1
        return self._quiet_run > QUIET_AFTER_CHUNKS

    def end_after(self, end_ms: int, silence_ms: int) -> None:
        """``Endpointer.end_after``: the end silence a turn detector chose for a pause."""
        self.endpointer.end_after(end_ms, silence_ms)

    def reset(self) -> None:
        """Forget the VAD state, buffered samples and any utterance in progress."""
        self.stream.reset()
        self.endpointer.reset()
        self._pending = np.zeros(0, np.float32)
        self.last_prob = 0.0
        self._quiet_run = 0
