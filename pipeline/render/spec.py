"""What a render job is asked to produce: ``RenderSpec``, a plain, JSON-serialisable record.

The HTTP API validates request fields and fills ``cache_key``; ``RenderSpec.from_dict`` checks
types only (it reads job records back from a queue), and ``ClipRenderer.render`` refuses content
it cannot render (unknown voice, audio that is not audio, ...)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from common.errors import BadRequest

FORMATS: tuple[str, ...] = ("mp4", "webm")
MIN_SPEED = 0.5
MAX_SPEED = 2.0

# Names of the files a render writes into its output folder.
VIDEO_FILES: dict[str, str] = {"mp4": "video.mp4", "webm": "video.webm"}
AUDIO_OGG_FILE = "audio.ogg"
AUDIO_WAV_FILE = "audio.wav"
TIMELINE_FILE = "timeline.json"


@dataclass(frozen=True, slots=True)
class RenderSpec:
    """One clip to render.

    Exactly one of ``text`` / ``audio_path`` is set; ``audio_path`` names an uploaded file
    already on disk (a folder every worker sees). ``voice`` is a name from
    ``ClipRenderer.voices()`` ("default" = the configured Piper voice); ``speed`` the speech
    rate (0.5..2.0, 1 = natural); ``format`` "mp4" (H.264 + AAC) or "webm" (VP9 + Opus);
    ``fps`` frames per second of the video; ``cache_key`` the hex digest the API derived from
    everything that changes the output (it also seeds the idle motion: blinks, glances)."""

    avatar_id: str
    text: str | None
    audio_path: str | None
    voice: str
    speed: float
    format: str
    fps: int
    cache_key: str

    @property
    def video_file(self) -> str:
        """File name of the video in the output folder (video.mp4 or video.webm)."""
        return VIDEO_FILES.get(self.format, f"video.{self.format}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RenderSpec:
        """The spec from ``to_dict()`` output (e.g. read back from a job queue).

        Raises ``BadRequest`` naming the field when one is missing or has the wrong type;
        unknown keys are ignored."""

        def string(name: str, *, optional: bool = False) -> str | None:
            value = d.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str):
                raise BadRequest(f"render spec field {name!r} must be a string")
            return value

        def number(name: str) -> float:
            value = d.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"render spec field {name!r} must be a number")
            if not math.isfinite(value):
                raise BadRequest(f"render spec field {name!r} must be finite")
            return float(value)

        fps = number("fps")
        if fps != int(fps):
            raise BadRequest("render spec field 'fps' must be an integer")
        text = string("text", optional=True)
        audio_path = string("audio_path", optional=True)
        if (text is None) == (audio_path is None):
            raise BadRequest("a render spec needs exactly one of 'text' and 'audio_path'")
        return cls(
            avatar_id=str(string("avatar_id")),
            text=text,
            audio_path=audio_path,
            voice=str(string("voice")),
            speed=number("speed"),
            format=str(string("format")),
            fps=int(fps),
            cache_key=str(string("cache_key")),
        )
