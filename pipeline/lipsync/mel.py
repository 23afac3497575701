"""Wav2Lip's audio features: the mel spectrogram it was trained on, cut into per-frame windows.

The numbers follow Wav2Lip's ``hparams.py`` and ``audio.py`` (16 kHz, 12.5 ms hop, 80 Slaney
mel bands, pre-emphasis, dB scaled and clipped to -4..4); numpy only, so this runs without
librosa, scipy or torch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.tts import resample_int16

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55
FMAX = 7600
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20
MIN_LEVEL_DB = -100
MAX_ABS = 4.0
MEL_STEP = 16  # one window: 16 mel columns = 200 ms
MEL_PER_S = SAMPLE_RATE // HOP  # 80 mel columns per second

F32 = npt.NDArray[np.float32]

_mel_basis: F32 | None = None
_window: npt.NDArray[np.float64] | None = None


def _hz_to_mel(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    safe = np.maximum(hz, min_log_hz)
    return np.where(hz >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, hz / f_sp)


def _mel_to_hz(mel: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel
    )


def mel_filterbank() -> F32:
    """(N_MELS, N_FFT // 2 + 1) Slaney-normalised triangular filters on Slaney's mel scale
    (what ``librosa.filters.mel`` gives with ``htk=False, norm="slaney"``); computed once."""
    global _mel_basis
    if _mel_basis is None:
        fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
        edges_mel = np.linspace(
            _hz_to_mel(np.array(float(FMIN))), _hz_to_mel(np.array(float(FMAX))), N_MELS + 2
        )
        edges_hz = _mel_to_hz(edges_mel)
        widths = np.diff(edges_hz)
        # Band i rises from edges_hz[i] to edges_hz[i + 1] and falls back to 0 at edges_hz[i + 2].
        offsets = edges_hz[:, None] - fft_hz[None, :]
        rising = -offsets[:-2] / widths[:-1, None]
        falling = offsets[2:] / widths[1:, None]
        weights = np.maximum(0.0, np.minimum(rising, falling))
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per band
        _mel_basis = weights.astype(np.float32)
    return _mel_basis


def _hann() -> npt.NDArray[np.float64]:
    """Periodic Hann window of WIN samples (scipy's ``get_window("hann", WIN)``)."""
    global _window
    if _window is None:
        _window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WIN) / WIN)
    return _window


def wav2lip_mel(wav: npt.NDArray[np.floating]) -> F32:
    """(N_MELS, T) normalised log-mel spectrogram of ``wav`` (float, 16 kHz, -1..1), in
    -MAX_ABS..MAX_ABS, with ``T = 1 + len(wav) // HOP`` (column t is centred on sample
    ``t * HOP``); empty audio gives T = 0."""
    x = np.asarray(wav, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return np.zeros((N_MELS, 0), np.float32)
    # Pre-emphasis y[n] = x[n] - k x[n-1], as scipy.signal.lfilter([1, -k], [1], x).
    y = np.empty_like(x)
    y[0] = x[0]
    y[1:] = x[1:] - PREEMPHASIS * x[:-1]
    # Centred frames. Wav2Lip ran librosa 0.7, whose stft padded with *reflect* by default;
    # librosa >= 0.10 pads with zeros ("constant"), which changes the first and last columns.
    pad = N_FFT // 2
    padded = np.pad(y, pad, mode="reflect") if y.size > 1 else np.pad(y, pad)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    magnitude = np.abs(np.fft.rfft(frames * _hann(), axis=1)).astype(np.float32)  # (T, 401)
    mel = mel_filterbank() @ magnitude.T  # (80, T)
    min_level = np.float32(10.0 ** (MIN_LEVEL_DB / 20))
    db = 20.0 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    scaled = (2 * MAX_ABS) * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS
    return np.clip(scaled, -MAX_ABS, MAX_ABS).astype(np.float32, copy=False)


def to_wav2lip_audio(pcm: npt.NDArray[np.int16], sample_rate: int) -> F32:
    """int16 mono samples at ``sample_rate`` Hz -> float32 at SAMPLE_RATE Hz in -1..1."""
    resampled = resample_int16(np.asarray(pcm).reshape(-1), sample_rate, SAMPLE_RATE)
    return resampled.astype(np.float32) / np.float32(32768.0)


def window_starts(n_frames: int, fps: float) -> npt.NDArray[np.int64]:
    """(n_frames,) first mel column of each video frame's window: ``int(k * MEL_PER_S / fps)``
    (Wav2Lip's ``mel_idx_multiplier``), before clamping to the end of the mel."""
    multiplier = MEL_PER_S / fps
    return np.floor(np.arange(n_frames) * multiplier).astype(np.int64)


def mel_windows(mel: F32, n_frames: int, fps: float) -> F32:
    """(n_frames, N_MELS, MEL_STEP) the mel window of each video frame at ``fps``.

    Window k is ``mel[:, s_k : s_k + MEL_STEP]``; a window running past the end is the last
    MEL_STEP columns (as Wav2Lip's inference); a mel shorter than MEL_STEP is padded on the
    right with silence (-MAX_ABS).
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.shape[1] < MEL_STEP:
        mel = np.pad(
            mel, ((0, 0), (0, MEL_STEP - mel.shape[1])), constant_values=np.float32(-MAX_ABS)
        )
    starts = np.minimum(window_starts(n_frames, fps), mel.shape[1] - MEL_STEP)
    views = np.lib.stride_tricks.sliding_window_view(mel, MEL_STEP, axis=1)  # (80, T-15, 16)
    return np.ascontiguousarray(views[:, starts].transpose(1, 0, 2))
