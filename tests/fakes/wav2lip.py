"""A Wav2Lip generator with random weights, as ONNX: the real graph, no downloaded weights."""

from __future__ import annotations

from pathlib import Path


def random_wav2lip_onnx(directory: Path, seed: int = 0) -> Path:
    """``directory/wav2lip-random-<seed>.onnx`` (~145 MB), written on first use only."""
    path = Path(directory) / f"wav2lip-random-{seed}.onnx"
    if not path.is_file():
        # torch is imported here, not at module level: tests that never build it stay light.
        from pipeline.lipsync.wav2lip_model import write_random_wav2lip_onnx

        write_random_wav2lip_onnx(path, seed)
    return path
