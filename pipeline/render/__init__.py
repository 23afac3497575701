"""Rendered clips: a spec in, video, audio and an animation timeline out (see core.py)."""
