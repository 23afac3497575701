"""config: the avatar registration keys (avatars.max_upload_bytes ... avatars.crop_size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings


def load(**kwargs: object) -> Settings:
    kwargs.setdefault("env", {})
    return load_settings(**kwargs)  # type: ignore[arg-type]


def error_of(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value


def test_registration_defaults() -> None:
    a = load().avatars
    assert a.max_upload_bytes == 52428800
    assert a.max_video_s == 30.0 and isinstance(a.max_video_s, float)
    assert a.min_face_px == 96
    assert a.analyzer == "dlib"
    assert a.insightface_root is None
    assert a.crop_size == 96


def test_registration_keys_from_file_env_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "avatars:\n  analyzer: insightface\n  insightface_root: /models/insightface\n"
        "  max_video_s: 12.5\n",
        encoding="utf-8",
    )
    a = load(config_file=path).avatars
    assert (a.analyzer, a.insightface_root, a.max_video_s) == (
        "insightface",
        "/models/insightface",
        12.5,
    )
    a = load(
        env={"AVATAR_AVATARS__MAX_UPLOAD_BYTES": "1048576", "AVATAR_AVATARS__ANALYZER": "haar"}
    ).avatars
    assert a.max_upload_bytes == 1048576 and a.analyzer == "haar"
    a = load(overrides={"avatars.crop_size": 128, "avatars.min_face_px": 64}).avatars
    assert a.crop_size == 128 and a.min_face_px == 64


def test_insightface_root_null_from_env_and_path_string() -> None:
    assert load(env={"AVATAR_AVATARS__INSIGHTFACE_ROOT": "null"}).avatars.insightface_root is None
    # a value YAML would read as a bool stays the literal string for a str key
    assert load(env={"AVATAR_AVATARS__INSIGHTFACE_ROOT": "yes"}).avatars.insightface_root == "yes"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("avatars.max_upload_bytes", 1023, "1024..2147483648"),
        ("avatars.max_upload_bytes", "50MB", "expected int"),
        ("avatars.max_upload_bytes", True, "expected int"),
        ("avatars.max_video_s", 0, "> 0"),
        ("avatars.max_video_s", -3, "> 0"),
        ("avatars.max_video_s", 601, "0..600"),
        ("avatars.max_video_s", float("nan"), "finite"),
        ("avatars.max_video_s", "30", "expected float"),
        ("avatars.min_face_px", 8, "16..4096"),
        ("avatars.min_face_px", 96.0, "expected int"),
        ("avatars.analyzer", "mediapipe", "one of dlib, haar, insightface"),
        ("avatars.analyzer", None, "one of dlib, haar, insightface"),
        ("avatars.insightface_root", "", "must not be empty"),
        ("avatars.insightface_root", 5, "expected str or null"),
        ("avatars.crop_size", 16, "32..512"),
        ("avatars.crop_size", 97, "even"),
        ("avatars.crop_size", "96", "expected int"),
    ],
)
def test_invalid_registration_values(key: str, value: object, fragment: str) -> None:
    err = error_of(overrides={key: value})
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)
    assert "overrides" in str(err)


def test_unknown_avatar_key_suggests_the_right_one() -> None:
    err = error_of(overrides={"avatars.max_upload_byte": 1})
    assert err.key == "avatars.max_upload_byte"
    assert "avatars.max_upload_bytes" in str(err)


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("avatars:\n  analyzer: opencv\n", encoding="utf-8")
    err = error_of(config_file=path)
    assert err.key == "avatars.analyzer"
    assert str(path) in str(err)
