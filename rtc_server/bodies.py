"""The request bodies the API validates, declared once as pydantic models.

``offer_model(settings)`` and ``render_model(settings)`` are the models of ``POST /offer`` and
``POST /v1/render``: field types, bounds from the settings, enums, patterns. The handlers
validate with them (:func:`parse`, after ``wire.read_json_object`` has decoded the JSON) and
``openapi.py`` publishes their :func:`json_schema`: there is no second copy to drift.

Each field has a check that says what is wrong in the words clients get: a ``BadRequest``
(pydantic lets it through at once, so fields are checked in the order declared) or
:func:`later` (reported only when no other field's check raised). Any other refusal pydantic
makes becomes a ``BadRequest`` naming the field.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SkipValidation,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from common.errors import BadRequest
from common.inputs import as_finite, clean_text, has_speakable, short
from config import Settings
from media_tracks.clock import VIDEO_CLOCK_RATE
from pipeline.render.spec import FORMATS, MAX_SPEED, MIN_SPEED

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "Body",
    "OfferBody",
    "RenderBody",
    "field_names",
    "form_schema",
    "json_schema",
    "later",
    "offer_model",
    "parse",
    "render_model",
]

Schema = dict[str, Any]
B = TypeVar("B", bound="Body")

MIN_PRIORITY = -10
MAX_PRIORITY = 10
SCHEMA_REF = "#/components/schemas/{model}"
FPS_TEXT = f"Must divide {VIDEO_CLOCK_RATE}."
NoText = SkipJsonSchema[None]  # allowed (an audio part instead), but not in the schema
SDP_START = r"^\s*v=0"
LATER = "checked_later"
Format = Literal[FORMATS]  # type: ignore[valid-type]  # "mp4", "webm": one list, in spec.py


class Body(BaseModel):
    """A JSON object body. A required field that is absent reaches its check as ``None`` (so
    the first problem in declaration order is the one reported); defaults are checked too."""

    model_config = ConfigDict(validate_default=True, regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise BadRequest("body must be a JSON object")
        names = field_names(cls)
        if cls.model_config.get("extra") == "forbid":
            unknown = sorted(set(data) - set(names))
            if unknown:
                raise BadRequest(f"unknown field(s) {unknown}; accepted: {list(names)}")
        absent = {n: None for n, f in _aliased(cls) if f.is_required() and n not in data}
        return {**absent, **data}


def _aliased(model: type[BaseModel]) -> list[tuple[str, Any]]:
    return [(f.alias or n, f) for n, f in model.model_fields.items()]


def field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """The body's field names as clients send them, in the order they are checked."""
    return tuple(n for n, _ in _aliased(model))


def later(detail: str) -> PydanticCustomError:
    """A refusal reported after every other field's check (raise it from a check)."""
    return PydanticCustomError(LATER, detail.replace("{", "(").replace("}", ")"))


