"""Typed, validated settings.

Layers, later wins:

1. ``defaults.yaml`` beside this module (every key documented there);
2. an optional user YAML file, deep-merged section by section;
3. environment variables ``AVATAR_<SECTION>__<KEY>`` (values parsed as YAML);
4. ``overrides``: dotted keys such as ``{"server.port": 9000}`` (values used as given).

Every problem raises :class:`ConfigError`, whose message starts with the full dotted key and
says where the offending value came from.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import types
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

__all__ = [
    "DEFAULTS_FILE",
    "ENV_PREFIX",
    "AccessSettings",
    "AvatarSettings",
    "ConfigError",
    "EngineSettings",
    "IceServer",
    "ConversationSettings",
    "LipsyncSettings",
    "LlmSettings",
    "SttSettings",
    "VadSettings",
    "MediaSettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "WebRTCSettings",
    "load_settings",
]

DEFAULTS_FILE = Path(__file__).parent / "defaults.yaml"
ENV_PREFIX = "AVATAR_"
REDACTED = "***"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
SampleRate = Literal[16000, 24000, 48000]
AudioFrameMs = Literal[10, 20, 40, 60]
HostCandidates = Literal["all", "loopback"]
TtsEngine = Literal["piper"]
LipsyncEngine = Literal["auto", "wav2lip", "viseme"]
LipsyncDevice = Literal["auto", "cuda", "openvino", "cpu"]
LipsyncPrecision = Literal["auto", "fp32", "bf16", "int8"]
VideoCodec = Literal["VP8", "H264"]
H264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"]
SttDevice = Literal["auto", "cuda", "cpu"]
FaceAnalyzerBackend = Literal["dlib", "haar", "insightface"]
ForwardedHeader = Literal["x-forwarded-for", "forwarded", "x-real-ip"]

ICE_URL_SCHEMES = ("stun", "turn", "turns")
RTP_VIDEO_CLOCK_HZ = 90000

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A setting is unknown, mistyped or out of range, or a config file is unusable.

    ``key`` is the full dotted key (``media.fps``) or None for file-level problems;
    ``source`` says where the value came from (a file, an environment variable, overrides).
    """

    def __init__(self, key: str | None, reason: str, *, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        head = key if key is not None else (source or "config")
        message = f"{head}: {reason}"
        if key is not None and source:
            message += f" (from {source})"
        super().__init__(message)


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    max_body_bytes: int
    max_json_depth: int
    log_level: LogLevel
    log_format: LogFormat
    shutdown_grace_s: float


@dataclass(frozen=True, slots=True)
class MediaSettings:
    fps: int
    audio_sample_rate: SampleRate
    audio_frame_ms: AudioFrameMs
    video_width: int
    video_height: int
    render_lead_ms: int
    schedule_lead_ms: int
    crossfade_frames: int
    audio_first: bool

    @property
    def audio_frame_samples(self) -> int:
        """Samples per audio frame (per channel), e.g. 960 at 48 kHz / 20 ms."""
        return self.audio_sample_rate * self.audio_frame_ms // 1000

    @property
    def video_pts_step(self) -> int:
        """90 kHz RTP clock ticks per video frame, e.g. 3600 at 25 fps."""
        return RTP_VIDEO_CLOCK_HZ // self.fps


@dataclass(frozen=True, slots=True)
class IceServer:
    urls: tuple[str, ...]
    username: str | None = None
    # Kept out of repr so logging a Settings object never prints the secret.
    credential: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with the credential redacted."""
        return {
            "urls": list(self.urls),
            "username": self.username,
            "credential": None if self.credential is None else REDACTED,
        }


@dataclass(frozen=True, slots=True)
class WebRTCSettings:
    ice_servers: tuple[IceServer, ...]
    host_candidates: HostCandidates
    mic_prefetch_frames: int
    # Kept out of repr so logging a Settings object never prints the secret.
    turn_secret: str | None = field(repr=False)
    turn_ttl_s: float
    video_codecs: tuple[VideoCodec, ...]
    h264_preset: H264Preset
    video_bitrate_kbps: int


@dataclass(frozen=True, slots=True)
class SessionSettings:
    max_concurrent: int
    max_pending: int
    max_pending_per_client: int
    idle_timeout_s: float
    disconnect_grace_s: float
    connect_timeout_s: float
    max_call_s: float
    media_timeout_s: float


@dataclass(frozen=True, slots=True)
class AvatarSettings:
    default: str
    data_dir: str
    max_upload_bytes: int
    max_video_s: float
    min_face_px: int
    multiple_face_ratio: float
    memory_budget_mb: int
    analyzer: FaceAnalyzerBackend
    insightface_root: str | None
    crop_size: int

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    tts: TtsEngine
    piper_voice: str | None
    tts_speed: float


@dataclass(frozen=True, slots=True)
class LipsyncSettings:
    engine: LipsyncEngine
    wav2lip_model: str | None
    model_cache_dir: str | None
    device: LipsyncDevice
    precision: LipsyncPrecision
    fp16: bool
    max_batch: int
    max_wait_ms: float
    intra_op_threads: int
    streams: int
    frame_group: int
    render_lead_ms: int
    lower_face_only: bool

    @property
    def wav2lip_path(self) -> Path | None:
        return Path(self.wav2lip_model).expanduser() if self.wav2lip_model else None


@dataclass(frozen=True, slots=True)
class VadSettings:
    threshold: float
    min_speech_ms: int
    end_silence_ms: int
    pause_ms: int
    max_utterance_s: float


@dataclass(frozen=True, slots=True)
class SttSettings:
    model: str
    language: str | None
    device: SttDevice
    compute_type: str | None
    beam_size: int
    cache_dir: str | None


@dataclass(frozen=True, slots=True)
class LlmSettings:
    base_url: str | None
    # Kept out of repr so logging a Settings object never prints the secret.
    api_key: str | None = field(repr=False)
    model: str
    system_prompt: str
    history_turns: int
    first_token_timeout_s: float
    total_timeout_s: float
    max_retries: int
    max_consecutive_failures: int
    temperature: float
    max_tokens: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = None if self.api_key is None else REDACTED
        return out


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    listen: bool
    barge_in: bool
    preemptive: bool
    language: str
    max_chat_chars: int
    apology: str


@dataclass(frozen=True, slots=True)
class RenderSettings:
    max_text_chars: int
    max_audio_bytes: int
    max_audio_s: float
    sync_timeout_s: float
    min_fps: int
    max_fps: int
    h264_preset: str
    h264_crf: int
    vp9_crf: int


JobsBackend = Literal["local", "redis"]


@dataclass(frozen=True, slots=True)
class JobsSettings:
    backend: JobsBackend
    redis_url: str
    workers: int
    max_queue: int
    keep_finished_s: float


@dataclass(frozen=True, slots=True)
class CacheSettings:
    dir: str | None
    max_bytes: int
    ttl_s: float


@dataclass(frozen=True, slots=True)
class AccessSettings:
    # Kept out of repr so logging a Settings object never prints a secret.
    api_keys: tuple[str, ...] = field(repr=False)
    offer_token: str | None = field(repr=False)
    cors_origins: tuple[str, ...]
    trust_forwarded_for: bool
    trusted_proxies: tuple[str, ...]  # normalised networks, e.g. "10.0.0.0/8", "::1/128"
    forwarded_hops: int
    forwarded_header: ForwardedHeader
    offer_per_min: int
    avatars_per_min: int
    render_per_min: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the secrets redacted."""
        out = asdict(self)
        out["api_keys"] = [REDACTED for _ in self.api_keys]
        out["offer_token"] = None if self.offer_token is None else REDACTED
        out["cors_origins"] = list(self.cors_origins)
        out["trusted_proxies"] = list(self.trusted_proxies)
        return out


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    media: MediaSettings
    webrtc: WebRTCSettings
    sessions: SessionSettings
    avatars: AvatarSettings
    engines: EngineSettings
    lipsync: LipsyncSettings
    vad: VadSettings
    stt: SttSettings
    llm: LlmSettings
    conversation: ConversationSettings
    render: RenderSettings
    jobs: JobsSettings
    cache: CacheSettings
    access: AccessSettings

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (lists, not tuples) for logging or a /config endpoint.

        ICE server credentials are replaced by ``"***"``."""
        out: dict[str, dict[str, Any]] = {}
        for f in fields(self):
            section = getattr(self, f.name)
            if isinstance(section, WebRTCSettings):
                out[f.name] = {
                    "ice_servers": [s.to_dict() for s in section.ice_servers],
                    "host_candidates": section.host_candidates,
                    "mic_prefetch_frames": section.mic_prefetch_frames,
                    "turn_secret": None if section.turn_secret is None else REDACTED,
                    "turn_ttl_s": section.turn_ttl_s,
                    "video_codecs": list(section.video_codecs),
                    "h264_preset": section.h264_preset,
                    "video_bitrate_kbps": section.video_bitrate_kbps,
                }
            elif isinstance(section, LlmSettings | AccessSettings):
                out[f.name] = section.to_dict()
            else:
                out[f.name] = asdict(section)
        return out


_SECTION_TYPES: dict[str, type] = {
    "server": ServerSettings,
    "media": MediaSettings,
    "webrtc": WebRTCSettings,
    "sessions": SessionSettings,
    "avatars": AvatarSettings,
    "engines": EngineSettings,
    "lipsync": LipsyncSettings,
    "vad": VadSettings,
    "stt": SttSettings,
    "llm": LlmSettings,
    "conversation": ConversationSettings,
    "render": RenderSettings,
    "jobs": JobsSettings,
    "cache": CacheSettings,
    "access": AccessSettings,
}
_SCHEMA: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls)) for name, cls in _SECTION_TYPES.items()
}
_ICE_SERVER_KEYS = tuple(f.name for f in fields(IceServer))


def _is_stringy(tp: object) -> bool:
    """True for str, a Literal of strs, or a union containing one of those."""
    if tp is str:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if origin is Union or isinstance(tp, types.UnionType):
        return any(_is_stringy(a) for a in get_args(tp))
    return False


# Keys whose value is a string: an environment value that YAML would read as something else
# ("007", "off", "1.0") is kept as the literal string for these.
_STRING_KEYS: frozenset[str] = frozenset(
    f"{section}.{name}"
    for section, cls in _SECTION_TYPES.items()
    for name, tp in get_type_hints(cls).items()
    if _is_stringy(tp)
)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml_file(path: Path) -> Mapping[Any, Any]:
    source = f"config file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(None, "file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(None, f"cannot read: {exc}", source=source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(None, f"invalid YAML: {exc}", source=source) from None
    if data is None:  # empty file (or only comments)
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            None,
            f"top level must be a mapping of sections, got {type(data).__name__}",
            source=source,
        )
    return data


# --------------------------------------------------------------------------- layering


def _suggest(name: str, siblings: tuple[str, ...], prefix: str, *, anywhere: bool = True) -> str:
    """'; did you mean ...?' for the closest known key: among siblings, else (``anywhere``)
    among the keys of every section (``port`` at top level -> ``server.port``)."""
    match = difflib.get_close_matches(name, siblings, n=1)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    if not anywhere:
        return ""
    every = {f"{s}.{k}": k for s, keys in _SCHEMA.items() for k in keys}
    match = difflib.get_close_matches(name, list(every.values()), n=1)
    if match:
        dotted = next(d for d, k in every.items() if k == match[0])
        return f"; did you mean '{dotted}'?"
    return ""


class _Merged:
    """The merged raw values, section -> key -> value, plus where each value came from."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, object]] = {s: {} for s in _SCHEMA}
        self.sources: dict[str, str] = {}

    def resolve(self, parts: list[str], source: str) -> tuple[str, str | None]:
        """Check a key path against the schema: (section, key or None for a whole section)."""
        dotted = ".".join(parts)
        section = parts[0]
        if section not in _SCHEMA:
            reason = "unknown section" if len(parts) == 1 else "unknown key"
            raise ConfigError(dotted, reason + _suggest(section, tuple(_SCHEMA), ""), source=source)
        if len(parts) == 1:
            return section, None
        key = parts[1]
        if key not in _SCHEMA[section]:
            raise ConfigError(
                f"{section}.{key}",
                "unknown key" + _suggest(key, _SCHEMA[section], f"{section}."),
                source=source,
            )
        if len(parts) > 2:
            raise ConfigError(
                dotted,
                f"unknown key: {section}.{key} is set as a whole, not by sub-key",
                source=source,
            )
        return section, key

    def set(self, parts: list[str], value: object, source: str) -> None:
        section, key = self.resolve(parts, source)
        if key is not None:
            self.values[section][key] = value
            self.sources[f"{section}.{key}"] = source
            return
        if value is None:  # "server:" with nothing under it
            return
        if not isinstance(value, Mapping):
            raise ConfigError(
                section, f"expected a mapping of keys, got {_describe(value)}", source=source
            )
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"{section}.{k!r}", "unknown key (keys must be strings)", source=source
                )
            self.set([section, k], v, source)

    def apply_file(self, data: Mapping[Any, Any], source: str) -> None:
        for k, v in data.items():
            if not isinstance(k, str):
                raise ConfigError(repr(k), "unknown section (keys must be strings)", source=source)
            self.set([k], v, source)


