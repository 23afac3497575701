"""Wav2Lip's mel features against librosa/scipy as Wav2Lip's own ``audio.py`` computes them."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.signal

from pipeline.lipsync.mel import (
    FMAX,
    FMIN,
    HOP,
    MAX_ABS,
    MEL_STEP,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    WIN,
    mel_filterbank,
    mel_windows,
    to_wav2lip_audio,
    wav2lip_mel,
    window_starts,
)


def reference_mel(wav: np.ndarray, *, pad_mode: str = "reflect") -> np.ndarray:
    """Wav2Lip's ``audio.melspectrogram`` with librosa 0.7's padding made explicit."""
    emphasised = scipy.signal.lfilter([1, -0.97], [1], wav)
    spec = librosa.stft(
        y=emphasised, n_fft=N_FFT, hop_length=HOP, win_length=WIN, pad_mode=pad_mode
    )
    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    db = 20 * np.log10(np.maximum(1e-5, basis @ np.abs(spec))) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def speech_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A harmonic chirp (pitch 110 -> 230 Hz) with noise, and a silent gap in the middle."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(110 + 40 * t) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25))
    wav = 0.25 * voiced * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
    wav[n // 3 : n // 2] = 0.0
    return wav


def wav2lip_chunks(mel: np.ndarray, fps: float) -> list[np.ndarray]:
    """Wav2Lip's inference loop, for comparison."""
    chunks, multiplier, i = [], 80.0 / fps, 0
    while True:
        start = int(i * multiplier)
        if start + MEL_STEP > mel.shape[1]:
            chunks.append(mel[:, mel.shape[1] - MEL_STEP :])
            return chunks
        chunks.append(mel[:, start : start + MEL_STEP])
        i += 1


def test_filterbank_equals_librosa() -> None:
    expected = librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX, htk=False, norm="slaney"
    )
    ours = mel_filterbank()
    assert ours.shape == (80, 401)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)
    assert mel_filterbank() is ours  # computed once


def test_mel_matches_wav2lip_reference() -> None:
    wav = speech_like()
    ours = wav2lip_mel(wav)
    expected = reference_mel(wav)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape == (80, 1 + wav.size // HOP)
    assert np.abs(ours - expected).max() < 1e-3
    assert ours.min() >= -MAX_ABS and ours.max() <= MAX_ABS
    gap = ours[:, 90:110]  # inside the silent gap (1.0 .. 1.5 s)
    assert np.all(gap == -MAX_ABS)


def test_edges_use_reflect_padding_like_librosa_0_7() -> None:
    wav = speech_like(1.0, seed=1)
    ours = wav2lip_mel(wav)
    reflect = reference_mel(wav, pad_mode="reflect")
    constant = reference_mel(wav, pad_mode="constant")
    assert np.abs(ours[:, 0] - reflect[:, 0]).max() < 1e-3
    assert np.abs(ours[:, 0] - constant[:, 0]).max() > 0.05


def test_float32_input_and_odd_lengths() -> None:
    for n in (1, 399, 401, 801, 1234):
        wav = speech_like(1.0)[:n].astype(np.float32)
        ours = wav2lip_mel(wav)
        assert ours.shape == (80, 1 + n // HOP)
        if n >= N_FFT:  # librosa warns about (but pads) shorter input
            assert np.abs(ours - reference_mel(wav.astype(np.float64))).max() < 1e-3
    assert wav2lip_mel(np.zeros(0)).shape == (80, 0)


def test_tone_lands_in_its_mel_band() -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    mel = wav2lip_mel(0.5 * np.sin(2 * np.pi * 1000 * t))
    centres = librosa.mel_frequencies(n_mels=N_MELS + 2, fmin=FMIN, fmax=FMAX)[1:-1]
    band = int(np.argmin(np.abs(centres - 1000)))
    profile = mel[:, 5:-5].mean(axis=1)
    assert abs(int(np.argmax(profile)) - band) <= 1
    assert profile[band] > 2.0
    assert profile[band - 10] < profile[band] - 3 and profile[band + 10] < profile[band] - 3


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (25, [0, 3, 6, 9, 12, 16, 19, 22, 25, 28, 32]),  # 3.2 columns per frame
        (30, [0, 2, 5, 8, 10, 13, 16, 18, 21, 24, 26]),  # 2.667 columns per frame
    ],
)
def test_window_starts(fps: int, expected: list[int]) -> None:
    starts = window_starts(len(expected), fps)
    assert starts.dtype == np.int64
    assert starts.tolist() == expected
    assert window_starts(1000, fps).tolist() == [int(k * 80.0 / fps) for k in range(1000)]


@pytest.mark.parametrize("fps", [25, 30])
def test_windows_follow_wav2lip_inference(fps: int) -> None:
    mel = wav2lip_mel(speech_like(2.1))
    chunks = wav2lip_chunks(mel, fps)
    windows = mel_windows(mel, len(chunks), fps)
    assert windows.shape == (len(chunks), 80, 16) and windows.dtype == np.float32
    assert windows.flags.c_contiguous
    for k, chunk in enumerate(chunks):
        np.testing.assert_array_equal(windows[k], chunk)
    # More frames than the audio covers: the extra windows are the last 16 columns.
    more = mel_windows(mel, len(chunks) + 7, fps)
    assert more.shape[0] == len(chunks) + 7
    for k in range(len(chunks) - 1, len(chunks) + 7):
        np.testing.assert_array_equal(more[k], mel[:, -MEL_STEP:])
    assert mel_windows(mel, 0, fps).shape == (0, 80, 16)


def test_short_audio_is_padded_with_silence() -> None:
    mel = wav2lip_mel(speech_like(0.1))  # 1600 samples -> 9 columns
    assert mel.shape == (80, 9)
    windows = mel_windows(mel, 3, 25)
    assert windows.shape == (3, 80, 16)
    for window in windows:
        np.testing.assert_array_equal(window[:, :9], mel)
        assert np.all(window[:, 9:] == -MAX_ABS)
    assert np.all(mel_windows(wav2lip_mel(np.zeros(0)), 2, 25) == -MAX_ABS)


def test_int16_at_any_rate_becomes_16k_float() -> None:
    t = np.arange(48000) / 48000
    pcm = (np.sin(2 * np.pi * 440 * t) * 16384).astype(np.int16)
    audio = to_wav2lip_audio(pcm, 48000)
    assert audio.dtype == np.float32
    assert abs(audio.size - 16000) <= 32
    assert 0.45 < np.abs(audio[100:-100]).max() <= 0.51
    same = to_wav2lip_audio(pcm[:16000], 16000)
    np.testing.assert_array_equal(same, pcm[:16000].astype(np.float32) / 32768)
