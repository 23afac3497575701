"""The request schemas in /openapi.json are the pydantic models the handlers validate with: the
document and the models cannot drift apart, and bounds from the settings reach both."""

from __future__ import annotations

import pytest

from common.errors import BadRequest
from config import load_settings
from rtc_server.bodies import field_names, offer_model, parse, render_model
from rtc_server.openapi import build_openapi
from rtc_server.render_api import validate

OVERRIDES = {"render.max_text_chars": 77, "render.min_fps": 12, "render.max_fps": 30,
             "avatars.default": "av_0123456789ab"}


def request_schema(doc: dict, path: str, media: str) -> dict:
    ref = doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]["$ref"]
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix)
    return doc["components"]["schemas"][ref.removeprefix(prefix)]


def test_the_documented_bodies_are_the_models_schemas() -> None:
    s = load_settings(env={}, overrides=OVERRIDES)
    doc = build_openapi(s)
    assert request_schema(doc, "/v1/render", "application/json") == (
        render_model(s).model_json_schema()
    )
    assert request_schema(doc, "/offer", "application/json") == offer_model(s).model_json_schema()
    upload = request_schema(doc, "/v1/render", "multipart/form-data")
    assert list(upload["properties"]) == ["audio", *field_names(render_model(s))]
    assert upload["additionalProperties"] is False


def test_bounds_from_the_settings_reach_the_document_and_the_check() -> None:
    s = load_settings(env={}, overrides=OVERRIDES)
    render = build_openapi(s)["components"]["schemas"]["RenderRequest"]
    props = render["properties"]
    assert props["text"]["maxLength"] == 77
    assert (props["fps"]["minimum"], props["fps"]["maximum"]) == (12, 30)
    assert props["avatar_id"]["default"] == "av_0123456789ab"
    assert render["required"] == ["text"] and render["additionalProperties"] is False
    offer = build_openapi(s)["components"]["schemas"]["Offer"]
    assert offer["required"] == ["sdp", "type"]
    assert "av_0123456789ab" in offer["properties"]["avatar_id"]["description"]
    # the same numbers bound the check
    with pytest.raises(BadRequest, match="at most 77 are accepted"):
        validate({"text": "a" * 78}, None, s, ["default"])
    with pytest.raises(BadRequest, match=r"within 12\.\.30"):
        validate({"text": "hi", "fps": 10}, None, s, ["default"])
    assert validate({"text": "a" * 77, "fps": 30}, None, s, ["default"]).fps == 30
    assert validate({"text": "hi"}, None, s, ["default"]).avatar_id == "av_0123456789ab"


def test_other_settings_build_other_models() -> None:
    a = load_settings(env={}, overrides={"render.max_text_chars": 50})
    b = load_settings(env={}, overrides={"render.max_text_chars": 60})
    assert render_model(a) is render_model(a)  # built once per set of bounds
    assert render_model(a) is not render_model(b)
    assert render_model(b).model_json_schema()["properties"]["text"]["maxLength"] == 60


def test_multipart_text_parts_are_read_as_their_types() -> None:
    s = load_settings(env={}, overrides={})
    req = validate({"text": "hi", "speed": "1.5", "fps": "25", "priority": "-3",
                    "async": "yes"}, None, s, ["default"])
    assert (req.speed, req.fps, req.priority, req.run_async) == (1.5, 25, -3, True)
    assert req.format == "mp4" and req.voice == "default" and req.text == "hi"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "field 'sdp' (string) is required"),
        ({"sdp": "v=0"}, "field 'type' must be \"offer\""),
        ({"sdp": "hello", "type": "answer"}, "field 'type' must be \"offer\""),
        ({"sdp": "hello", "type": "offer", "avatar_id": 7},
         "field 'sdp' is not an SDP description (must start with v=0)"),
        ({"sdp": "v=0\r\n", "type": "offer", "avatar_id": 7}, "field 'avatar_id' must be a string"),
        ([1], "body must be a JSON object"),
    ],
)
def test_offer_refusals_keep_their_order_and_words(body: object, detail: str) -> None:
    s = load_settings(env={}, overrides={})
    with pytest.raises(BadRequest) as info:
        parse(offer_model(s), body)
    assert info.value.detail == detail


def test_extra_offer_fields_are_ignored() -> None:
    s = load_settings(env={}, overrides={})
    offer = parse(offer_model(s), {"sdp": "v=0\r\n", "type": "offer", "x": [1]})
    assert (offer.sdp, offer.type, offer.avatar_id) == ("v=0\r\n", "offer", s.avatars.default)


def test_the_error_body_is_the_models() -> None:
    from rtc_server.wire import ErrorBody

    doc = build_openapi(load_settings(env={}, overrides={}))
    assert doc["components"]["schemas"]["Error"] == ErrorBody.model_json_schema()
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "detail"]


def test_render_refusals_keep_their_order() -> None:
    s = load_settings(env={}, overrides={})
    # 'async' is checked last, after 'priority'; unknown fields before anything
    with pytest.raises(BadRequest, match="'priority' must be within"):
        validate({"text": "hi", "async": "maybe", "priority": 99}, None, s, ["default"])
    with pytest.raises(BadRequest, match="'async' must be true or false"):
        validate({"text": "hi", "async": "maybe"}, None, s, ["default"])
    with pytest.raises(BadRequest, match="unknown field"):
        validate({"text": "", "colour": 1}, None, s, ["default"])
    with pytest.raises(BadRequest, match="exactly one"):
        validate({"voice": "nobody"}, None, s, ["default"])


def test_strings_are_passed_on_as_they_came() -> None:
    # lone surrogates are no validation error: the avatar lookup (404) and the SDP parser
    # refuse them, as before the models
    s = load_settings(env={}, overrides={})
    assert validate({"text": "hi", "avatar_id": "a\ud800"}, None, s, ["default"]).avatar_id == (
        "a\ud800"
    )
    offer = parse(offer_model(s), {"sdp": "v=0\ud800", "type": "offer", "avatar_id": "\udcff"})
    assert (offer.sdp, offer.avatar_id) == ("v=0\ud800", "\udcff")
