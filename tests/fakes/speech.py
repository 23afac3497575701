"""Test speech: real sentences synthesised with the bundled Piper voice, silence around them,
and WAV files of them. Not a fake engine; a source of realistic microphone audio.

Piper's durations vary from run to run; ``piper_speech`` caches each (text, rate) for the
process, so one test run sees the same audio everywhere.
"""

from __future__ import annotations

import functools
import threading
import wave
from pathlib import Path

import numpy as np

from pipeline.tts import PiperTTS

_lock = threading.Lock()  # Piper's espeak-ng phonemiser is not re-entrant


@functools.cache
def _tts(sample_rate: int) -> PiperTTS:
    tts = PiperTTS(sample_rate=sample_rate)
    tts.load()
    return tts


@functools.cache
def _speech(text: str, sample_rate: int) -> np.ndarray:
    with _lock:
        pcm = [s.pcm for s in _tts(sample_rate)._iter_sentences(text)]
    audio = (np.concatenate(pcm).astype(np.float32) / 32768.0) if pcm else np.zeros(0, np.float32)
    audio.flags.writeable = False
    return audio


def piper_speech(text: str, sample_rate: int = 16000) -> np.ndarray:
    """``text`` spoken by the bundled Piper voice: float32 mono in -1..1 at ``sample_rate``
    (a fresh copy; synthesised once per process). Works with or without a running loop."""
    return _speech(text, sample_rate).copy()


def silence(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    return np.zeros(round(seconds * sample_rate), np.float32)


def with_silence(
    audio: np.ndarray, before_s: float, after_s: float, sample_rate: int = 16000
) -> np.ndarray:
    """``audio`` with ``before_s`` and ``after_s`` seconds of digital silence around it."""
    return np.concatenate(
        [silence(before_s, sample_rate), audio.astype(np.float32), silence(after_s, sample_rate)]
    )


def speech_bounds(
    audio: np.ndarray, sample_rate: int = 16000, *, level: float = 0.01
) -> tuple[float, float]:
    """(onset_s, end_s) of the audible part: the first and last 10 ms window whose RMS exceeds
    ``level`` (full scale 1.0)."""
    hop = sample_rate // 100
    n = len(audio) // hop
    rms = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1))
    loud = np.nonzero(rms > level)[0]
    if loud.size == 0:
        raise ValueError("no audible speech")
    return loud[0] * hop / sample_rate, (loud[-1] + 1) * hop / sample_rate


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write mono audio (float in -1..1, or int16) as a 16-bit PCM WAV file."""
    if np.issubdtype(audio.dtype, np.floating):
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    else:
        pcm = audio.astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return path
