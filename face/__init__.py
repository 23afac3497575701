"""Faces brought to life: the idle timeline (blinks, glances, breathing, sway), the eye and mouth
rigs, the renderer that draws an avatar for a pose, and the library of loaded avatars with their
prepared renderers. Below media_tracks and pipeline, which both draw with it; above avatars."""

from face.renderer import FaceRenderer
from face.timeline import FacePose, IdleTimeline, MouthShape

__all__ = ["FacePose", "FaceRenderer", "IdleTimeline", "MouthShape"]
