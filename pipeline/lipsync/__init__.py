"""Lip-sync engines: audio in, mouth motion per video frame out."""

from pipeline.lipsync.energy import mouth_from_energy

__all__ = ["mouth_from_energy"]
