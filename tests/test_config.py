"""config/: defaults, layering (file <- env <- overrides), strict validation, redaction."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from config import (
    DEFAULTS_FILE,
    ConfigError,
    IceServer,
    Settings,
    load_settings,
)


def load(**kwargs: object) -> Settings:
    kwargs.setdefault("env", {})
    return load_settings(**kwargs)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_match_the_yaml_file() -> None:
    raw = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8"))
    assert load().to_dict() == raw


def test_default_values_and_derived_properties() -> None:
    s = load()
    assert s.server.host == "0.0.0.0"
    assert s.server.port == 8080
    assert s.server.max_body_bytes == 262144
    assert s.server.log_level == "info"
    assert s.media.fps == 25
    assert s.media.audio_frame_samples == 960
    assert s.media.video_pts_step == 3600
    assert s.webrtc.ice_servers == ()
    assert s.webrtc.host_candidates == "all"
    assert s.sessions.idle_timeout_s == 600.0
    assert isinstance(s.sessions.idle_timeout_s, float)
    assert s.avatars.default == "default"
    assert s.avatars.data_path == Path("data")
    assert s.engines.piper_voice is None
    assert s.engines.tts_speed == 1.0


def test_derived_properties_follow_settings() -> None:
    s = load(
        overrides={"media.fps": 30, "media.audio_sample_rate": 16000, "media.audio_frame_ms": 10}
    )
    assert s.media.video_pts_step == 3000
    assert s.media.audio_frame_samples == 160


def test_every_key_in_defaults_yaml_is_documented() -> None:
    """Each key line is preceded by a comment line (or carries one)."""
    lines = DEFAULTS_FILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s+\w+:", line):
            assert "#" in line or lines[i - 1].strip().startswith("#"), f"undocumented: {line}"


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.port = 1  # type: ignore[misc]


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_SERVER__PORT", "9123")
    assert load_settings().server.port == 9123
    assert load_settings(env={}).server.port == 8080


# --------------------------------------------------------------------------- layering


def test_each_layer_wins_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9001\n")
    env = {"AVATAR_SERVER__PORT": "9002"}
    assert load(config_file=path).server.port == 9001
    assert load(config_file=path, env=env).server.port == 9002
    assert load(config_file=path, env=env, overrides={"server.port": 9003}).server.port == 9003
    assert load(env=env, overrides={"server.port": 9003}).server.port == 9003


def test_file_is_deep_merged(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9001\nmedia:\n  fps: 30\n")
    s = load(config_file=path)
    assert s.server.port == 9001
    assert s.server.host == "0.0.0.0"  # untouched sibling keeps its default
    assert s.media.fps == 30
    assert s.media.video_width == 512


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load(config_file=write(tmp_path, "# nothing\n")) == load()
    assert load(config_file=write(tmp_path, "server:\n", "b.yaml")) == load()


def test_config_file_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9001\n")
    assert load(config_file=str(path)).server.port == 9001


def test_ice_servers_list_is_replaced_not_merged(tmp_path: Path) -> None:
    path = write(tmp_path, "webrtc:\n  ice_servers: [{urls: stun:a.example:3478}]\n")
    env = {"AVATAR_WEBRTC__ICE_SERVERS": "[]"}
    assert len(load(config_file=path).webrtc.ice_servers) == 1
    assert load(config_file=path, env=env).webrtc.ice_servers == ()


# --------------------------------------------------------------------------- environment


def test_env_values_are_parsed_as_yaml() -> None:
    s = load(
        env={
            "AVATAR_SERVER__PORT": "9000",
            "AVATAR_SESSIONS__IDLE_TIMEOUT_S": "2.5",
            "AVATAR_ENGINES__TTS_SPEED": "1",
            "AVATAR_WEBRTC__HOST_CANDIDATES": "loopback",
            "AVATAR_WEBRTC__ICE_SERVERS": '[{"urls": ["stun:stun.example.org:3478"]}]',
            "AVATAR_ENGINES__PIPER_VOICE": "/voices/x.onnx",
        }
    )
    assert s.server.port == 9000
    assert s.sessions.idle_timeout_s == 2.5
    assert s.engines.tts_speed == 1.0 and isinstance(s.engines.tts_speed, float)
    assert s.webrtc.host_candidates == "loopback"
    assert s.webrtc.ice_servers == (IceServer(urls=("stun:stun.example.org:3478",)),)
    assert s.engines.piper_voice == "/voices/x.onnx"


def test_env_null_and_string_fields() -> None:
    s = load(
        env={
            "AVATAR_ENGINES__PIPER_VOICE": "null",
            "AVATAR_AVATARS__DEFAULT": "007",  # YAML would say int 7
            "AVATAR_AVATARS__DATA_DIR": "yes",  # YAML 1.1 would say bool True
        },
        overrides={"engines.piper_voice": "/x.onnx"},
    )
    assert s.engines.piper_voice == "/x.onnx"
    s = load(
        env={
            "AVATAR_ENGINES__PIPER_VOICE": "null",
            "AVATAR_AVATARS__DEFAULT": "007",
            "AVATAR_AVATARS__DATA_DIR": "yes",
        }
    )
    assert s.engines.piper_voice is None
    assert s.avatars.default == "007"
    assert s.avatars.data_dir == "yes"


def test_env_bool_is_not_an_int() -> None:
    err = error_of(env={"AVATAR_SERVER__PORT": "true"})
    assert err.key == "server.port"
    assert "expected int" in str(err) and "True" in str(err)
    assert "AVATAR_SERVER__PORT" in str(err)


def test_env_string_for_int_field_names_value() -> None:
    err = error_of(env={"AVATAR_SERVER__PORT": "eighty"})
    assert str(err).startswith("server.port: expected int, got str 'eighty'")


def test_env_unknown_key_names_key_and_variable() -> None:
    err = error_of(env={"AVATAR_SERVER__PROT": "1"})
    assert err.key == "server.prot"
    assert "server.port" in str(err)  # suggestion
    assert "AVATAR_SERVER__PROT" in str(err)
    err = error_of(env={"AVATAR_SERVRE__PORT": "1"})
    assert err.key == "servre.port"
    assert "'server'" in str(err)


def test_env_single_underscore_typo_is_reported() -> None:
    err = error_of(env={"AVATAR_SERVER_PORT": "9000"})
    assert err.key == "server.port"
    assert "AVATAR_SERVER__PORT" in str(err)


def test_env_whole_section_is_rejected() -> None:
    err = error_of(env={"AVATAR_SERVER": "{port: 1}"})
    assert err.key == "server"
    assert "AVATAR_SERVER__<KEY>" in str(err)


def test_unrelated_prefixed_env_vars_are_ignored() -> None:
    env = {"AVATAR_REQUIRE_NETNS": "1", "AVATAR_TEST_ARTIFACTS": "/tmp/x", "PATH": "/bin"}
    assert load(env=env) == load()


def test_env_descending_into_a_value_is_an_error() -> None:
    err = error_of(env={"AVATAR_WEBRTC__ICE_SERVERS__0": "stun:x"})
    assert err.key == "webrtc.ice_servers.0"


def test_env_unparseable_yaml() -> None:
    err = error_of(env={"AVATAR_WEBRTC__ICE_SERVERS": "[{urls: "})
    assert err.key == "webrtc.ice_servers"
    assert "YAML" in str(err)


# --------------------------------------------------------------------------- file errors


def test_unknown_key_in_file_names_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "media:\n  fsp: 30\n")
    err = error_of(config_file=path)
    assert err.key == "media.fsp"
    assert "did you mean 'media.fps'" in str(err)
    assert str(path) in str(err)


def test_unknown_section_and_misplaced_key(tmp_path: Path) -> None:
    err = error_of(config_file=write(tmp_path, "port: 9000\n"))
    assert err.key == "port"
    assert "server.port" in str(err)
    err = error_of(config_file=write(tmp_path, "server:\n  fps: 30\n", "b.yaml"))
    assert err.key == "server.fps"
    assert "media.fps" in str(err)


def test_bad_yaml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: [9000\n")
    err = error_of(config_file=path)
    assert str(path) in str(err)
    assert "invalid YAML" in str(err)


def test_non_mapping_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "- server\n- media\n")
    err = error_of(config_file=path)
    assert str(path) in str(err) and "mapping" in str(err)


def test_section_must_be_mapping(tmp_path: Path) -> None:
    err = error_of(config_file=write(tmp_path, "server: 9000\n"))
    assert err.key == "server"
    assert "mapping" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = error_of(config_file=path)
    assert str(path) in str(err) and "not found" in str(err)


def test_duplicate_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1\n  port: 2\n")
    err = error_of(config_file=path)
    assert "duplicate key 'port'" in str(err)
    assert str(path) in str(err)


# --------------------------------------------------------------------------- types, ranges


def test_wrong_type_names_key_expected_type_and_value(tmp_path: Path) -> None:
    err = error_of(config_file=write(tmp_path, 'server:\n  port: "80"\n'))
    assert err.key == "server.port"
    assert "expected int" in str(err) and "'80'" in str(err)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("server.port", True, "expected int"),
        ("server.port", 80.0, "expected int"),
        ("server.port", 0, "1..65535"),
        ("server.port", 65536, "1..65535"),
        ("server.max_body_bytes", 1023, ">= 1024"),
        ("server.host", "", "empty"),
        ("server.host", 1, "expected str"),
        ("server.log_level", "verbose", "one of debug, info, warning, error"),
        ("media.fps", 0, "1..60"),
        ("media.fps", 61, "1..60"),
        ("media.fps", 7, "divide 90000"),
        ("media.audio_sample_rate", 44100, "one of 16000, 24000, 48000"),
        ("media.audio_sample_rate", 48000.0, "one of"),
        ("media.audio_frame_ms", 30, "one of 10, 20, 40, 60"),
        ("media.video_width", 513, "even"),
        ("media.video_width", 62, "64..3840"),
        ("media.video_height", 2162, "64..2160"),
        ("media.render_lead_ms", 39, "40..2000"),
        ("media.schedule_lead_ms", 5001, "40..5000"),
        ("media.crossfade_frames", 26, "0..25"),
        ("webrtc.host_candidates", "public", "one of all, loopback"),
        ("webrtc.ice_servers", "stun:x", "expected a list"),
        ("sessions.max_concurrent", 0, ">= 1"),
        ("sessions.idle_timeout_s", -1, ">= 0"),
        ("sessions.idle_timeout_s", float("inf"), "finite"),
        ("sessions.disconnect_grace_s", "10", "expected float"),
        ("sessions.connect_timeout_s", 0, "> 0"),
        ("avatars.default", None, "expected str"),
        ("engines.tts", "espeak", "one of piper"),
        ("lipsync.engine", "energy", "one of auto, wav2lip, viseme"),
        ("llm.base_url", "localhost:8000", "http:// or https://"),
        ("vad.min_speech_ms", 10, "32..5000"),
        ("conversation.barge_in", 1, "expected bool"),
        ("lipsync.device", "tpu", "one of auto, cuda, openvino, cpu"),
        ("lipsync.precision", "fp16", "one of auto, fp32, bf16, int8"),
        ("webrtc.video_codecs", ["AV1"], "must be one of VP8, H264"),
        ("webrtc.video_codecs", [], "at least one video codec"),
        ("webrtc.h264_preset", "slow", "one of ultrafast"),
        ("webrtc.video_bitrate_kbps", -1, "0..20000"),
        ("lipsync.fp16", "yes", "expected bool"),
        ("lipsync.max_batch", 0, "1..256"),
        ("lipsync.max_wait_ms", 500, "0..100"),
        ("lipsync.streams", 65, "0..64"),
        ("lipsync.streams", -1, "0..64"),
        ("lipsync.render_lead_ms", 39, "40..2000"),
        ("lipsync.schedule_lead_ms", 39, "40..5000"),
        ("lipsync.wav2lip_model", "", "must not be empty"),
        ("engines.piper_voice", 3, "expected str or null"),
        ("engines.tts_speed", 2.5, "0.5..2.0"),
        ("engines.tts_speed", False, "expected float"),
    ],
)
def test_invalid_values(key: str, value: object, fragment: str) -> None:
    err = error_of(overrides={key: value})
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)
    assert "overrides" in str(err)


def test_int_accepted_for_float_and_zero_disables_idle_timeout() -> None:
    s = load(overrides={"sessions.idle_timeout_s": 0, "engines.tts_speed": 2})
    assert s.sessions.idle_timeout_s == 0.0
    assert s.engines.tts_speed == 2.0 and isinstance(s.engines.tts_speed, float)


def test_valid_fps_values() -> None:
    for fps in (1, 24, 25, 30, 50, 60):
        assert load(overrides={"media.fps": fps}).media.video_pts_step * fps == 90000


def test_unknown_override_key() -> None:
    err = error_of(overrides={"server.prot": 1})
    assert err.key == "server.prot"
    assert "server.port" in str(err)
    assert error_of(overrides={"server..port": 1}).key == "server..port"


# --------------------------------------------------------------------------- ICE servers


def test_ice_server_single_url_is_wrapped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "webrtc:\n"
        "  ice_servers:\n"
        "    - urls: stun:stun.example.org:3478\n"
        '    - urls: ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]\n'
        "      username: alice\n"
        "      credential: s3cret\n",
    )
    servers = load(config_file=path).webrtc.ice_servers
    assert servers[0] == IceServer(urls=("stun:stun.example.org:3478",))
    assert servers[1].urls == (
        "turn:turn.example.org:3478?transport=udp",
        "turns:turn.example.org:5349",
    )
    assert servers[1].username == "alice"
    assert servers[1].credential == "s3cret"


@pytest.mark.parametrize(
    ("entries", "key", "fragment"),
    [
        ([{"urls": "http://x"}], "webrtc.ice_servers[0].urls[0]", "stun:, turn: or turns:"),
        ([{"urls": "stun:"}], "webrtc.ice_servers[0].urls[0]", "stun:, turn: or turns:"),
        ([{"urls": []}], "webrtc.ice_servers[0].urls", "non-empty"),
        ([{"urls": [3]}], "webrtc.ice_servers[0].urls[0]", "expected str"),
        ([{"username": "a"}], "webrtc.ice_servers[0].urls", "missing"),
        ([{"url": "stun:x"}], "webrtc.ice_servers[0].url", "did you mean 'urls'"),
        (["stun:x"], "webrtc.ice_servers[0]", "expected a mapping"),
        ([{"urls": "stun:x"}, {"urls": "turn:y"}], "webrtc.ice_servers[1]", "username and cred"),
        ([{"urls": "stun:x", "credential": 5}], "webrtc.ice_servers[0].credential", "str or null"),
    ],
)
def test_invalid_ice_servers(entries: object, key: str, fragment: str) -> None:
    err = error_of(overrides={"webrtc.ice_servers": entries})
    assert err.key == key
    assert fragment in str(err)
    assert str(err).endswith("(from overrides)")


# --------------------------------------------------------------------------- redaction


def test_to_dict_redacts_ice_credentials() -> None:
    servers = [
        {"urls": ["turn:t.example:3478"], "username": "alice", "credential": "s3cret"},
        {"urls": "stun:s.example:3478"},
    ]
    s = load(overrides={"webrtc.ice_servers": servers})
    assert s.webrtc.ice_servers[0].credential == "s3cret"  # still usable
    out = s.to_dict()
    assert out["webrtc"]["ice_servers"] == [
        {"urls": ["turn:t.example:3478"], "username": "alice", "credential": "***"},
        {"urls": ["stun:s.example:3478"], "username": None, "credential": None},
    ]
    assert "s3cret" not in repr(out)
    assert "s3cret" not in repr(s)


def test_llm_api_key_is_never_shown() -> None:
    s = load(env={"AVATAR_LLM__API_KEY": "sk-very-secret"})
    assert s.llm.api_key == "sk-very-secret"
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in repr(s.to_dict())
    assert s.to_dict()["llm"]["api_key"] == "***"


def test_to_dict_is_plain_data() -> None:
    out = load(overrides={"webrtc.ice_servers": [{"urls": "stun:s"}]}).to_dict()
    yaml.safe_dump(out)  # only plain types: no tuples, no dataclasses
    assert set(out) == {
        "server", "media", "webrtc", "sessions", "avatars", "engines", "lipsync", "vad", "stt",
        "llm", "conversation", "turns", "expression", "render", "jobs", "cache", "access",
        "cluster",
    }


def test_access_secrets_are_redacted_and_lists_accept_one_string() -> None:
    key, token = "k-123-4d1f8a2b9c", "t-456-7e0a3c5d1f"
    s = load(env={"AVATAR_ACCESS__API_KEYS": key, "AVATAR_ACCESS__OFFER_TOKEN": token})
    assert s.access.api_keys == (key,)
    assert s.access.offer_token == token
    shown = repr(s) + repr(s.to_dict())
    assert key not in shown and token not in shown
    assert s.to_dict()["access"]["api_keys"] == ["***"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"access.api_keys": ["a"]}, "access.api_keys[0]"),
        ({"access.api_keys": ["k" * 16, "k" * 15]}, "access.api_keys[1]"),
        ({"access.offer_token": "short-token"}, "access.offer_token"),
        ({"access.offer_token": "x"}, "access.offer_token"),
    ],
)
def test_short_api_keys_and_offer_tokens_are_refused(override, key) -> None:
    """A one-letter key would make the log redactor mask that letter in every line."""
    err = error_of(overrides=override)
    assert err.key == key
    assert "at least 16 characters" in str(err) and "guess" in str(err)
    secret = next(iter(override.values()))
    shown = secret[-1] if isinstance(secret, list) else secret
    assert repr(shown) not in str(err)  # the value is never echoed
    s = load(overrides={"access.api_keys": ["k" * 16], "access.offer_token": "t" * 16})
    assert s.access.api_keys == ("k" * 16,) and s.access.offer_token == "t" * 16


@pytest.mark.parametrize("padded", [" " + "k" * 16, "k" * 16 + "\n"])
def test_secrets_with_surrounding_whitespace_are_refused(padded) -> None:
    """Headers are read stripped, so such a key could never be presented."""
    for override, key in (({"access.api_keys": [padded]}, "access.api_keys[0]"),
                          ({"access.offer_token": padded}, "access.offer_token")):
        err = error_of(overrides=override)
        assert err.key == key and "whitespace" in str(err)


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example/path",
        "https://app.example/app/",
        "https://app.example?x=1",
        "https://app.example/?x=1",
        "https://app.example#top",
        "https://user:pw@app.example",
        "https://user@app.example",
        "ftp://app.example",
        "https://",
        "https:app.example",
        "app.example",
        "https://app.example:99999",
        "https://app.example:0",
        "https://app.example:http",
        "https://app.example:",
        "https://*.example.com",
        "https://app example.com",
        " https://app.example",
        "https://[::1",
        "https://[not-v6]:80",
    ],
)
def test_cors_origins_must_be_bare_origins(origin) -> None:
    err = error_of(overrides={"access.cors_origins": ["https://ok.example", origin]})
    assert err.key == "access.cors_origins[1]"
    assert "http(s)://host[:port]" in str(err)


def test_cors_origins_accept_origins_and_drop_one_trailing_slash() -> None:
    origins = ["https://app.example/", "http://localhost:3000", "https://[::1]:8443",
               "http://10.0.0.5", "*"]
    s = load(overrides={"access.cors_origins": origins})
    assert s.access.cors_origins == ("https://app.example", "http://localhost:3000",
                                     "https://[::1]:8443", "http://10.0.0.5", "*")


def test_forwarding_settings_default_to_one_appending_proxy() -> None:
    a = load().access
    assert (a.trust_forwarded_for, a.trusted_proxies, a.forwarded_hops, a.forwarded_header) == (
        False, (), 1, "x-forwarded-for")


def test_trusted_proxies_are_parsed_as_networks() -> None:
    s = load(env={"AVATAR_ACCESS__TRUST_FORWARDED_FOR": "true",
                  "AVATAR_ACCESS__TRUSTED_PROXIES": '["10.0.0.0/8", "192.168.1.7", "::1", '
                                                    '"fd00::/8", "10.1.2.3/8"]'})
    assert s.access.trusted_proxies == ("10.0.0.0/8", "192.168.1.7/32", "::1/128", "fd00::/8")
    assert s.to_dict()["access"]["trusted_proxies"] == list(s.access.trusted_proxies)
    s = load(overrides={"access.trust_forwarded_for": True, "access.trusted_proxies": "::1"})
    assert s.access.trusted_proxies == ("::1/128",)


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ({"access.trusted_proxies": ["10.0.0.0/8", "proxy.local"]},
         "access.trusted_proxies[1]", "'proxy.local'"),
        ({"access.trusted_proxies": ["10.0.0.0/33"]}, "access.trusted_proxies[0]", "network"),
        ({"access.trusted_proxies": [""]}, "access.trusted_proxies[0]", "non-empty"),
        ({"access.trusted_proxies": 7}, "access.trusted_proxies", "list of str"),
        ({"access.forwarded_hops": 0}, "access.forwarded_hops", "1..16"),
        ({"access.forwarded_hops": 17}, "access.forwarded_hops", "1..16"),
        ({"access.forwarded_hops": "2"}, "access.forwarded_hops", "expected int"),
        ({"access.forwarded_header": "x-client-ip"}, "access.forwarded_header", "x-real-ip"),
        ({"access.trusted_proxies": ["10.0.0.1"], "access.forwarded_hops": 2},
         "access.forwarded_hops", "not both"),
        ({"access.forwarded_header": "x-real-ip", "access.forwarded_hops": 2},
         "access.forwarded_hops", "x-real-ip"),
    ],
)
def test_forwarding_settings_are_validated(override, key, words) -> None:
    err = error_of(overrides={"access.trust_forwarded_for": True, **override})
    assert err.key == key and words in str(err), str(err)


@pytest.mark.parametrize(
    ("key", "value"),
    [("trusted_proxies", ["10.0.0.1"]), ("forwarded_hops", 2), ("forwarded_header", "forwarded")],
)
def test_forwarding_settings_need_trust_forwarded_for(key, value) -> None:
    err = error_of(overrides={f"access.{key}": value})
    assert err.key == f"access.{key}"
    assert "access.trust_forwarded_for is false" in str(err)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"access.api_keys": [""]}, "access.api_keys[0]"),
        ({"access.api_keys": {"a": 1}}, "access.api_keys"),
        ({"access.cors_origins": ["example.org"]}, "access.cors_origins[0]"),
        ({"access.offer_per_min": -1}, "access.offer_per_min"),
        ({"server.log_format": "xml"}, "server.log_format"),
        ({"sessions.max_call_s": -5}, "sessions.max_call_s"),
    ],
)
def test_access_and_limit_settings_are_validated(override, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load(overrides=override)
