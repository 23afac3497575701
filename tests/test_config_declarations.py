"""config/sections.py declares every key once; defaults.yaml is written from it and agrees."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import fields

import pytest
import yaml

from config import DEFAULTS_FILE, load_settings
from config.fields import setting, spec_of
from config.reference import main as reference_main
from config.reference import render
from config.sections import SECTION_TYPES, MediaSettings, Settings


def _declared() -> list[tuple[str, type, dataclasses.Field]]:  # type: ignore[type-arg]
    return [(name, cls, f) for name, cls in SECTION_TYPES.items() for f in fields(cls)]


def test_committed_defaults_yaml_is_up_to_date() -> None:
    """Edit config/sections.py, then run: python -m config.reference"""
    assert DEFAULTS_FILE.read_text(encoding="utf-8") == render()
    assert reference_main(["--check"]) == 0


def test_defaults_yaml_has_the_declared_keys_and_defaults() -> None:
    raw = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8"))
    assert list(raw) == list(SECTION_TYPES)
    for name, cls in SECTION_TYPES.items():
        assert set(raw[name]) == {f.name for f in fields(cls)}, name
        for f in fields(cls):
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert raw[name][f.name] == default, f"{name}.{f.name}"


def test_every_key_has_a_doc() -> None:
    for name, cls, f in _declared():
        doc = textwrap.dedent(spec_of(cls, f.name).doc).strip()
        assert len(doc) > 10, f"{name}.{f.name} has no doc"


def test_docs_state_the_declared_bounds() -> None:
    """The doc is where a user reads the bounds: it must say the ones the loader enforces."""
    for name, cls, f in _declared():
        spec = spec_of(cls, f.name)
        if spec.above is not None:
            wanted = [f"> {spec.above}"] + ([f"<= {spec.max}"] if spec.max is not None else [])
        elif spec.min is not None and spec.max is not None:
            wanted = [f"{spec.min}..{spec.max}"]
        elif spec.min is not None:
            wanted = [f">= {spec.min}"]
        elif spec.max is not None:
            wanted = [f"<= {spec.max}"]
        else:
            continue
        for text in wanted:
            assert text in spec.doc, f"{name}.{f.name}: doc does not say {text!r}"


def test_declared_defaults_are_valid_and_are_what_loads() -> None:
    loaded = load_settings(env={})
    assert loaded == Settings()
    for name, _cls, f in _declared():
        value = getattr(getattr(loaded, name), f.name)
        assert type(value) is type(getattr(getattr(Settings(), name), f.name)), f"{name}.{f.name}"


def test_sections_stay_plain_frozen_dataclasses() -> None:
    s = load_settings(env={})
    media = dataclasses.replace(s.media, fps=30)
    assert media.fps == 30 and media.video_pts_step == 3000
    assert dataclasses.replace(s, media=media).media.fps == 30
    assert MediaSettings(fps=50).video_pts_step == 1800  # keywords; the rest declared defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        media.fps = 1  # type: ignore[misc]


def test_secrets_stay_out_of_repr() -> None:
    for name, _cls, f in _declared():
        if f.name in ("turn_secret", "api_key", "api_keys", "offer_token"):
            assert not f.repr, f"{name}.{f.name}"


def test_setting_records_the_declaration() -> None:
    @dataclasses.dataclass(frozen=True)
    class Demo:
        n: int = setting(3, min=1, max=9, doc="A number (int, 1..9).")

    f = fields(Demo)[0]
    assert f.default == 3 and Demo().n == 3
    assert spec_of(Demo, "n").min == 1 and spec_of(Demo, "n").max == 9