def _env_entries(env: Mapping[str, str]) -> list[tuple[list[str], str, str]]:
    """(key parts, raw value, source) for each config variable in ``env``.

    A variable is a config variable when its name has the prefix and a ``__`` separator.
    Prefixed names without one are left alone (the test harness uses e.g.
    AVATAR_REQUIRE_NETNS), except ones that name a section (AVATAR_SERVER) or look like a
    section with a single underscore (AVATAR_SERVER_PORT): those are reported as errors."""
    entries = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        source = f"environment variable {name}"
        if "__" not in rest:
            lowered = rest.lower()
            for section in _SCHEMA:
                if lowered == section:
                    raise ConfigError(
                        section,
                        f"set keys one by one: {ENV_PREFIX}{section.upper()}__<KEY>",
                        source=source,
                    )
                if lowered.startswith(section + "_"):
                    wanted = f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :]}"
                    raise ConfigError(
                        f"{section}.{lowered[len(section) + 1 :]}",
                        f"malformed variable name; use {wanted} (double underscore between "
                        "section and key)",
                        source=source,
                    )
            continue
        parts = rest.lower().split("__")
        if any(not p for p in parts):
            raise ConfigError(
                ".".join(parts), "malformed variable name (empty key segment)", source=source
            )
        entries.append((parts, env[name], source))
    return entries