def parse(model: type[B], data: object, **context: object) -> B:
    """``data`` (decoded JSON, or multipart text parts) checked against ``model``; the first
    problem is a ``BadRequest`` naming the field."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "body"
        detail = first["msg"] if first["type"] == LATER else f"field {name!r}: {first['msg']}"
        raise BadRequest(detail[:200]) from None


def json_schema(model: type[BaseModel]) -> Schema:
    """The model's JSON schema, with references into the OpenAPI document's components."""
    return model.model_json_schema(ref_template=SCHEMA_REF)


def form_schema(model: type[BaseModel], files: dict[str, Schema]) -> Schema:
    """The multipart/form-data form of a body: every field a text part, plus ``files``."""
    properties: Schema = {**files, **{n: {"type": "string"} for n in field_names(model)}}
    out: Schema = {"type": "object", "properties": properties}
    if model.model_config.get("extra") == "forbid":
        out["additionalProperties"] = False
    return out


# --- POST /offer --------------------------------------------------------------------------------
def _offer_sdp(value: object) -> object:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("field 'sdp' (string) is required")
    if not re.match(SDP_START, value):  # reported after 'type'
        raise later("field 'sdp' is not an SDP description (must start with v=0)")
    return value


def _offer_avatar_id(value: object) -> object:
    if not isinstance(value, str):
        raise later("field 'avatar_id' must be a string")
    return value


def _offer_type(value: object) -> object:
    if value != "offer":
        raise BadRequest('field \'type\' must be "offer"')
    return value


class OfferBody(Body):
    """``POST /offer``; ``offer_model`` fills in the settings."""

    # the checks are the whole validation of strings (SkipValidation): text is passed on as
    # it came, lone surrogates included, for the SDP parser and the avatar lookup to refuse
    sdp: Annotated[SkipValidation[Annotated[str, Field(
        min_length=1, pattern=SDP_START,
        description="A complete SDP offer (ICE gathering finished) with an audio and a video "
        "m-line; the client creates the 'control' data channel.")]], BeforeValidator(_offer_sdp)]
    type: Annotated[Literal["offer"], BeforeValidator(_offer_type)]
    avatar_id: Annotated[SkipValidation[str], BeforeValidator(_offer_avatar_id)] = "default"


def offer_model(settings: Settings) -> type[OfferBody]:
    return _offer_model(settings.avatars.default)


@functools.cache
def _offer_model(default_avatar: str) -> type[OfferBody]:
    return create_model(
        "Offer", __base__=OfferBody, __module__=__name__,
        avatar_id=(Annotated[SkipValidation[str], BeforeValidator(_offer_avatar_id)],
                   Field(default_avatar,
                         description=f"default: avatars.default ({default_avatar})")),
    )


# --- POST /v1/render ----------------------------------------------------------------------------
def _as_number(name: str, value: object, kind: type) -> float:
    """A JSON number, or the text of one (multipart), as a finite float of the right kind."""
    if isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise BadRequest(f"field {name!r} must be a number, got {short(text)!r}") from None
    try:
        number = as_finite(name, value)  # 400 digits, NaN or inf: refused, never an overflow
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if kind is int and not number.is_integer():
        raise BadRequest(f"field {name!r} must be a whole number")
    return number


def _avatar_id(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise BadRequest("field 'avatar_id' must be a non-empty string")
    return value


def _voice(value: object, info: ValidationInfo) -> object:
    voices = (info.context or {}).get("voices")
    if not isinstance(value, str) or (voices is not None and value not in voices):
        raise BadRequest(f"unknown voice {str(value)[:40]!r}; available: {voices}")
    return value


def _speed(value: object) -> float:
    speed = _as_number("speed", value, float)
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise BadRequest(
            f"field 'speed' must be within {MIN_SPEED:g}..{MAX_SPEED:g}, got {speed:g}"
        )
    return speed


def _format(value: object) -> object:
    if value not in FORMATS:
        raise BadRequest(f"field 'format' must be one of {list(FORMATS)}, got {str(value)[:20]!r}")
    return value


def _priority(value: object) -> int:
    priority = int(_as_number("priority", value, int))
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(
            f"field 'priority' must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}"
        )
    return priority


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise later("field 'async' must be true or false")  # checked last, as ever


# an unknown id (lone surrogates too) is the avatar lookup's 404: the check is the validation
AvatarId = Annotated[SkipValidation[Annotated[str, Field(min_length=1)]],
                     BeforeValidator(_avatar_id)]


class RenderBody(Body):
    """``POST /v1/render`` (JSON, or the same names as multipart text parts); ``render_model``
    fills in what comes from the settings (text length, fps bounds, defaults). Validate with
    ``context={"voices": [...], "audio": bytes | None}``."""

    model_config = ConfigDict(extra="forbid")

    avatar_id: AvatarId = "default"
    text: str | NoText
    voice: Annotated[str, Field(description="A voice name; 'default'."),
                     BeforeValidator(_voice)] = "default"
    speed: Annotated[float, Field(ge=MIN_SPEED, le=MAX_SPEED), BeforeValidator(_speed)] = 1.0
    format: Annotated[Format, BeforeValidator(_format)] = "mp4"
    fps: int
    run_async: Annotated[bool, Field(alias="async"), BeforeValidator(_bool)] = False
    priority: Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY),
                        BeforeValidator(_priority)] = 0


def _text_check(max_chars: int) -> Callable[[object, ValidationInfo], object]:
    def check(value: object, info: ValidationInfo) -> object:
        audio = (info.context or {}).get("audio")
        text = value
        if text is not None:
            if not isinstance(text, str):
                raise BadRequest("field 'text' must be a string")
            text = clean_text(text)  # no control characters reach the voice or the cache key
            if len(text) > max_chars:
                raise BadRequest(
                    f"field 'text' has {len(text)} characters; at most {max_chars} are accepted"
                )
            if not text:
                raise BadRequest("field 'text' is empty")
            if not has_speakable(text):
                raise BadRequest("field 'text' has nothing to speak (no letter or digit)")
        if (text is None) == (audio is None):
            raise BadRequest(
                "give exactly one of 'text' or an 'audio' file (multipart part 'audio')"
            )
        if audio is not None and not audio:
            raise BadRequest("the 'audio' file is empty")
        return text
    return check


def _fps_check(lo: int, hi: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        fps = int(_as_number("fps", value, int))
        if not lo <= fps <= hi or VIDEO_CLOCK_RATE % fps:
            raise BadRequest(
                f"field 'fps' must be within {lo}..{hi} and divide {VIDEO_CLOCK_RATE}, got {fps}"
            )
        return fps
    return check


def render_model(settings: Settings) -> type[RenderBody]:
    r = settings.render
    return _render_model(r.max_text_chars, r.min_fps, r.max_fps, settings.avatars.default,
                         settings.media.fps)


@functools.cache
def _render_model(max_chars: int, min_fps: int, max_fps: int, default_avatar: str,
                  default_fps: int) -> type[RenderBody]:
    said: Any = Annotated[str, Field(min_length=1, max_length=max_chars, pattern=r"\S")]
    text: Any = Annotated[said | NoText,  # None: the multipart 'audio' instead
                          Field(description="What the avatar says."),
                          BeforeValidator(_text_check(max_chars))]
    fps: Any = Annotated[int, Field(ge=min_fps, le=max_fps, description=FPS_TEXT),
                         BeforeValidator(_fps_check(min_fps, max_fps))]
    return create_model(
        "RenderRequest", __base__=RenderBody, __module__=__name__,
        avatar_id=(AvatarId, default_avatar),
        text=(text, ...),
        fps=(fps, default_fps),
    )
