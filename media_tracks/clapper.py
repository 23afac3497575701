"""The A/V sync test segment ("clapper"): beeps on the audio at known media times while the
video flashes white on the frames at those times. Also the detectors that find beeps and
flashes in what a receiver decoded or recorded, shared by the bot, the browser test and
the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BEEP_HZ = 1000.0
BEEP_AMPLITUDE = 0.6  # of full scale
FIRST_FLASH_FRAME = 10


def flash_frames(count: int, fps: int) -> list[int]:
    """Local frame indices (from the segment start) that flash: 1 s apart."""
    return [FIRST_FLASH_FRAME + i * fps for i in range(count)]


def clapper_pcm(*, count: int, fps: int, sample_rate: int) -> np.ndarray:
    """int16 mono audio of a clapper segment: one beep starting exactly on each flash frame's
    first sample and lasting one frame, 5 ms raised-cosine edges; silence elsewhere."""
    frames = flash_frames(count, fps)
    total_frames = frames[-1] + fps // 2 + 1
    n_total = total_frames * sample_rate // fps
    out = np.zeros(n_total, dtype=np.int16)  # int16 from the start: 2 bytes a sample, no more
    beep_len = sample_rate // fps
    t = np.arange(beep_len, dtype=np.float32) / sample_rate
    beep = np.sin(2 * np.pi * BEEP_HZ * t) * BEEP_AMPLITUDE
    ramp = max(1, sample_rate // 1000)
    edge = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp, dtype=np.float32))
    beep[:ramp] *= edge
    beep[-ramp:] *= edge[::-1]
    beep16 = np.round(beep * 32767).astype(np.int16)
    for k in frames:
        start = k * sample_rate // fps
        out[start : start + beep_len] = beep16
    return out


def detect_beep_onsets(
    samples: np.ndarray, sample_rate: int, *, threshold: float = 0.15, refractory_ms: int = 300
) -> list[int]:
    """Sample indices where a beep starts in ``samples`` (mono; int16 or float in -1..1).

    The onset is the first sample whose magnitude crosses ``threshold`` of full scale after
    at least ``refractory_ms`` below it."""
    x = samples.astype(np.float32)
    if samples.dtype == np.int16:
        x /= 32768.0
    above = np.flatnonzero(np.abs(x) >= threshold)
    onsets: list[int] = []
    refractory = refractory_ms * sample_rate // 1000
    last = -refractory - 1
    for i in above:
        if i - last > refractory:
            onsets.append(int(i))
        last = int(i)
    return onsets


def detect_flash_onsets(lumas: Sequence[float], *, threshold: float = 200.0) -> list[int]:
    """Indices of frames where a flash begins, given each frame's mean luma (0..255)."""
    out: list[int] = []
    previous = False
    for i, y in enumerate(lumas):
        bright = y >= threshold
        if bright and not previous:
            out.append(i)
        previous = bright
    return out


def pair_offsets_ms(beeps_ms: Sequence[float], flashes_ms: Sequence[float]) -> list[float]:
    """Offset (beep - flash, ms) for each flash matched to the nearest beep within 500 ms.
    Positive: audio late relative to video."""
    out: list[float] = []
    for f in flashes_ms:
        best = min(beeps_ms, key=lambda b: abs(b - f), default=None)
        if best is not None and abs(best - f) < 500:
            out.append(best - f)
    return out