def _parse_env_value(dotted: str, raw: str, source: str) -> object:
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(dotted, f"cannot parse {raw!r} as YAML: {exc}", source=source) from None
    if dotted in _STRING_KEYS and value is not None and not isinstance(value, str):
        return raw  # "007", "off", "1.5" stay strings where a string is expected
    return value


# --------------------------------------------------------------------------- validation


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


class _Section:
    """Typed getters over one merged section; errors name the full key and its source."""

    def __init__(self, merged: _Merged, name: str) -> None:
        self.merged = merged
        self.name = name
        self.values = merged.values[name]

    def error(self, key: str, reason: str) -> ConfigError:
        dotted = f"{self.name}.{key}"
        base = f"{self.name}.{key.split('[')[0]}"  # ice_servers[0].urls -> ice_servers
        return ConfigError(dotted, reason, source=self.merged.sources.get(base))

    def raw(self, key: str) -> object:
        if key not in self.values:
            raise self.error(key, "missing (defaults.yaml does not define it)")
        return self.values[key]

    def get_int(self, key: str, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected int, got {_describe(value)}")
        _check_range(self, key, value, lo, hi)
        return value

    def get_float(
        self, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
    ) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected float, got {_describe(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise self.error(key, f"must be a finite number, got {value!r}")
        if lo_open and lo is not None and number <= lo:
            raise self.error(key, f"must be > {lo}, got {value!r}")
        _check_range(self, key, number, lo, hi)
        return number

    def get_bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, f"expected bool, got {_describe(value)}")
        return value

    def get_str(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected str, got {_describe(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def get_optional_str(self, key: str) -> str | None:
        if self.raw(key) is None:
            return None
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected str or null, got {_describe(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty (use null for the default)")
        return value

    def get_str_list(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings; a single string is taken as a list of one."""
        value = self.raw(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of str, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                # never echo the value: these lists hold secrets (API keys)
                raise self.error(f"{key}[{i}]", "expected a non-empty str")
        return tuple(value)

    def get_choice(self, key: str, choices: tuple[_T, ...]) -> _T:
        value = self.raw(key)
        for c in choices:
            # type() check: True must not match 1, nor 1.0 match 1.
            if type(value) is type(c) and value == c:
                return c
        allowed = ", ".join(str(c) for c in choices)
        raise self.error(key, f"must be one of {allowed}; got {_describe(value)}")


def _check_range(
    section: _Section, key: str, value: float, lo: float | None, hi: float | None
) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise section.error(key, f"must be in {lo}..{hi}, got {value!r}")
    if lo is not None and value < lo:
        raise section.error(key, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise section.error(key, f"must be <= {hi}, got {value!r}")


def _server(s: _Section) -> ServerSettings:
    return ServerSettings(
        host=s.get_str("host"),
        port=s.get_int("port", 1, 65535),
        max_body_bytes=s.get_int("max_body_bytes", 1024),
        max_json_depth=s.get_int("max_json_depth", 2, 256),
        log_level=s.get_choice("log_level", get_args(LogLevel)),
        log_format=s.get_choice("log_format", get_args(LogFormat)),
        shutdown_grace_s=s.get_float("shutdown_grace_s", 0, 60),
    )


def _media(s: _Section) -> MediaSettings:
    fps = s.get_int("fps", 1, 60)
    if RTP_VIDEO_CLOCK_HZ % fps:
        raise s.error("fps", f"must divide {RTP_VIDEO_CLOCK_HZ} exactly, got {fps}")
    sizes = {}
    for key, hi in (("video_width", 3840), ("video_height", 2160)):
        sizes[key] = s.get_int(key, 64, hi)
        if sizes[key] % 2:
            raise s.error(key, f"must be even, got {sizes[key]}")
    render_lead_ms = s.get_int("render_lead_ms", 40, 2000)
    schedule_lead_ms = s.get_int("schedule_lead_ms", 40, 5000)
    return MediaSettings(
        fps=fps,
        audio_sample_rate=s.get_choice("audio_sample_rate", get_args(SampleRate)),
        audio_frame_ms=s.get_choice("audio_frame_ms", get_args(AudioFrameMs)),
        video_width=sizes["video_width"],
        video_height=sizes["video_height"],
        render_lead_ms=render_lead_ms,
        schedule_lead_ms=schedule_lead_ms,
        crossfade_frames=s.get_int("crossfade_frames", 0, 25),
        audio_first=s.get_bool("audio_first"),
    )


def _ice_server(s: _Section, index: int, item: object, *, turn_secret: bool) -> IceServer:
    key = f"ice_servers[{index}]"
    if not isinstance(item, Mapping):
        raise s.error(key, f"expected a mapping with 'urls', got {_describe(item)}")
    for k in item:
        if k not in _ICE_SERVER_KEYS:
            hint = _suggest(k, _ICE_SERVER_KEYS, "", anywhere=False) if isinstance(k, str) else ""
            raise s.error(f"{key}.{k}", "unknown key" + hint)
    if "urls" not in item:
        raise s.error(f"{key}.urls", "missing (required)")
    urls = item["urls"]
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        raise s.error(
            f"{key}.urls", f"expected a url or a non-empty list of urls, got {_describe(urls)}"
        )
    for j, url in enumerate(urls):
        if not isinstance(url, str):
            raise s.error(f"{key}.urls[{j}]", f"expected str, got {_describe(url)}")
        scheme, _, rest = url.partition(":")
        if scheme.lower() not in ICE_URL_SCHEMES or not rest.strip():
            raise s.error(
                f"{key}.urls[{j}]",
                f"must be a stun:, turn: or turns: url, got {url!r}",
            )
    creds: dict[str, str | None] = {}
    for k in ("username", "credential"):
        v = item.get(k)
        if v is not None and not isinstance(v, str):
            shown = _describe(v) if k == "username" else type(v).__name__
            raise s.error(f"{key}.{k}", f"expected str or null, got {shown}")
        creds[k] = v
    if (
        not turn_secret
        and any(u.partition(":")[0].lower() in ("turn", "turns") for u in urls)
        and (creds["username"] is None or creds["credential"] is None)
    ):
        raise s.error(
            key, "turn:/turns: urls need both username and credential (or webrtc.turn_secret)"
        )
    return IceServer(urls=tuple(urls), username=creds["username"], credential=creds["credential"])


def _webrtc(s: _Section) -> WebRTCSettings:
    raw = s.raw("ice_servers")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise s.error("ice_servers", f"expected a list of ICE servers, got {_describe(raw)}")
    secret = s.raw("turn_secret")
    if secret is not None and (not isinstance(secret, str) or not secret.strip()):
        raise s.error("turn_secret", "expected a non-empty str or null")  # never echo it
    return WebRTCSettings(
        ice_servers=tuple(
            _ice_server(s, i, item, turn_secret=secret is not None) for i, item in enumerate(raw)
        ),
        host_candidates=s.get_choice("host_candidates", get_args(HostCandidates)),
        mic_prefetch_frames=s.get_int("mic_prefetch_frames", 0, 8),
        turn_secret=secret,
        turn_ttl_s=s.get_float("turn_ttl_s", 60, 7 * 86400),
        video_codecs=_video_codecs(s),
        h264_preset=s.get_choice("h264_preset", get_args(H264Preset)),
        video_bitrate_kbps=s.get_int("video_bitrate_kbps", 0, 20_000),
    )


def _video_codecs(s: _Section) -> tuple[VideoCodec, ...]:
    names = s.get_str_list("video_codecs")
    allowed = get_args(VideoCodec)
    out: list[VideoCodec] = []
    for i, name in enumerate(names):
        match = next((c for c in allowed if c.lower() == name.strip().lower()), None)
        if match is None:
            choices = ", ".join(allowed)
            raise s.error("video_codecs", f"[{i}] must be one of {choices}; got {name!r}")
        if match in out:
            raise s.error("video_codecs", f"[{i}]: {match} is listed twice")
        out.append(match)
    if not out:
        raise s.error("video_codecs", "list at least one video codec (VP8, H264)")
    return tuple(out)


def _sessions(s: _Section) -> SessionSettings:
    return SessionSettings(
        max_concurrent=s.get_int("max_concurrent", 1),
        max_pending=s.get_int("max_pending", 1),
        max_pending_per_client=s.get_int("max_pending_per_client", 1),
        idle_timeout_s=s.get_float("idle_timeout_s", 0),
        disconnect_grace_s=s.get_float("disconnect_grace_s", 0),
        connect_timeout_s=s.get_float("connect_timeout_s", 0, lo_open=True),
        max_call_s=s.get_float("max_call_s", 0),
        media_timeout_s=s.get_float("media_timeout_s", 0),
    )


def _avatars(s: _Section) -> AvatarSettings:
    crop_size = s.get_int("crop_size", 32, 512)
    if crop_size % 2:
        raise s.error("crop_size", f"must be even, got {crop_size}")
    return AvatarSettings(
        default=s.get_str("default"),
        data_dir=s.get_str("data_dir"),
        max_upload_bytes=s.get_int("max_upload_bytes", 1024, 2**31),
        max_video_s=s.get_float("max_video_s", 0, 600, lo_open=True),
        min_face_px=s.get_int("min_face_px", 16, 4096),
        multiple_face_ratio=s.get_float("multiple_face_ratio", 0.01, 1.0),
        memory_budget_mb=s.get_int("memory_budget_mb", 16),
        analyzer=s.get_choice("analyzer", get_args(FaceAnalyzerBackend)),
        insightface_root=s.get_optional_str("insightface_root"),
        crop_size=crop_size,
    )


def _engines(s: _Section) -> EngineSettings:
    return EngineSettings(
        tts=s.get_choice("tts", get_args(TtsEngine)),
        piper_voice=s.get_optional_str("piper_voice"),
        tts_speed=s.get_float("tts_speed", 0.5, 2.0),
    )


def _lipsync(s: _Section) -> LipsyncSettings:
    return LipsyncSettings(
        engine=s.get_choice("engine", get_args(LipsyncEngine)),
        wav2lip_model=s.get_optional_str("wav2lip_model"),
        model_cache_dir=s.get_optional_str("model_cache_dir"),
        device=s.get_choice("device", get_args(LipsyncDevice)),
        precision=s.get_choice("precision", get_args(LipsyncPrecision)),
        fp16=s.get_bool("fp16"),
        max_batch=s.get_int("max_batch", 1, 256),
        max_wait_ms=s.get_float("max_wait_ms", 0, 100),
        intra_op_threads=s.get_int("intra_op_threads", 0, 256),
        streams=s.get_int("streams", 0, 64),
        frame_group=s.get_int("frame_group", 1, 8),
        render_lead_ms=s.get_int("render_lead_ms", 40, 2000),
        lower_face_only=s.get_bool("lower_face_only"),
    )


def _vad(s: _Section) -> VadSettings:
    return VadSettings(
        threshold=s.get_float("threshold", 0.05, 0.95),
        min_speech_ms=s.get_int("min_speech_ms", 32, 5000),
        end_silence_ms=s.get_int("end_silence_ms", 96, 10000),
        pause_ms=s.get_int("pause_ms", 32, 10000),
        max_utterance_s=s.get_float("max_utterance_s", 1, 120),
    )


def _stt(s: _Section) -> SttSettings:
    return SttSettings(
        model=s.get_str("model"),
        language=s.get_optional_str("language"),
        device=s.get_choice("device", get_args(SttDevice)),
        compute_type=s.get_optional_str("compute_type"),
        beam_size=s.get_int("beam_size", 1, 10),
        cache_dir=s.get_optional_str("cache_dir"),
    )


def _llm(s: _Section) -> LlmSettings:
    base_url = s.get_optional_str("base_url")
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise s.error("base_url", f"must be an http:// or https:// URL, got {base_url!r}")
    return LlmSettings(
        base_url=base_url,
        api_key=s.get_optional_str("api_key"),
        model=s.get_str("model"),
        system_prompt=s.get_str("system_prompt"),
        history_turns=s.get_int("history_turns", 0, 100),
        first_token_timeout_s=s.get_float("first_token_timeout_s", 0, 600, lo_open=True),
        total_timeout_s=s.get_float("total_timeout_s", 0, 3600, lo_open=True),
        max_retries=s.get_int("max_retries", 0, 10),
        max_consecutive_failures=s.get_int("max_consecutive_failures", 1, 100),
        temperature=s.get_float("temperature", 0, 2),
        max_tokens=s.get_int("max_tokens", 1, 8192),
    )


def _conversation(s: _Section) -> ConversationSettings:
    return ConversationSettings(
        listen=s.get_bool("listen"),
        barge_in=s.get_bool("barge_in"),
        preemptive=s.get_bool("preemptive"),
        language=s.get_str("language"),
        max_chat_chars=s.get_int("max_chat_chars", 1, 100_000),
        apology=s.get_optional_str("apology") or "",
    )


H264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow")


def _render(s: _Section) -> RenderSettings:
    min_fps = s.get_int("min_fps", 1, 60)
    max_fps = s.get_int("max_fps", 1, 60)
    if min_fps > max_fps:
        raise s.error("min_fps", f"must not exceed max_fps ({max_fps})")
    return RenderSettings(
        max_text_chars=s.get_int("max_text_chars", 1, 100_000),
        max_audio_bytes=s.get_int("max_audio_bytes", 1024),
        max_audio_s=s.get_float("max_audio_s", 0, lo_open=True),
        sync_timeout_s=s.get_float("sync_timeout_s", 0, lo_open=True),
        min_fps=min_fps,
        max_fps=max_fps,
        h264_preset=s.get_choice("h264_preset", H264_PRESETS),
        h264_crf=s.get_int("h264_crf", 0, 51),
        vp9_crf=s.get_int("vp9_crf", 0, 63),
    )


def _jobs(s: _Section) -> JobsSettings:
    url = s.get_str("redis_url")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise s.error("redis_url", "must start with redis://, rediss:// or unix://")
    return JobsSettings(
        backend=s.get_choice("backend", get_args(JobsBackend)),
        redis_url=url,
        workers=s.get_int("workers", 0, 64),
        max_queue=s.get_int("max_queue", 1),
        keep_finished_s=s.get_float("keep_finished_s", 0, lo_open=True),
    )


def _cache(s: _Section) -> CacheSettings:
    return CacheSettings(
        dir=s.get_optional_str("dir"),
        max_bytes=s.get_int("max_bytes", 1 << 20),
        ttl_s=s.get_float("ttl_s", 0, lo_open=True),
    )


MIN_SECRET_CHARS = 16
MAX_FORWARDED_HOPS = 16
_ORIGIN_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _access_secret(s: _Section, key: str, value: str) -> None:
    """A key or token long enough to be a secret; its value is never echoed."""
    if value != value.strip():
        raise s.error(key, "must not start or end with whitespace (headers are read without it)")
    if len(value) < MIN_SECRET_CHARS:
        raise s.error(
            key,
            f"must be at least {MIN_SECRET_CHARS} characters, got {len(value)}: a short secret "
            "is easy to guess, and the log redactor would mask its text in every log line",
        )


def _cors_origin(s: _Section, key: str, origin: str) -> str:
    """``*`` or ``scheme://host[:port]`` (one trailing slash dropped)."""
    if origin == "*":
        return origin
    shape = "must be * or an origin, http(s)://host[:port]"
    if any(c.isspace() for c in origin):
        raise s.error(key, f"{shape} with no spaces; got {origin!r}")
    trimmed = origin[:-1] if origin.endswith("/") else origin
    try:
        parts = urlsplit(trimmed)
        port = parts.port
    except ValueError:  # a port that is no number or out of range, a broken [IPv6]
        raise s.error(key, f"{shape}; got {origin!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise s.error(key, f"{shape}; got {origin!r}")
    if "@" in parts.netloc:
        raise s.error(key, f"{shape}, without user info; got {origin!r}")
    if parts.path or parts.query or parts.fragment or "?" in trimmed or "#" in trimmed:
        raise s.error(key, f"{shape}, without a path, query or fragment; got {origin!r}")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        host_ok = _is_ip(host, version=6)
    else:
        host_ok = _ORIGIN_HOST_RE.fullmatch(host) is not None
    if not host_ok:
        raise s.error(key, f"{shape}; {host!r} is not a host name or address")
    if port == 0 or parts.netloc.endswith(":"):
        raise s.error(key, f"{shape}; the port of {origin!r} is not 1..65535")
    return trimmed


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _trusted_proxies(s: _Section) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(s.get_str_list("trusted_proxies")):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise s.error(
                f"trusted_proxies[{i}]",
                f"must be an IP address or a network such as 10.0.0.0/8 or fd00::/8, got {item!r}",
            ) from None
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


def _access(s: _Section) -> AccessSettings:
    offer_token = s.raw("offer_token")
    if offer_token is not None and (not isinstance(offer_token, str) or not offer_token.strip()):
        raise s.error("offer_token", "expected a non-empty str or null")
    if offer_token is not None:
        _access_secret(s, "offer_token", offer_token)
    api_keys = s.get_str_list("api_keys")
    for i, api_key in enumerate(api_keys):
        _access_secret(s, f"api_keys[{i}]", api_key)
    origins = tuple(
        _cors_origin(s, f"cors_origins[{i}]", origin)
        for i, origin in enumerate(s.get_str_list("cors_origins"))
    )
    trust = s.get_bool("trust_forwarded_for")
    proxies = _trusted_proxies(s)
    hops = s.get_int("forwarded_hops", 1, MAX_FORWARDED_HOPS)
    header = s.get_choice("forwarded_header", get_args(ForwardedHeader))
    if not trust:
        for key, unused in (
            ("trusted_proxies", bool(proxies)),
            ("forwarded_hops", hops != 1),
            ("forwarded_header", header != "x-forwarded-for"),
        ):
            if unused:
                raise s.error(
                    key, "has no effect while access.trust_forwarded_for is false; set that to "
                    "true to read the client address from your proxy's header"
                )
    if proxies and hops != 1:
        raise s.error(
            "forwarded_hops",
            "set either access.trusted_proxies (proxies known by address) or "
            "access.forwarded_hops (proxies counted), not both",
        )
    if header == "x-real-ip" and hops != 1:
        raise s.error("forwarded_hops", "must be 1 with forwarded_header x-real-ip (one address)")
    return AccessSettings(
        api_keys=api_keys,
        offer_token=offer_token,
        cors_origins=origins,
        trust_forwarded_for=trust,
        trusted_proxies=proxies,
        forwarded_hops=hops,
        forwarded_header=header,
        offer_per_min=s.get_int("offer_per_min", 0),
        avatars_per_min=s.get_int("avatars_per_min", 0),
        render_per_min=s.get_int("render_per_min", 0),
    )


# --------------------------------------------------------------------------- entry point


def load_settings(
    *,
    config_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load defaults.yaml <- ``config_file`` <- ``AVATAR_*`` environment <- ``overrides``.

    ``env=None`` reads ``os.environ``; pass ``{}`` to ignore the environment.
    ``overrides`` maps dotted keys to already-typed values, e.g. ``{"server.port": 9000}``;
    leave a key out rather than passing None for "not given" (None is a real value).
    Raises :class:`ConfigError` on any problem."""
    merged = _Merged()
    merged.apply_file(_read_yaml_file(DEFAULTS_FILE), f"defaults {DEFAULTS_FILE}")

    if config_file is not None:
        path = Path(config_file)
        merged.apply_file(_read_yaml_file(path), f"config file {path}")

    for parts, raw, source in _env_entries(os.environ if env is None else env):
        section, key = merged.resolve(parts, source)
        dotted = section if key is None else f"{section}.{key}"
        merged.set(parts, _parse_env_value(dotted, raw, source), source)

    for dotted_key, value in (overrides or {}).items():
        if not isinstance(dotted_key, str) or not dotted_key or "" in dotted_key.split("."):
            raise ConfigError(str(dotted_key), "malformed override key", source="overrides")
        merged.set(dotted_key.split("."), value, "overrides")

    return Settings(
        server=_server(_Section(merged, "server")),
        media=_media(_Section(merged, "media")),
        webrtc=_webrtc(_Section(merged, "webrtc")),
        sessions=_sessions(_Section(merged, "sessions")),
        avatars=_avatars(_Section(merged, "avatars")),
        engines=_engines(_Section(merged, "engines")),
        lipsync=_lipsync(_Section(merged, "lipsync")),
        vad=_vad(_Section(merged, "vad")),
        stt=_stt(_Section(merged, "stt")),
        llm=_llm(_Section(merged, "llm")),
        conversation=_conversation(_Section(merged, "conversation")),
        render=_render(_Section(merged, "render")),
        jobs=_jobs(_Section(merged, "jobs")),
        cache=_cache(_Section(merged, "cache")),
        access=_access(_Section(merged, "access")),
    )
