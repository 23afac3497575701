"""The request bodies the API validates, declared once.

Each field of ``POST /offer`` and ``POST /v1/render`` is declared here with its JSON schema
(type, bounds from the settings, enum, pattern, description). The handlers read their bounds
and accepted names from these declarations when they check a request, and ``openapi.py``
publishes the same declarations as the request schemas: there is no second copy to drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config import Settings
from media_tracks.clock import VIDEO_CLOCK_RATE
from pipeline.render.spec import FORMATS, MAX_SPEED, MIN_SPEED

Schema = dict[str, Any]

MIN_PRIORITY = -10
MAX_PRIORITY = 10


@dataclass(frozen=True, slots=True)
class BodyField:
    name: str
    schema: Schema
    required: bool = False


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON object body: its fields in the order they are checked and documented."""

    fields: tuple[BodyField, ...]
    additional: bool = True  # whether fields not declared are let through

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def __getitem__(self, name: str) -> Schema:
        for f in self.fields:
            if f.name == name:
                return f.schema
        raise KeyError(name)

    def bounds(self, name: str) -> tuple[Any, Any]:
        """The field's (minimum, maximum)."""
        schema = self[name]
        return schema["minimum"], schema["maximum"]

    def json_schema(self) -> Schema:
        out: Schema = {"type": "object", "properties": {f.name: f.schema for f in self.fields}}
        required = [f.name for f in self.fields if f.required]
        if required:
            out["required"] = required
        if not self.additional:
            out["additionalProperties"] = False
        return out

    def form_schema(self, files: dict[str, Schema]) -> Schema:
        """The multipart/form-data form of the body: every field a text part, plus ``files``."""
        properties: dict[str, Schema] = {**files}
        properties.update({f.name: {"type": "string"} for f in self.fields})
        out: Schema = {"type": "object", "properties": properties}
        if not self.additional:
            out["additionalProperties"] = False
        return out


def offer_body(settings: Settings) -> Body:
    """``POST /offer``."""
    return Body((
        BodyField("sdp", {
            "type": "string", "minLength": 1, "pattern": r"^\s*v=0",
            "description": "A complete SDP offer (ICE gathering finished) with an audio and a "
            "video m-line; the client creates the 'control' data channel."}, required=True),
        BodyField("type", {"const": "offer"}, required=True),
        BodyField("avatar_id", {
            "type": "string",
            "description": f"default: avatars.default ({settings.avatars.default})",
        }),
    ))


def render_body(settings: Settings) -> Body:
    """``POST /v1/render`` (JSON, or the same names as multipart text parts)."""
    r = settings.render
    return Body((
        BodyField("avatar_id", {"type": "string", "minLength": 1}),
        BodyField("text", {"type": "string", "minLength": 1, "maxLength": r.max_text_chars,
                           "pattern": r"\S", "description": "What the avatar says."},
                  required=True),
        BodyField("voice", {"type": "string", "description": "A voice name; 'default'."}),
        BodyField("speed", {"type": "number", "minimum": MIN_SPEED, "maximum": MAX_SPEED}),
        BodyField("format", {"enum": list(FORMATS)}),
        BodyField("fps", {"type": "integer", "minimum": r.min_fps, "maximum": r.max_fps,
                          "description": f"Must divide {VIDEO_CLOCK_RATE}."}),
        BodyField("async", {"type": "boolean"}),
        BodyField("priority", {"type": "integer", "minimum": MIN_PRIORITY,
                               "maximum": MAX_PRIORITY}),
    ), additional=False)
