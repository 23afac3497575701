"""The simplest lip-sync: mouth opening follows the voice's short-term energy."""

from __future__ import annotations

import numpy as np

FLOOR_DBFS = -42.0  # at or below: mouth closed
FULL_DBFS = -14.0  # at or above: mouth fully open


def mouth_from_energy(pcm: np.ndarray, *, sample_rate: int, fps: int) -> np.ndarray:
    """Mouth opening 0..1 for each video frame covering ``pcm`` (int16 mono).

    Frame ``j`` covers samples ``[j*sr//fps, (j+1)*sr//fps)``; its opening comes from the RMS
    level of that window, mapped from FLOOR_DBFS..FULL_DBFS, then smoothed with a fast attack
    and a slower release so the jaw does not chatter."""
    n_frames = -(-len(pcm) * fps // sample_rate)
    out = np.zeros(n_frames, dtype=np.float32)
    x = pcm.astype(np.float32) / 32768.0
    for j in range(n_frames):
        w = x[j * sample_rate // fps : (j + 1) * sample_rate // fps]
        rms = float(np.sqrt(np.mean(w * w))) if w.size else 0.0
        db = 20 * np.log10(max(rms, 1e-6))
        out[j] = np.clip((db - FLOOR_DBFS) / (FULL_DBFS - FLOOR_DBFS), 0.0, 1.0)
    smoothed = np.empty_like(out)
    level = 0.0
    for j, target in enumerate(out):
        rate = 0.7 if target > level else 0.35
        level += (float(target) - level) * rate
        smoothed[j] = level
    return smoothed
